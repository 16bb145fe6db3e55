"""Prompting a trained model with images and videos, measured on held-out clips of the world.

  python -m experiments.prompting --workdir runs/demo [--clips 64] [--solver euler]

The clips are the world's held-out split (`render_example` at the test seeds). Measured
with the deterministic trackers of `sora_jax.evaluation.tracking`:

  image-to-video   frame 0 of a clip + its caption: does each object (one per colour)
                   move the way the caption says over the first frames? Also with every
                   direction in the caption reversed (the frame alone cannot tell the model
                   where to go: only the text can), and the trackers on the real clips (the
                   ceiling: bounces and occlusions fool the tracker there too).
  extension        clips extended forwards to 4x the training length with
                   `sample.context_frames` given frames per window: share of frames whose
                   per-colour object counts equal frame 0's; the same on real clips rendered
                   4x as long (the ceiling: occlusions merge objects).
  connect / loop   A's end into B's start (and a clip into itself): mean absolute pixel
                   difference (0-255) between the transition's last frame and B's first,
                   next to consecutive frames of real clips and the jump from A to B;
                   also for transitions over three windows (A extended forwards, B
                   backwards, one window joining them): both ends and the largest jump.
  given frame      how much the image changes in the image-to-video output (0 for a pixel
                   model; the VAE's reconstruction error for a latent one). Extension,
                   loops and connections return their input videos verbatim around the
                   new frames.

Prints a markdown table and writes `prompting.json` in the workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from experiments.report import report
from sora_jax import configs, prompting
from sora_jax.data.world import SPLIT_SEEDS, caption_for, render_example
from sora_jax.evaluation import tracking
from sora_jax.sample import Sampler

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def held_out(world, count: int, frames: int | None = None) -> list[dict]:
  """The first `count` held-out clips (optionally rendered with `frames` frames)."""
  w = world if frames is None else dataclasses.replace(world, frames=frames)
  return [render_example(w, SPLIT_SEEDS["test"] + i) for i in range(count)]


def caption_with(example: dict, world, directions: list[str]) -> str:
  return caption_for([{"colour": world.colours[c], "shape": world.shapes[s], "direction": d,
                       "speed": ""} for c, s, d in zip(example["colour"], example["shape"],
                                                       directions)])


def direction_accuracy(videos: np.ndarray, clips: list[dict], wanted: list[list[str]], world,
                       frames: int) -> float:
  hits = []
  for video, clip, dirs in zip(videos, clips, wanted):
    labels = tracking.world_labels(video, world)
    for k in tracking.unique_colour_objects(clip["colour"]):
      found = tracking.direction_of(tracking.centroids(labels, int(clip["colour"][k])), frames)
      hits.append(found == dirs[k])
  return float(np.mean(hits)) if hits else float("nan")


def count_constancy(videos: np.ndarray, world) -> float:
  shares = [tracking.constant_share(tracking.object_counts(tracking.world_labels(v, world),
                                                           len(world.colours)))
            for v in videos]
  return float(np.mean(shares))


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--clips", type=int, default=64, help="Held-out clips per measurement.")
  parser.add_argument("--extend-clips", type=int, default=32)
  parser.add_argument("--direction-frames", type=int, default=4,
                      help="Frames over which a track's direction is read.")
  parser.add_argument("--solver", default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--image-cfg-scale", type=float, default=None)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  sampler = Sampler.from_workdir(args.workdir)
  if not sampler.conditioned:
    raise SystemExit(f"{args.workdir}: the model was trained without frame conditioning.")
  world = configs.world_config(sampler.config)
  options = dict(solver=args.solver, steps=args.steps, image_cfg_scale=args.image_cfg_scale)
  frames, context = world.frames, int(sampler.config.sample.context_frames)
  clips = held_out(world, args.clips)
  videos = np.stack([c["video"] for c in clips])
  seeds = list(range(len(clips)))
  truth = [[tracking.direction_name(*v) for v in c["velocity"]] for c in clips]
  reversed_dirs = [[OPPOSITE[d] for d in dirs] for dirs in truth]
  rows, started = [], time.perf_counter()

  def row(mode, metric, value, reference=None, reference_name=""):
    rows.append({"mode": mode, "metric": metric, "value": value, "reference": reference,
                 "reference_name": reference_name})
    ref = "" if reference is None else f" (reference {reference:.3g}: {reference_name})"
    print(f"{mode}: {metric} = {value:.3g}{ref}", flush=True)

  # Image-to-video, with the clip's own caption and with every direction reversed.
  gen = prompting.image_to_video(sampler, [c["caption"] for c in clips], videos[:, 0], seeds,
                                 **options)
  flipped = prompting.image_to_video(
      sampler, [caption_with(c, world, d) for c, d in zip(clips, reversed_dirs)],
      videos[:, 0], seeds, **options)
  ceiling = direction_accuracy(videos, clips, truth, world, args.direction_frames)
  row("image-to-video", "direction accuracy (caption)",
      direction_accuracy(gen, clips, truth, world, args.direction_frames), ceiling,
      "tracker on the real clips")
  row("image-to-video", "direction accuracy (reversed caption)",
      direction_accuracy(flipped, clips, reversed_dirs, world, args.direction_frames), ceiling,
      "tracker on the real clips")
  given_change = np.abs(np.concatenate([gen[:, 0], flipped[:, 0]]).astype(np.float32)
                        - np.concatenate([videos[:, 0]] * 2))

  # Extension to 4x the training length.
  n = min(args.extend_clips, len(clips))
  times = -(-3 * frames // (frames - context))                   # windows to reach >= 4x
  long = prompting.extend(sampler, [c["caption"] for c in clips[:n]], videos[:n], seeds[:n],
                          times=times, **options)
  real_long = np.stack([c["video"] for c in held_out(world, n, frames=long.shape[1])])
  row(f"extend x{long.shape[1] / frames:g} ({long.shape[1]} frames)",
      "share of frames with frame 0's object counts", count_constancy(long, world),
      count_constancy(real_long, world), "real clips as long")

  # Connecting clip i to clip i + 1, and looping clip i.
  a, b = videos[:n], np.roll(videos[:n], -1, axis=0)
  joined = prompting.connect(sampler, [c["caption"] for c in clips[:n]], a, b, seeds[:n],
                             **options)
  gap_end = joined[:, -frames - 1]                               # last generated frame
  consecutive = mean_abs(videos[:, 1:], videos[:, :-1])
  row("connect A -> B", "mean abs diff: last generated frame vs B's first (0-255)",
      mean_abs(gap_end, b[:, 0]), consecutive, "consecutive real frames")
  row("connect A -> B", "mean abs diff: A's last frame vs B's first (no transition)",
      mean_abs(a[:, -1], b[:, 0]), consecutive, "consecutive real frames")
  # The same over three windows: A extended forwards, B backwards, a window joining them.
  long_gap = prompting.transition(sampler, [c["caption"] for c in clips[:n]], a, b, seeds[:n],
                                  windows=3, **options)
  seam = np.concatenate([a[:, -1:], long_gap, b[:, :1]], axis=1)   # A's end, gap, B's start
  steps = [mean_abs(seam[:, i + 1], seam[:, i]) for i in range(seam.shape[1] - 1)]
  mode = f"connect A -> B, 3 windows ({long_gap.shape[1]} frames)"
  row(mode, "mean abs diff: last generated frame vs B's first (0-255)", steps[-1], consecutive,
      "consecutive real frames")
  row(mode, "mean abs diff: A's last frame vs the first generated", steps[0], consecutive,
      "consecutive real frames")
  row(mode, "largest mean abs diff between consecutive frames", max(steps), consecutive,
      "consecutive real frames")
  looped = prompting.loop(sampler, [c["caption"] for c in clips[:n]], a, seeds[:n], **options)
  row("loop", "mean abs diff: last generated frame vs the first (0-255)",
      mean_abs(looped[:, -1], a[:, 0]), consecutive, "consecutive real frames")
  row("image-to-video", "given frame in the output: mean / max abs change (0-255)",
      float(given_change.mean()), float(given_change.max()), "max")

  report(rows, [("mode", lambda r: r["mode"]), ("metric", lambda r: r["metric"]),
                ("value", lambda r: f"{r['value']:.3g}"),
                ("reference", lambda r: "" if r["reference"] is None else
                 f"{r['reference']:.3g} ({r['reference_name']})")],
         args.out or os.path.join(args.workdir, "prompting.json"), workdir=args.workdir,
         clips=len(clips), extend_clips=n, context_frames=context,
         sampling=dataclasses.asdict(sampler.options(**options)),
         seconds=time.perf_counter() - started)


if __name__ == "__main__":
  main()
