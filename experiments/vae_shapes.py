"""What ShapesBench reads in a VAE's reconstructions of held-out world clips: the ceiling
of a latent model diffusing that VAE's latents.

  python -m experiments.vae_shapes --config configs/world_tiny.py:latent \
      --config.autoencoder.workdir=runs/vae [--config.world.max_objects=2] \
      [--clips 40] [--batch 8] [--out runs/vae/vae_shapes.json]

The config names the world (its held-out split: the first `--clips` clips, the demo's
prompts) and the autoencoder (`autoencoder.*`: a `sora-jax train-vae` workdir, or a Wan
VAE). Each clip is encoded and decoded (`Autoencoder.encode` then `decode`, the route a
latent model's samples take back to pixels), and ShapesBench's trackers
(`evaluation.bench.video_metrics`) score the reconstructions and the clips themselves
against the clips' captions. A latent model can do no better than its VAE's row: an
object the decoder blurs into another shape, or a colour fringe the trackers read as a
small object of another colour (counted in "unprompted-colour detections", per clip),
costs the model's samples as much. The table also gives the reconstructions' PSNR.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import jax
import numpy as np

from experiments.report import report
from sora_jax import configs
from sora_jax.cli.args import parse_with_config
from sora_jax.data.pipeline import normalise_video, pad_with_last, to_uint8
from sora_jax.demo import REPORTED
from sora_jax.evaluation import bench
from sora_jax.evaluation.reconstruction import psnr_uint8
from sora_jax.evaluation.shapes_bench import held_out_clips
from sora_jax.train.autoencoders import make_autoencoder


def reconstruct(autoencoder, videos: np.ndarray, batch: int) -> np.ndarray:
  """uint8 `videos [N, T, H, W, 3]` encoded and decoded, `batch` clips per call (one
  compiled program), back to uint8."""
  round_trip = jax.jit(lambda v: autoencoder.decode(autoencoder.encode(v)))
  out = []
  for i in range(0, len(videos), batch):
    chunk = normalise_video(videos[i:i + batch])
    decoded = round_trip(pad_with_last(chunk, batch))[:len(chunk)]
    out.append(to_uint8(jax.device_get(decoded)))
  return np.concatenate(out)


def unprompted_detections(video: np.ndarray, prompt, world) -> int:
  """Detections (all frames) of a colour no prompted object has: colour fringes read as
  objects, or objects drawn from nowhere."""
  colours = list(world.colours)
  wanted = {colours.index(o.colour) for o in prompt}
  _, detections, _, _ = bench.prompted_tracks(video, prompt, world)
  return sum(d.colour not in wanted for frame in detections for d in frame)


def row(name: str, videos: np.ndarray, prompts, world, psnr: float | None) -> dict:
  metrics = [bench.video_metrics(v, p, world) for v, p in zip(videos, prompts)]
  summary = bench.summarise(metrics)
  return {"videos": name, **{k: summary[k] for k in REPORTED}, "psnr_db": psnr,
          "unprompted_detections": float(np.mean([unprompted_detections(v, p, world)
                                                  for v, p in zip(videos, prompts)]))}


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="A latent run's config (its world and autoencoder); overrides as "
                      "--config.KEY=VALUE.")
  parser.add_argument("--clips", type=int, default=40, help="held-out clips (the first N)")
  parser.add_argument("--batch", type=int, default=8, help="clips per encode/decode call")
  parser.add_argument("--out", default=None,
                      help="JSON (default: vae_shapes.json in the VAE's workdir)")
  args, config = parse_with_config(parser, argv, lock=False)
  if config.autoencoder.name == "identity":
    parser.error("--config: autoencoder.name is 'identity' (pixels): name a VAE "
                 "(autoencoder.name=vae with autoencoder.workdir, or wan with autoencoder.path).")
  if args.clips < 1 or args.batch < 1:
    parser.error("--clips and --batch must be positive.")
  world = configs.world_config(config)
  examples, _, prompts = held_out_clips(world, config.world.get("data_dir") or None, args.clips)
  videos = np.stack([e["video"] for e in examples])
  decoded = reconstruct(make_autoencoder(config.autoencoder), videos, args.batch)

  rows = [row("ground truth (held-out clips)", videos, prompts, world, None),
          row("VAE reconstructions", decoded, prompts, world, psnr_uint8(decoded, videos))]
  number = lambda k: (lambda r: "-" if r[k] is None else f"{r[k]:.3f}")  # noqa: E731
  columns = [("videos", lambda r: r["videos"])] + [(k, number(k)) for k in REPORTED] + [
      ("unprompted-colour detections per clip", number("unprompted_detections")),
      ("PSNR (dB)", lambda r: "-" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}")]
  directory = config.autoencoder.workdir or config.autoencoder.path or "."
  report(rows, columns, args.out or os.path.join(directory, "vae_shapes.json"),
         autoencoder=dict(config.autoencoder), clips=len(videos),
         world={"frames": world.frames, "height": world.height, "width": world.width,
                "max_objects": world.max_objects})


if __name__ == "__main__":
  main()
