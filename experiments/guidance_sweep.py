"""Colour adherence of a trained run across guidance scales, time shifts, solvers and steps.

  python -m experiments.guidance_sweep --workdir runs/demo [--samples 40] \
      [--cfg 1,2,4,6] [--shift 1,3] [--steps 24] [--solvers euler,heun,dpmpp_2m] \
      [--out runs/demo/guidance_sweep.json]

Samples the same prompts and seeds at every setting and prints a markdown table of the
colour score with the sampling time, plus the JSON file (with how many programs the
sampler compiled: one per solver and steps, whatever the scales and shifts, and one more
where a cfg scale of 1 drops the unconditional pass).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Sequence

from experiments.report import report
from sora_jax.demo import evaluate_colour
from sora_jax.diffusion.solvers import CALLS_PER_STEP
from sora_jax.sample import Sampler


def _floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--samples", type=int, default=40)
  parser.add_argument("--seed", type=int, default=1234)
  parser.add_argument("--cfg", type=_floats, default=[1.0, 2.0, 4.0, 6.0])
  parser.add_argument("--shift", type=_floats, default=[1.0, 3.0])
  parser.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[24])
  parser.add_argument("--solvers", type=lambda s: [v for v in s.split(",") if v],
                      default=None, help="Solvers (default: the run's sample.solver).")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  base = Sampler.from_workdir(args.workdir)
  rows = []
  solvers = args.solvers or [base.config.sample.solver]
  for cfg, shift, solver, steps in itertools.product(args.cfg, args.shift, solvers, args.steps):
    base.config.sample.update(cfg_scale=cfg, shift=shift, steps=steps, solver=solver)
    start = time.perf_counter()
    result = evaluate_colour(base, args.samples, args.seed)
    rows.append({"cfg_scale": cfg, "shift": shift, "solver": solver, "steps": steps,
                 "model_calls": steps * CALLS_PER_STEP[solver], "score": result["score"],
                 "seconds": time.perf_counter() - start})
    print(f"cfg {cfg:g} shift {shift:g} {solver} steps {steps}: {result['score']:.1%}",
          flush=True)

  report(rows, [("cfg scale", lambda r: f"{r['cfg_scale']:g}"),
                ("shift", lambda r: f"{r['shift']:g}"), ("solver", lambda r: r["solver"]),
                ("steps", lambda r: str(r["steps"])),
                ("model calls / guidance pass", lambda r: str(r["model_calls"])),
                ("colour score", lambda r: f"{r['score']:.1%}"),
                ("seconds (incl. compile)", lambda r: f"{r['seconds']:.1f}")],
         args.out or os.path.join(args.workdir, "guidance_sweep.json"),
         workdir=args.workdir, samples=args.samples, compiled_programs=base.compiled_shapes)
  print(f"Compiled {base.compiled_shapes} sampling programs for {len(rows)} settings.")


if __name__ == "__main__":
  main()
