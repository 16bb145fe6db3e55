"""Fast sampling against quality: the full-step CFG teacher, DPM-Solver++ at fewer steps,
step caching at several thresholds and distilled students, side by side in one run.

  python -m experiments.fast_sampling --workdir runs/demo [--prompts 40] \
      [--samples-per-prompt 1] [--steps 50] [--dpm-steps 8,12,20] \
      [--thresholds 0.03,0.06,0.12,0.25] [--calibration-prompts 8] \
      [--students runs/shortcut,runs/cfg] [--student-steps 4,2,1] \
      [--fvd-extractor DIR [--train-fvd-extractor STEPS]] [--out FILE.json]

Every row samples ShapesBench's held-out prompts (`experiments/shapes_bench.py`: the
same prompts and seeds for every row) and reports the adherence metrics, hallucinated
frames, appear/vanish events, the physics residual, the benchmark's one-number score,
FVD against the held-out clips (with `--fvd-extractor`: the world's own features), the
transformer calls per video (evaluations), the forward passes per video (calls times the
guidance passes each runs batched: the transformer compute) and the wall time per video
after the row's compilation (one warm-up call first). Each row's score against the
teacher's comes with a 95% paired bootstrap interval over the videos (the same prompts
and seeds in every row; `bench.relative_score_interval`).

Step caching (`sora_jax.diffusion.step_cache`) is calibrated first on
`--calibration-prompts` prompts of one object (not the benchmark's), for the teacher's
solver, steps and schedule, and stored in the workdir (`step_cache.json`). Students
(`sora-jax distill` runs of this teacher, `--students`): a shortcut student gets a row
per `--student-steps`, a trajectory student one at the steps it learnt, a CFG-distilled
one a row at the teacher's solver and steps, one pass per step at the teacher's guidance.
Writes the table, a JSON file (default `<workdir>/fast_sampling.json`) and a
quality-vs-time plot beside it.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

from experiments.report import pyplot, report, save_figure
from experiments.shapes_bench import add_fvd_arguments, cell, fvd_scores
from sora_jax import configs
from sora_jax.evaluation import bench
from sora_jax.evaluation.colour import single_object_prompts
from sora_jax.evaluation.shapes_bench import run_bench
from sora_jax.sample import Sampler

METRICS = ("colour", "shape", "direction", "count", "hallucinated_frames", "appear_vanish",
           "physics")


def _floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v]


def variants(args, teacher_cfg: float, students: Sequence[Sampler] = ()
             ) -> list[tuple[str, Sampler | None, dict]]:
  """`(name, student sampler or None for the teacher's, sampling options)` of every row,
  the teacher first."""
  teacher = dict(steps=args.steps, solver=args.solver, cache_threshold=0.0)
  rows = [(f"teacher: {args.solver}, {args.steps} steps", None, teacher)]
  rows += [(f"dpmpp_2m, {n} steps", None, dict(steps=n, solver="dpmpp_2m", cache_threshold=0.0))
           for n in (int(v) for v in args.dpm_steps.split(",") if v)]
  rows += [(f"teacher + step caching, threshold {th:g}", None, dict(teacher, cache_threshold=th))
           for th in _floats(args.thresholds)]
  for student in students:
    t = configs.typed(student.config)
    # Several students of a method are told apart by their distillation steps and guidance.
    kind = [s for s in students if configs.typed(s.config).distill.method == t.distill.method]
    grid = f", shift {t.sample.shift:g}" if t.distill.method == "trajectory" else ""
    label = (f" ({t.train.steps} distillation steps, guidance {t.distill.cfg_scale:g}{grid})"
             if len(kind) > 1 else "")
    if t.model.step_embedding:
      counts = ([t.distill.steps] if t.distill.method == "trajectory"   # its own count only
                else [int(v) for v in args.student_steps.split(",") if v])
      rows += [(f"{t.distill.method} student{label}, {n} step{'s' if n > 1 else ''}", student,
                dict(steps=n)) for n in counts]
    elif t.model.guidance_embedding:
      rows.append((f"CFG-distilled student{label}: {args.solver}, {args.steps} steps", student,
                   dict(teacher, cfg_scale=teacher_cfg)))
    else:
      raise ValueError(f"--students: {t.distill.teacher or 'a run'} is no distilled "
                       "student (no step or guidance input).")
  return rows


def passes_per_call(sampler: Sampler, options) -> int:
  """Forward passes each transformer call runs (batched): 2 with text guidance (the
  conditional and unconditional passes), 1 without it and for distilled students."""
  model = configs.typed(sampler.config).model
  if model.step_embedding or model.guidance_embedding or options.cfg_scale == 1.0:
    return 1
  return 2


def measure(sampler: Sampler, name: str, options: dict, args) -> dict:
  """One row: ShapesBench of these options (FVD with --fvd-extractor), calls, forward
  passes and seconds per video."""
  opts = sampler.options(**options)
  skips = sampler.cache_skips(opts) or ()
  calls = opts.evaluations - sum(skips)
  # The row's compilation outside the timing: one call at the benchmark's batch size.
  sampler.generate(["a red circle moves left"], [0], **options)
  start = time.perf_counter()
  result = run_bench(sampler, args.prompts, args.samples_per_prompt, args.seed, **options)
  seconds = (time.perf_counter() - start) / len(result["rows"])
  summary = result["model"]
  fvds = fvd_scores(args, sampler, result["videos"], len(result["truth_rows"]))
  return {"variant": name, "options": options, "video_rows": result["rows"],
          "transformer_calls": calls,
          "forward_passes": calls * passes_per_call(sampler, opts),
          "evaluations": opts.evaluations, "seconds_per_video": seconds,
          "fvd": next((v for k, v in fvds.items() if "model vs" in k), None),
          "fvd_floor": next((v for k, v in fvds.items() if "real vs real" in k), None),
          "score": bench.score(summary), **{m: summary[m] for m in METRICS},
          "ground_truth_score": bench.score(result["ground_truth"])}


def _relative(row: dict) -> str:
  """`-2.8% [-6.1%, +0.4%]`: the score against the teacher's, with its interval."""
  if row["score_vs_teacher"] is None:
    return "n/a"
  low, high = row["score_vs_teacher_95"]
  return f"{row['score_vs_teacher']:+.1%} [{low:+.1%}, {high:+.1%}]"


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
  parser.add_argument("--students", default="",
                      help="workdirs of `sora-jax distill` students of this teacher")
  parser.add_argument("--student-steps", default="4,2,1", help="a shortcut student's rows")
  add_fvd_arguments(parser)
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
  students = [Sampler.from_workdir(d) for d in args.students.split(",") if d]
  rows = [measure(student or sampler, name, options, args)
          for name, student, options in variants(args, sampler.options().cfg_scale, students)]
  teacher = rows[0]
  for row in rows:
    row["calls_vs_teacher"] = teacher["transformer_calls"] / row["transformer_calls"]
    row["compute_vs_teacher"] = teacher["forward_passes"] / row["forward_passes"]
    row["score_vs_teacher"] = row["score"] / teacher["score"] - 1.0 if teacher["score"] else None
    # 95% paired bootstrap interval over the videos (the same prompts and seeds per row).
    row["score_vs_teacher_95"] = (bench.relative_score_interval(row["video_rows"],
                                                                teacher["video_rows"])
                                  if teacher["score"] else None)
  for row in rows:
    del row["video_rows"]
  columns = [("variant", lambda r: r["variant"]),
             ("calls", lambda r: f"{r['transformer_calls']} ({r['calls_vs_teacher']:.2f}x fewer)"),
             ("passes", lambda r: f"{r['forward_passes']} ({r['compute_vs_teacher']:.1f}x less)"),
             ("s/video", lambda r: f"{r['seconds_per_video']:.3f}"),
             ("score", lambda r: f"{r['score']:.3f}"),
             ("vs teacher [95% CI]", lambda r: _relative(r))]
  columns += [(m, lambda r, m=m: cell(r[m])) for m in METRICS]
  if rows[0]["fvd"] is not None:
    columns.append(("FVD", lambda r: f"{r['fvd']:.1f}"))
  plot = write_plot(os.path.splitext(out)[0] + ".png", rows)
  missing = [] if students else ["distilled students (no --students)"]
  missing += [] if rows[0]["fvd"] is not None else ["FVD (no --fvd-extractor)"]
  report(rows, columns, out, workdir=args.workdir, prompts=args.prompts,
         samples_per_prompt=args.samples_per_prompt, seed=args.seed, plot=plot,
         students=args.students, fvd_floor=rows[0]["fvd_floor"],
         not_measured="; ".join(missing) or None)


if __name__ == "__main__":
  main()
