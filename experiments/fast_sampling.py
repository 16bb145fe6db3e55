"""Fast sampling against quality: the full-step CFG teacher, DPM-Solver++ at fewer steps,
and step caching at several thresholds, on one run, side by side in one run.

  python -m experiments.fast_sampling --workdir runs/demo [--prompts 40] \
      [--samples-per-prompt 1] [--steps 50] [--dpm-steps 8,12,20] \
      [--thresholds 0.03,0.06,0.12,0.25] [--calibration-prompts 8] [--out FILE.json]

Every row samples ShapesBench's held-out prompts (`experiments/shapes_bench.py`: the
same prompts and seeds for every row) and reports the adherence metrics, hallucinated
frames, appear/vanish events and the physics residual, the benchmark's one-number score,
the transformer calls per video (evaluations; each runs the guidance passes batched) and
the wall time per video after the row's compilation (one warm-up call first).

Step caching (`sora_jax.diffusion.step_cache`) is calibrated first on
`--calibration-prompts` prompts of one object (not the benchmark's), for the teacher's
solver, steps and schedule, and stored in the workdir (`step_cache.json`). The
distilled few-step students and CFG distillation of issue 26 are not built yet: no rows.
Writes the table, a JSON file (default `<workdir>/fast_sampling.json`) and a
quality-vs-time plot beside it.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

from experiments.report import pyplot, report, save_figure
from experiments.shapes_bench import cell, run_bench
from sora_jax import configs
from sora_jax.evaluation import bench
from sora_jax.evaluation.colour import single_object_prompts
from sora_jax.sample import Sampler

METRICS = ("colour", "shape", "direction", "count", "hallucinated_frames", "appear_vanish",
           "physics")


def _floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v]


def variants(args) -> list[tuple[str, dict]]:
  """`(name, sampling options)` of every row, the teacher first."""
  teacher = dict(steps=args.steps, solver=args.solver, cache_threshold=0.0)
  rows = [(f"teacher: {args.solver}, {args.steps} steps", teacher)]
  rows += [(f"dpmpp_2m, {n} steps", dict(steps=n, solver="dpmpp_2m", cache_threshold=0.0))
           for n in (int(v) for v in args.dpm_steps.split(",") if v)]
  rows += [(f"teacher + step caching, threshold {th:g}", dict(teacher, cache_threshold=th))
           for th in _floats(args.thresholds)]
  return rows


def measure(sampler: Sampler, name: str, options: dict, args) -> dict:
  """One row: ShapesBench of these options, calls and seconds per video."""
  opts = sampler.options(**options)
  skips = sampler.cache_skips(opts) or ()
  calls = opts.evaluations - sum(skips)
  # The row's compilation outside the timing: one call at the benchmark's batch size.
  sampler.generate(["a red circle moves left"], [0], **options)
  start = time.perf_counter()
  result = run_bench(sampler, args.prompts, args.samples_per_prompt, args.seed, **options)
  seconds = (time.perf_counter() - start) / len(result["rows"])
  summary = result["model"]
  return {"variant": name, "options": options, "transformer_calls": calls,
          "evaluations": opts.evaluations, "seconds_per_video": seconds,
          "score": bench.score(summary), **{m: summary[m] for m in METRICS},
          "ground_truth_score": bench.score(result["ground_truth"])}


def write_plot(path: str, rows: list[dict]) -> str | None:
  plt = pyplot()
  if plt is None:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for row in rows:
    ax.scatter(row["seconds_per_video"], row["score"])
    ax.annotate(row["variant"], (row["seconds_per_video"], row["score"]), fontsize=6)
  ax.set_xlabel("seconds per video (after compilation)")
  ax.set_ylabel("ShapesBench score")
  save_figure(fig, path)
  return path


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the comparison; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--prompts", type=int, default=40)
  parser.add_argument("--samples-per-prompt", type=int, default=1)
  parser.add_argument("--steps", type=int, default=50, help="the teacher's steps")
  parser.add_argument("--solver", default="euler", help="the teacher's solver")
  parser.add_argument("--dpm-steps", default="8,12,20")
  parser.add_argument("--thresholds", default="0.03,0.06,0.12,0.25")
  parser.add_argument("--calibration-prompts", type=int, default=8)
  parser.add_argument("--seed", type=int, default=2024)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.workdir, "fast_sampling.json")

  sampler = Sampler.from_workdir(args.workdir)
  if _floats(args.thresholds):
    prompts = [p.text for p in single_object_prompts(configs.world_config(sampler.config),
                                                     args.calibration_prompts, seed=7)]
    sampler.calibrate_cache(prompts, list(range(len(prompts))), steps=args.steps,
                            solver=args.solver)
    print(f"Calibrated step caching on {len(prompts)} prompts: "
          f"{sampler.save_cache_calibration(args.workdir)}")
  rows = [measure(sampler, name, options, args) for name, options in variants(args)]
  teacher = rows[0]
  for row in rows:
    row["calls_vs_teacher"] = teacher["transformer_calls"] / row["transformer_calls"]
    row["score_vs_teacher"] = row["score"] / teacher["score"] - 1.0 if teacher["score"] else None
  columns = [("variant", lambda r: r["variant"]),
             ("calls", lambda r: f"{r['transformer_calls']} ({r['calls_vs_teacher']:.2f}x fewer)"),
             ("s/video", lambda r: f"{r['seconds_per_video']:.3f}"),
             ("score", lambda r: f"{r['score']:.3f}"),
             ("vs teacher", lambda r: cell(r["score_vs_teacher"]))]
  columns += [(m, lambda r, m=m: cell(r[m])) for m in METRICS]
  plot = write_plot(os.path.splitext(out)[0] + ".png", rows)
  report(rows, columns, out, workdir=args.workdir, prompts=args.prompts,
         samples_per_prompt=args.samples_per_prompt, seed=args.seed, plot=plot,
         not_measured="distilled few-step students, CFG distillation (not built yet); FVD")


if __name__ == "__main__":
  main()
