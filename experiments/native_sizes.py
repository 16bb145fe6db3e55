"""Colour adherence of one trained model at every size it was trained on, and beyond.

  python -m experiments.native_sizes --workdir runs/native [--samples 40] \
      [--sizes 4x32x32,4x24x32,...] [--out runs/native/native_sizes.json]

Sizes default to the run's `eval.sizes` (trained video sizes, an image, an untrained
aspect ratio). For each size it samples the same one-object prompts and seeds, scores
the dominant colour, writes a contact sheet, and prints a markdown table, which also
says whether the size (and its aspect ratio) occurred in training.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

from experiments.report import report
from sora_jax import configs
from sora_jax.demo import evaluate_colour
from sora_jax.provenance.outputs import write_generated_sheet
from sora_jax.sample import Sampler


def _sizes(text: str) -> list[tuple[int, int, int]]:
  return [tuple(int(v) for v in size.split("x")) for size in text.split(",") if size]


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--samples", type=int, default=40)
  parser.add_argument("--seed", type=int, default=1234)
  parser.add_argument("--sizes", type=_sizes, default=None, help="e.g. 4x32x32,1x24x40")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  sampler = Sampler.from_workdir(args.workdir)
  world = configs.world_config(sampler.config)
  trained = set(world.all_sizes)
  trained_ratios = {round(h / w, 3) for _, h, w in trained}
  sizes = args.sizes or [tuple(s) for s in sampler.config.eval.sizes]
  rows = []
  for size in sizes:
    start = time.perf_counter()
    result = evaluate_colour(sampler, args.samples, args.seed, size=size)
    name = "x".join(map(str, size))
    sheet = write_generated_sheet(
        os.path.join(args.workdir, "native_sizes", f"{name}.png"), result["videos"][:16],
        [s["prompt"] for s in result["samples"][:16]], scale=2, config=sampler.config,
        step=sampler.step, generation={"seed": args.seed, "size": list(size)})
    rows.append({"size": size, "trained_size": size in trained,
                 "trained_aspect_ratio": round(size[1] / size[2], 3) in trained_ratios,
                 "score": result["score"], "seconds": time.perf_counter() - start,
                 "contact_sheet": sheet})
    print(f"{name}: {result['score']:.1%}", flush=True)

  yes_no = lambda flag: "yes" if flag else "no"  # pylint: disable=unnecessary-lambda-assignment
  report(rows, [("frames x height x width", lambda r: "x".join(map(str, r["size"]))),
                ("trained size", lambda r: yes_no(r["trained_size"])),
                ("trained aspect ratio", lambda r: yes_no(r["trained_aspect_ratio"])),
                ("colour score", lambda r: f"{r['score']:.1%}")],
         args.out or os.path.join(args.workdir, "native_sizes.json"),
         workdir=args.workdir, samples=args.samples)


if __name__ == "__main__":
  main()
