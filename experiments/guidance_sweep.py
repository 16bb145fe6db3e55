"""Colour adherence of a trained run across guidance scales, time shifts and solver steps.

  python -m experiments.guidance_sweep --workdir runs/demo [--samples 40] \
      [--cfg 1,2,4,6] [--shift 1,3] [--steps 24] [--out runs/demo/guidance_sweep.json]

Samples the same prompts and seeds at every setting (one compiled sampler per
setting) and prints a markdown table of the colour score with the sampling time,
plus the JSON file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

from sora_jax.demo import evaluate_colour
from sora_jax.sample import Sampler


def _floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--samples", type=int, default=40)
  parser.add_argument("--seed", type=int, default=1234)
  parser.add_argument("--cfg", type=_floats, default=[1.0, 2.0, 4.0, 6.0])
  parser.add_argument("--shift", type=_floats, default=[1.0, 3.0])
  parser.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[24])
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  base = Sampler.from_workdir(args.workdir)
  rows = []
  for cfg, shift, steps in itertools.product(args.cfg, args.shift, args.steps):
    base.config.sample.update(cfg_scale=cfg, shift=shift, steps=steps)
    start = time.perf_counter()
    result = evaluate_colour(base, args.samples, args.seed)
    rows.append({"cfg_scale": cfg, "shift": shift, "steps": steps, "score": result["score"],
                 "seconds": time.perf_counter() - start})
    print(f"cfg {cfg:g} shift {shift:g} steps {steps}: {result['score']:.1%}", flush=True)

  print("\n| cfg scale | shift | steps | colour score | seconds (incl. compile) |")
  print("| --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['cfg_scale']:g} | {r['shift']:g} | {r['steps']} | {r['score']:.1%} | "
          f"{r['seconds']:.1f} |")
  out = args.out or os.path.join(args.workdir, "guidance_sweep.json")
  with open(out, "w", encoding="utf-8") as f:
    json.dump({"workdir": args.workdir, "samples": args.samples, "rows": rows}, f, indent=2)
  print(f"\nWrote {out}")


if __name__ == "__main__":
  main()
