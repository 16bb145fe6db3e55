"""A minute of the procedural world: autoregressive streaming against sliding-window
extension, from two models trained on the same data with the same budget.

  python -m experiments.long_video --causal runs/long_causal --bidirectional runs/long_bidi \
      [--student runs/long_causal_4step] [--seconds 60] [--prompts 4] [--steps 24] \
      [--lengths 2,8,32,60] [--out FILE.json]

(configs/world_long.py trains both.) For `--prompts` clips of the world rendered
`--seconds` long (seeds 10000, 10001, ...: their captions are the prompts, the clips the
ground truth), each model makes a video of that length:

  (a) sliding windows: the bidirectional model generates its first clip from the text, then
      `prompting.extend` adds windows, each given the last `sample.context_frames` frames;
  (b) autoregressive: the block-causal model streams chunks after its rolling KV cache
      (`sora_jax.autoregressive.stream`);
  (c) with `--student` (repeatable): a few-step causal student (`sora-jax distill
      --config.distill.method=causal`) of the causal run, or of a bidirectional run with
      `distill.causal_frames` (labelled so), streams the same way at its own step count.

`--bidirectional` may be left out (then (a) is not made).

ShapesBench scores every second of every video and of the ground truth
(`sora_jax.evaluation.long_video`): the per-second curves of count, colour, shape,
hallucinated frames, appear/vanish, permanence (track continuity through occlusion) and
the physics residual, the share of seconds whose identity holds, and each curve's drift
(last second against the first ten). Timing: wall time per video, time to first frames,
frames per second after them, and the time per later window or chunk (its first ten
against its last ten: constant when the cost per part does not grow). Memory against
length (the main videos at `--seconds`, and `--lengths` seconds more): the resident memory
of this process while each model makes a video of that length (its peak minus its value
before, sampled every 10 ms; for the main videos, the largest after the first) and how
many functions each sampler has compiled (one per chunk or window shape: none new as the
video grows).

Writes the table, a JSON file (default `<causal>/long_video.json`) and the curves plotted
beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import time
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from experiments.report import pyplot, report, save_figure
from experiments.shapes_bench import cell
from sora_jax import autoregressive, configs, prompting
from sora_jax.data.world import render_example
from sora_jax.evaluation import long_video
from sora_jax.evaluation.bench import prompt_objects
from sora_jax.sample import Sampler

SEED_BASE = 10_000


def resident_bytes() -> int:
  """This process's resident memory now (Linux `/proc/self/statm`)."""
  with open("/proc/self/statm", encoding="utf-8") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
  """Samples the resident memory every 10 ms in a thread while in the `with` block:
  `peak_bytes` is the largest increase over its value on entry."""

  def __enter__(self) -> "PeakMemory":
    self.start, self.peak_bytes, self._stop = resident_bytes(), 0, threading.Event()

    def sample():
      while not self._stop.is_set():
        self.peak_bytes = max(self.peak_bytes, resident_bytes() - self.start)
        time.sleep(0.01)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak_bytes = max(self.peak_bytes, resident_bytes() - self.start)


@dataclasses.dataclass
class Made:
  """A generated video `[T, H, W, 3]` and its timings: seconds to the first frames, frames
  per second after them, and the seconds of each later part (window or chunk)."""
  video: np.ndarray
  wall_s: float
  first_frames_s: float
  frames_per_s: float | None
  part_s: list[float]


def sliding_windows(sampler: Sampler, prompt: str, seed: int, frames: int,
                    steps: int | None) -> Iterator[np.ndarray]:
  """(a): the first clip from the text, then one extension window at a time (each yields
  its new frames), until `frames` frames exist."""
  video = sampler.generate([prompt], [seed], steps=steps)
  yield video[0]
  made = video.shape[1]
  while made < frames:
    longer = prompting.extend(sampler, [prompt], video, [seed + 1 + made], steps=steps)
    new = longer[0, video.shape[1]:]
    video = longer[:, -sampler.config.world.frames:]   # only the last window is needed
    made += len(new)
    yield new


def streamed(sampler: Sampler, prompt: str, seed: int, frames: int,
             steps: int | None) -> Iterator[np.ndarray]:
  """(b), (c): a causal model's chunks (`steps` None: its `sample.steps`)."""
  yield from autoregressive.stream(sampler, prompt, seed, frames=frames, steps=steps)


def make(chunks: Callable[[], Iterator[np.ndarray]], frames: int) -> Made:
  """Runs a generator of frame chunks to `frames` frames, timing it."""
  start = last = time.perf_counter()
  parts, first, after, part_s = [], None, 0, []
  for part in chunks():
    parts.append(part)
    now = time.perf_counter()
    if first is None:
      first = now - start
    else:
      after += len(part)
      part_s.append(now - last)
    last = now
  wall = time.perf_counter() - start
  video = np.concatenate(parts)[:frames]
  rest = wall - first
  return Made(video, wall, first, after / rest if after and rest > 0 else None, part_s)


def student_variant(config: ml_collections.ConfigDict) -> str:
  """The row of a distilled student (its run's config): its steps, its teacher's kind and
  its stage ("autoregressive, 4-step student, distribution-matched"; "... on 40-block
  rollouts" with extended DMD)."""
  distilled = configs.typed(config).distill
  of = " of the bidirectional teacher" if distilled.causal_frames else ""
  own = ", after its own past" if distilled.past == "student" else ""
  own = ", distribution-matched" if distilled.method == "dmd" else own
  if distilled.method == "dmd" and distilled.dmd_rollout_blocks:
    own += f" on {distilled.dmd_rollout_blocks}-block rollouts"
  return f"autoregressive, {config.sample.steps}-step student{of}{own}"


def curve_rows(name: str, rows_per_video: list[list[dict[str, Any]]]) -> dict[str, Any]:
  """One table row: the mean over videos of the long-video summary."""
  summaries = [long_video.summary(rows) for rows in rows_per_video]

  def mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None

  row = {"variant": name, "videos": len(summaries),
         "identity_held": mean([s["identity_held"] for s in summaries])}
  for key in long_video.CURVES:
    row[f"mean_{key}"] = mean([s["mean"][key] for s in summaries])
    row[f"drift_{key}"] = mean([s["drift"][key] for s in summaries])
  curves = [long_video.curves(rows) for rows in rows_per_video]
  row["curves"] = {key: np.nanmean(np.stack([c[key] for c in curves]), axis=0).tolist()
                   for key in long_video.CURVES}
  return row


def write_plot(path: str, rows: list[dict[str, Any]]) -> str | None:
  plt = pyplot()
  if plt is None:
    return None
  keys = list(long_video.CURVES)
  fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(4 * ((len(keys) + 1) // 2), 6))
  for ax, key in zip(axes.ravel(), keys):
    for row in rows:
      values = np.asarray(row["curves"][key], float)
      ax.plot(np.arange(1, len(values) + 1), values, label=row["variant"])
    ax.set_title(key)
    ax.set_xlabel("second")
  axes.ravel()[0].legend(fontsize=7)
  for ax in axes.ravel()[len(keys):]:
    ax.axis("off")
  return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--causal", required=True, help="The block-causal run (streams).")
  parser.add_argument("--bidirectional", default="",
                      help="The bidirectional run (extended by sliding windows).")
  parser.add_argument("--student", action="append", default=[],
                      help="A few-step causal student (streams at its own steps); repeatable.")
  parser.add_argument("--seconds", type=int, default=60)
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--steps", type=int, default=24,
                      help="Solver steps of the causal and bidirectional models.")
  parser.add_argument("--lengths", default="",
                      help="Seconds at which to measure memory against length (e.g. "
                           "2,8,32,60; default: none).")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  causal = Sampler.from_workdir(args.causal)
  # (name, sampler, how it makes frames, solver steps: None for a student's own)
  variants = [("autoregressive", causal, streamed, args.steps)]
  if args.bidirectional:
    variants.insert(0, ("sliding windows", Sampler.from_workdir(args.bidirectional),
                        sliding_windows, args.steps))
  for path in args.student:
    student = Sampler.from_workdir(path)
    name = student_variant(student.config)
    if name in [v[0] for v in variants]:        # two alike: told apart by their workdirs
      name += f" ({os.path.basename(os.path.normpath(path))})"
    variants.append((name, student, streamed, None))
  world = configs.world_config(causal.config)
  fps = 8      # the world's frame rate (video_io writes it at 8)
  frames = args.seconds * fps
  long_world = dataclasses.replace(world, frames=frames, sizes=(), image_ratio=0.0)
  examples = [render_example(long_world, SEED_BASE + i) for i in range(args.prompts)]

  scored: dict[str, list[list[dict]]] = {"ground truth": [], **{v[0]: [] for v in variants}}
  timings: dict[str, list[Made]] = {v[0]: [] for v in variants}
  peaks: dict[str, list[int]] = {v[0]: [] for v in variants}
  for i, example in enumerate(examples):
    prompt, objects_ = str(example["caption"]), prompt_objects(example, world)
    scored["ground truth"].append(long_video.per_second(np.asarray(example["video"]), objects_,
                                                        world, fps))
    for name, sampler, chunks, steps in variants:
      with PeakMemory() as peak:
        made = make(lambda s=sampler, c=chunks, n=steps: c(s, prompt, SEED_BASE + i, frames, n),
                    frames)
      timings[name].append(made)
      peaks[name].append(peak.peak_bytes)
      scored[name].append(long_video.per_second(made.video, objects_, world, fps))
      print(f"{name}: video {i + 1}/{len(examples)} ({prompt!r}) in {made.wall_s:.1f} s",
            flush=True)

  samplers = {v[0]: v[1] for v in variants}
  rows = []
  for name, per_video in scored.items():
    row = curve_rows(name, per_video)
    made = timings.get(name, [])
    if made:
      # The first video of each pays its compilations; the rest are what a server sees.
      warm = made[1:] or made
      row.update(wall_s=float(np.mean([m.wall_s for m in warm])),
                 first_frames_s=float(np.mean([m.first_frames_s for m in warm])),
                 frames_per_s=float(np.mean([m.frames_per_s for m in warm
                                             if m.frames_per_s is not None])),
                 # Constant time per part: the mean of the first ten and of the last ten.
                 part_s_first10=float(np.mean([np.mean(m.part_s[:10]) for m in warm])),
                 part_s_last10=float(np.mean([np.mean(m.part_s[-10:]) for m in warm])),
                 compiled_functions=samplers[name].compiled_shapes)
    rows.append(row)

  # Memory against length: each video of the main run (at --seconds), and --lengths.
  memory = [{"variant": name, "seconds": args.seconds,
             "peak_resident_increase_mib": max(values[1:] or values) / 2 ** 20,
             "wall_s": float(np.mean([m.wall_s for m in timings[name]])),
             "compiled_functions": samplers[name].compiled_shapes}
            for name, values in peaks.items()]
  for seconds in [int(s) for s in args.lengths.split(",") if s]:
    for name, sampler, chunks, steps in variants:
      with PeakMemory() as peak:
        made = make(lambda s=sampler, c=chunks, n=steps: c(s, examples[0]["caption"], SEED_BASE,
                                                           seconds * fps, n), seconds * fps)
      memory.append({"variant": name, "seconds": seconds,
                     "peak_resident_increase_mib": peak.peak_bytes / 2 ** 20,
                     "wall_s": made.wall_s, "compiled_functions": sampler.compiled_shapes})
      print(f"memory at {seconds} s, {name}: +{peak.peak_bytes / 2 ** 20:.1f} MiB", flush=True)

  out = args.out or os.path.join(args.causal, "long_video.json")
  columns = [("variant", lambda r: r["variant"]),
             ("identity held", lambda r: cell(r["identity_held"]))]
  columns += [(f"{k} (mean / drift)", lambda r, k=k: f"{cell(r[f'mean_{k}'])} / "
               f"{cell(r[f'drift_{k}'])}") for k in long_video.CURVES]
  columns += [("s per video", lambda r: cell(r.get("wall_s"))),
              ("first frames s", lambda r: cell(r.get("first_frames_s"))),
              ("frames/s after", lambda r: cell(r.get("frames_per_s"))),
              ("s per part: first 10 / last 10", lambda r: f"{cell(r.get('part_s_first10'))} / "
               f"{cell(r.get('part_s_last10'))}")]
  report(rows, columns, out, seconds=args.seconds, prompts=args.prompts, steps=args.steps,
         fps=fps, causal=args.causal, bidirectional=args.bidirectional or None,
         students=args.student, memory=memory,
         prompts_used=[str(e["caption"]) for e in examples])
  if memory:
    print("\n| variant | seconds | peak resident increase MiB | s | compiled functions |")
    print("| --- | --- | --- | --- | --- |")
    for m in memory:
      print(f"| {m['variant']} | {m['seconds']} | {m['peak_resident_increase_mib']:.1f} | "
            f"{m['wall_s']:.1f} | {m['compiled_functions']} |")
  plot = write_plot(os.path.splitext(out)[0] + ".png", rows)
  if plot:
    print(f"Wrote {plot}")


if __name__ == "__main__":
  main()
