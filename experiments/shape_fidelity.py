"""Can a trained run keep a shape it is given, and take the shape its caption names?

  python -m experiments.shape_fidelity --workdir runs/demo [--clips 24] \
      [--strengths 0.05,0.2,0.5,1] [--steps 24] [--out runs/demo/shape_fidelity.json]

Edits (SDEdit, `Sampler.generate(source_video=..., strength=...)`) held-out one-object
world clips at several strengths, twice: under each clip's own caption, and under the
caption with its shape word replaced by the next shape of the world. ShapesBench's
trackers (`evaluation.bench.video_metrics`) read each edited clip's object; per strength
the table gives the flow time the edit starts from (at `sample.shift`; a run trained
with `flow.shift_base_tokens` samples at that shift scaled by its token count), the PSNR
of the edits against their sources, the share whose object keeps the source's shape (own caption), and the share
whose object takes the swapped caption's shape. A model that draws the shapes it is given
keeps them at small strengths; one that follows the shape word takes the swapped shape at
large ones (strength 1: text to video, the source unused).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

import numpy as np

from experiments.report import report
from sora_jax import configs
from sora_jax.data.world import SPLIT_SEEDS, render_example
from sora_jax.evaluation import bench
from sora_jax.evaluation.reconstruction import psnr_uint8
from sora_jax.sample import Sampler, edit_times


def one_object_clips(world, count: int, offset: int = 1000):
  """`count` held-out clips with one object each (test-split seeds from `offset` on):
  `(videos [N, T, H, W, 3] uint8, captions, prompts)`."""
  videos, captions, prompts = [], [], []
  seed = SPLIT_SEEDS["test"] + offset
  while len(videos) < count:
    example = render_example(world, seed)
    seed += 1
    if int(example["num_objects"]) == 1:
      videos.append(example["video"])
      captions.append(example["caption"])
      prompts.append(bench.prompt_objects(example, world))
  return np.stack(videos), captions, prompts


def swapped(caption: str, prompt: Sequence[bench.PromptObject], shapes: Sequence[str]):
  """The caption and prompt with the object's shape replaced by the world's next shape."""
  (obj,) = prompt
  other = shapes[(shapes.index(obj.shape) + 1) % len(shapes)]
  return (caption.replace(f" {obj.shape} ", f" {other} ", 1),
          [dataclasses.replace(obj, shape=other)])


def shape_share(videos: np.ndarray, prompts, world) -> float:
  """Share of `videos` whose prompted object the trackers read as the prompt's shape
  (a video whose object is never whole counts as not)."""
  return float(np.mean([bench.video_metrics(v, p, world)["shape"] == 1.0
                        for v, p in zip(videos, prompts)]))


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="A trained pixel-space world run.")
  parser.add_argument("--clips", type=int, default=24, help="one-object held-out clips")
  parser.add_argument("--strengths", default="0.05,0.2,0.5,1",
                      help="comma-separated shares of the sampling steps the edit runs")
  parser.add_argument("--steps", type=int, default=None, help="sampling steps (run default)")
  parser.add_argument("--out", default=None, help="JSON (default: WORKDIR/shape_fidelity.json)")
  args = parser.parse_args(argv)
  strengths = [float(s) for s in args.strengths.split(",") if s]
  if not strengths or min(strengths) <= 0 or max(strengths) > 1:
    parser.error(f"--strengths={args.strengths!r}: expected values in (0, 1].")

  sampler = Sampler.from_workdir(args.workdir)
  world = configs.world_config(sampler.config)
  videos, captions, prompts = one_object_clips(world, args.clips)
  other = [swapped(c, p, list(world.shapes)) for c, p in zip(captions, prompts)]
  options = sampler.options(steps=args.steps)
  seeds = list(range(len(videos)))
  rows = []
  for strength in strengths:
    own = sampler.generate(captions, seeds, source_video=videos, strength=strength,
                           steps=options.steps)
    swap = sampler.generate([c for c, _ in other], seeds, source_video=videos,
                            strength=strength, steps=options.steps)
    start = float(edit_times(options.steps, options.shift, strength, options.schedule)[0])
    rows.append({"strength": strength, "start_time": start, "psnr_db": psnr_uint8(own, videos),
                 "source_shape_kept": shape_share(own, prompts, world),
                 "swapped_shape_taken": shape_share(swap, [p for _, p in other], world)})
  report(rows, [("strength", lambda r: f"{r['strength']:g}"),
                ("starts at flow time", lambda r: f"{r['start_time']:.3f}"),
                ("PSNR vs source (dB)", lambda r: f"{r['psnr_db']:.1f}"),
                ("source shape kept", lambda r: f"{r['source_shape_kept']:.3f}"),
                ("swapped caption's shape taken", lambda r: f"{r['swapped_shape_taken']:.3f}")],
         args.out or os.path.join(args.workdir, "shape_fidelity.json"),
         workdir=args.workdir, clips=len(videos), steps=options.steps, shift=options.shift)


if __name__ == "__main__":
  main()
