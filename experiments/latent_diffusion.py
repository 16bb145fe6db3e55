"""Latent vs. pixel diffusion on the procedural world: step time side by side, and the
colour adherence of trained models.

  python -m experiments.latent_diffusion --vae runs/vae \
      [--latents runs/latents] [--latent-run runs/latent] [--pixel-run runs/demo] \
      [--steps 20] [--out latent_diffusion.json]

In one process it times the train step (median of --steps after warm-up, synthetic
batches of each config's shape) of `configs/world_tiny.py` (pixels: 8x32x32 clips,
256 tokens), of `configs/world_tiny.py:latent` encoding pixels with the VAE inside the
step, and of the same reading cached latents (9x32x32 clips -> [3, 4, 4, 16], 48
tokens). For trained runs given, it samples the demo's 40 one-object prompts and
scores the dominant colour (`sora_jax.evaluation.colour`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from experiments.step_timing import time_sora_jax
from experiments.report import report
from sora_jax.demo import evaluate_colour
from sora_jax.sample import Sampler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))
import world_tiny  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def setups(vae: str, latents: str) -> list[tuple[str, object]]:
  pixel = world_tiny.get_config()
  on_the_fly = world_tiny.get_config("latent")
  on_the_fly.autoencoder.workdir = vae
  cached = world_tiny.get_config("latent")
  cached.autoencoder.workdir = vae
  cached.data.latents_dir = latents or "cached"    # the step only needs to know it is set
  return [("pixels (8x32x32, patch 2x4x4)", pixel),
          ("VAE latents, encoded in the step", on_the_fly),
          ("VAE latents, cached (encode-dataset)", cached)]


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vae", required=True, help="A train-vae workdir.")
  parser.add_argument("--latents", default="", help="The encode-dataset output directory.")
  parser.add_argument("--pixel-run", default="", help="A trained pixel run (the demo's).")
  parser.add_argument("--latent-run", default="", help="A trained latent run.")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--samples", type=int, default=40)
  parser.add_argument("--out", default="latent_diffusion.json")
  args = parser.parse_args(argv)

  rows = []
  for name, config in setups(args.vae, args.latents):
    result = time_sora_jax(config, steps=args.steps)
    rows.append({"setup": name, "step_s": result["step_s"],
                 "tokens_per_example": result["tokens_per_step"] // config.data.batch_size,
                 "compile_s": result["compile_s"], "device": result["device_kind"]})
  for row in rows:
    row["time_vs_pixels"] = row["step_s"] / rows[0]["step_s"]
  for row, run in ((rows[0], args.pixel_run), (rows[2], args.latent_run)):
    if run:
      sampler = Sampler.from_workdir(run)
      row["colour_score"] = evaluate_colour(sampler, args.samples, 1234)["score"]
      row["run"] = run
  report(rows, [
      ("setup", lambda r: r["setup"]),
      ("tokens per clip", lambda r: str(r["tokens_per_example"])),
      ("step (ms, median)", lambda r: f"{1e3 * r['step_s']:.1f}"),
      ("time vs pixels", lambda r: f"{r['time_vs_pixels']:.2f}x"),
      ("colour score", lambda r: f"{r['colour_score']:.1%}" if "colour_score" in r else "-"),
  ], args.out, vae=args.vae)


if __name__ == "__main__":
  main()
