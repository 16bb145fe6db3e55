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
                   `prompting.extension_context` given frames per window: share of frames whose
                   per-colour object counts equal frame 0's; the same on real clips rendered
                   4x as long (the ceiling: occlusions merge objects).
  connect / loop   A's end into B's start, for two different clips (one window, and
                   three: A extended forwards, B backwards, one window joining them) and
                   for a clip's start and its own continuation (B starts as many frames
                   after A's end as the transition makes, so the clip's own frames are a
                   transition that exists): mean absolute pixel difference (0-255) of the
                   step from the last generated frame into B as the output shows it, the
                   largest step from A's last frame to B's end, and how far the output's
                   B is from the input (`connect`'s handover shows the window's decoding of
                   B's first frames; `--verbatim`'s step to the input's B is reported too),
                   next to consecutive frames of real clips. Within a clip, also the
                   distance to the clip's own frames. Loops: the step back to the start and
                   the largest step around the loop.
  given frame      how much the image changes in the image-to-video output (0 for a pixel
                   model; the VAE's reconstruction error for a latent one).

Prints a markdown table and writes `prompting.json` in the workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Sequence

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


def frame_steps(video: np.ndarray) -> list[float]:
  """`mean_abs` between each pair of consecutive frames of `video [N, T, H, W, 3]`: `[T - 1]`."""
  return [mean_abs(video[:, i + 1], video[:, i]) for i in range(video.shape[1] - 1)]


def junction_rows(row, mode: str, joined: np.ndarray, first_frames: int, second: np.ndarray,
                  consecutive: float) -> None:
  """Rows for a connection `joined [N, T + gap + T2, H, W, 3]` (A: `first_frames` = T) into
  `second [N, T2, H, W, 3]`: the step from the last generated frame into B as the output
  shows it, the largest step from A's last frame to the end, and how far the output's B
  is from the input (the handover shows the window's decoding of B's first frames)."""
  t2 = second.shape[1]
  span = joined[:, first_frames - 1:]                   # A's last frame, the gap, B
  steps = frame_steps(span)
  row(mode, "mean abs diff: last generated frame vs B's first, as output (0-255)",
      steps[span.shape[1] - t2 - 1], consecutive, "consecutive real frames")
  row(mode, "largest mean abs diff between consecutive frames, A's last to B's end",
      max(steps), consecutive, "consecutive real frames")
  row(mode, "output's B vs the input's: mean abs diff, first frame (ref.: all frames)",
      mean_abs(joined[:, -t2], second[:, 0]), mean_abs(joined[:, -t2:], second),
      "all of B's frames")


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the measurements (`argv`: the command line's arguments; default `sys.argv`)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--clips", type=int, default=64, help="Held-out clips per measurement.")
  parser.add_argument("--extend-clips", type=int, default=32)
  parser.add_argument("--direction-frames", type=int, default=4,
                      help="Frames over which a track's direction is read.")
  parser.add_argument("--solver", default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--image-cfg-scale", type=float, default=None)
  parser.add_argument("--given-guidance", type=float, default=None,
                      help="Reconstruction guidance weight (default: the run's config).")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  sampler = Sampler.from_workdir(args.workdir)
  if not sampler.conditioned:
    raise SystemExit(f"{args.workdir}: the model was trained without frame conditioning.")
  world = configs.world_config(sampler.config)
  options = dict(solver=args.solver, steps=args.steps, image_cfg_scale=args.image_cfg_scale,
                 given_guidance=args.given_guidance)
  frames, context = world.frames, prompting.extension_context(sampler, at_end=False)
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

  # Connecting clip i to clip i + 1 (different scenes), and looping clip i.
  captions = [c["caption"] for c in clips[:n]]
  a, b = videos[:n], np.roll(videos[:n], -1, axis=0)
  consecutive = mean_abs(videos[:, 1:], videos[:, :-1])
  for windows in (1, 3):
    joined = prompting.connect(sampler, captions, a, b, seeds[:n], windows=windows, **options)
    gap = joined.shape[1] - 2 * frames
    junction_rows(row, f"connect A -> B, {windows} window(s) ({gap} frames)", joined, frames,
                  b, consecutive)
    if windows == 1:
      verbatim = prompting.connect(sampler, captions, a, b, seeds[:n], handover=False,
                                   **options)
      row("connect A -> B, 1 window(s), --verbatim",
          "mean abs diff: last generated frame vs B's first (0-255)",
          mean_abs(verbatim[:, -frames - 1], b[:, 0]), consecutive, "consecutive real frames")
      row("connect A -> B", "mean abs diff: A's last frame vs B's first (no transition)",
          mean_abs(a[:, -1], b[:, 0]), consecutive, "consecutive real frames")
  # Connecting a clip's start to its own continuation: B begins as many frames after A's
  # end as the transition makes, so a transition that follows the world exists (the clip's
  # own frames between) and the whole can be as smooth as real motion.
  for windows in (1, 3):
    gap = prompting.transition_frames(sampler, windows=windows)
    whole = np.stack([c["video"] for c in held_out(world, n, frames=2 * frames + gap)])
    start, truth, end = whole[:, :frames], whole[:, frames:frames + gap], whole[:, frames + gap:]
    joined = prompting.connect(sampler, captions, start, end, seeds[:n], windows=windows,
                               **options)
    mode = f"connect a clip to its own continuation, {windows} window(s) ({gap} frames)"
    junction_rows(row, mode, joined, frames, end, consecutive)
    row(mode, "mean abs diff: generated frames vs the clip's own",
        mean_abs(joined[:, frames:frames + gap], truth), mean_abs(truth, start[:, -1:]),
        "A's last frame held")
  looped = prompting.loop(sampler, captions, a, seeds[:n], **options)
  steps = frame_steps(np.concatenate([looped, looped[:, :1]], axis=1))   # around the ring
  row("loop", "mean abs diff: last generated frame vs the first (0-255)", steps[-1],
      consecutive, "consecutive real frames")
  row("loop", "largest mean abs diff between consecutive frames, around the loop", max(steps),
      consecutive, "consecutive real frames")
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
