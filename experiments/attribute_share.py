"""How much of what a diffusion model must predict each caption word decides: the share of
the space's variance that a clip's colour and its shape explain, in pixels and in the
latents of VAEs.

  python -m experiments.attribute_share --config configs/world_tiny.py:latent \
      --vae runs/vae --vae runs/vae444 [--clips 64] [--out attribute_share.json]

A denoiser trained with squared error learns first what removes the most error. This study
draws `--clips` one-object clips of the config's world (a random size, start and velocity
each) and renders each in every colour x shape of the world with the same motion, then
puts the variants in each space the study names: pixels, and the normalised latents of each
`--vae` (a `sora-jax train-vae` workdir: what its latent model diffuses). For each space:
  colour share: the variance across colours with the shape and motion held fixed, over
    the variance of all variants of all clips (per value, summed);
  shape share: the same across shapes with the colour and motion held fixed;
  motion share: the rest (position, size and motion: what differs between clips);
  at pure noise: the colour's and the shape's shares of the clip-averaged variants (what a
    word alone tells a denoiser that does not yet know where the object is), over the same
    total.
A word whose share is small removes little error when the model reads it, so it is learnt
late: a measure of how hard each word of the caption is to bind, before any training.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from experiments.report import report
from sora_jax import configs
from sora_jax.cli.args import parse_with_config
from sora_jax.data import world as world_lib
from sora_jax.data.latents import encode_source
from sora_jax.data.pipeline import normalise_video
from sora_jax.train.autoencoders import make_autoencoder


def variant_clips(world: world_lib.WorldConfig, clips: int, seed: int) -> np.ndarray:
  """uint8 `[clips, colours, shapes, T, H, W, 3]`: one object drawn per clip (size, start
  and velocity as the world draws them), rendered in every colour and shape."""
  rng = np.random.default_rng(seed)
  frames, height, width = world.frames, world.height, world.width
  scale = min(height, width)
  colours, shapes = len(world.colours), len(world.shapes)
  out = np.empty((clips, colours, shapes, frames, height, width, 3), np.uint8)
  for i in range(clips):
    radius = float(rng.uniform(*world.size_range) * scale)
    start = rng.uniform([radius, radius], [width - radius, height - radius])
    direction = world.directions[int(rng.integers(len(world.directions)))]
    speed = world.speeds[int(rng.integers(len(world.speeds)))][1]
    velocity = np.asarray(world_lib.DIRECTIONS[direction]) * speed * scale
    path = world_lib.simulate(start, velocity, radius, frames, height, width)[None]
    for c in range(colours):
      for s in range(shapes):
        out[i, c, s] = world_lib.render(world, np.array([c]), np.array([s]),
                                        np.array([radius], np.float32), path, height, width)
  return out


def shares(values: np.ndarray) -> dict[str, float]:
  """`values [clips, colours, shapes, ...]` -> the colour, shape and motion shares of their
  total variance (module docstring) and the total variance per value."""
  flat = values.reshape(values.shape[:3] + (-1,)).astype(np.float64)
  total = flat.var(axis=(0, 1, 2)).sum()
  colour = flat.var(axis=1).mean(axis=(0, 1)).sum()
  shape = flat.var(axis=2).mean(axis=(0, 1)).sum()
  blind = flat.mean(axis=0)                      # [colours, shapes, values]: no position
  return {"colour_share": colour / total, "shape_share": shape / total,
          "motion_share": 1.0 - (colour + shape) / total,
          "colour_share_at_noise": blind.var(axis=0).mean(axis=0).sum() / total,
          "shape_share_at_noise": blind.var(axis=1).mean(axis=0).sum() / total,
          "variance_per_value": total / flat.shape[-1]}


def encode_all(autoencoder, videos: np.ndarray, batch: int) -> np.ndarray:
  """uint8 `[..., T, H, W, 3]` -> normalised latents `[..., T', H', W', C']`, `batch` clips
  per call (`data.latents.encode_source`, the encoder of `encode-dataset`)."""
  lead, clips = videos.shape[:-4], videos.reshape((-1,) + videos.shape[-4:])
  records = encode_source(autoencoder, [{"video": clip, "caption": ""} for clip in clips],
                          batch)
  latents = np.stack([record["latent"] for record in records])
  return latents.reshape(lead + latents.shape[1:])


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="A config naming the world (overrides as --config.KEY=VALUE).")
  parser.add_argument("--vae", action="append", default=[],
                      help="a train-vae workdir whose latents to measure (repeatable)")
  parser.add_argument("--clips", type=int, default=64, help="clips (motions) drawn")
  parser.add_argument("--batch", type=int, default=24, help="videos per encode call")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="attribute_share.json", help="JSON output")
  args, config = parse_with_config(parser, argv, lock=False)
  if args.clips < 2 or args.batch < 1:
    parser.error("--clips must be at least 2 and --batch positive.")
  world = configs.world_config(config)
  videos = variant_clips(world, args.clips, args.seed)
  spaces = [("pixels", normalise_video(videos))]
  for workdir in args.vae:
    section = config.autoencoder.copy_and_resolve_references()
    section.update(name="vae", workdir=workdir)
    autoencoder = make_autoencoder(section)
    spaces.append((f"latents of {workdir}", encode_all(autoencoder, videos, args.batch)))
  rows = [{"space": name, "shape": list(values.shape[3:]), **shares(values)}
          for name, values in spaces]
  number = lambda k: (lambda r: f"{r[k]:.3f}")  # noqa: E731
  columns = [("space", lambda r: r["space"]),
             ("values per clip", lambda r: "x".join(map(str, r["shape"]))),
             ("colour share", number("colour_share")), ("shape share", number("shape_share")),
             ("motion share", number("motion_share")),
             ("colour share at pure noise", number("colour_share_at_noise")),
             ("shape share at pure noise", number("shape_share_at_noise")),
             ("shape / colour", lambda r: f"{r['shape_share'] / r['colour_share']:.3f}")]
  report(rows, columns, args.out, clips=args.clips, seed=args.seed,
         world={"frames": world.frames, "height": world.height, "width": world.width,
                "colours": list(world.colours), "shapes": list(world.shapes)})


if __name__ == "__main__":
  main()
