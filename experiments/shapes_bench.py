"""ShapesBench on one checkpoint: prompt adherence, hallucinations, object permanence, physics.

  python -m experiments.shapes_bench --workdir runs/demo [--samples-per-prompt 2] \
      [--prompts 64] [--steps N] [--out DIR] \
      [--fvd-extractor DIR [--train-fvd-extractor STEPS]] [--i3d i3d_torchscript.pt]

Prompts are the captions of the first `--prompts` clips of the world's held-out split
(1-3 objects each; their ground truth gives the prompted colour, shape and direction of
every object). Results are also split by what a clip tests: attribute combinations
held out of training (`world.holdout`) or not, occlusions, wall bounces. For each prompt it samples `--samples-per-prompt` videos and scores them
with `sora_jax.evaluation.bench.video_metrics`; the held-out clips themselves are scored
the same way in the same run, as the ceiling the trackers allow. Writes to `--out`
(default `<workdir>/shapes_bench/`): `shapes_bench.json` (every video's metrics, per
prompt and overall), `shapes_bench.md` (the table), `distributions.png` (per-video
distributions of the failure metrics, model vs ground truth) and `worst.png` (a
contact sheet of the worst videos, with their prompts and failures in `worst.txt`).

FVD (`sora_jax.evaluation.fvd`) of the generated videos against the held-out clips of
the same prompts: with the world's own extractor from `--fvd-extractor DIR` (trained
there first with `--train-fvd-extractor STEPS` when it holds none), and with a
TorchScript I3D when `--i3d` names one. A "real vs real" FVD between the first and
second half of the held-out split is the floor at this sample size.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import numpy as np

from experiments.report import markdown_table, pyplot, save_figure
from sora_jax import configs
from sora_jax.data.world import load_world_source
from sora_jax.evaluation import bench
from sora_jax.evaluation import fvd as fvd_lib
from sora_jax.evaluation.shapes_bench import run_bench
from sora_jax.provenance.outputs import write_generated_sheet
from sora_jax.sample import Sampler

FAILURES = ("hallucinated_frames", "appear_vanish", "physics", "flicker")


def failure_score(row: dict) -> float:
  """How bad a video is, for ranking the worst: adherence misses and hallucinations."""
  misses = sum(1 - row[k] for k in ("colour", "direction", "count") if row[k] is not None)
  return misses + row["hallucinated_frames"] + 0.5 * row["appear_vanish"]


def cell(value) -> str:
  if value is None:
    return "-"
  return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_plot(path: str, model_rows: list[dict], truth_rows: list[dict]) -> str | None:
  plt = pyplot()
  if plt is None:
    return None
  fig, axes = plt.subplots(1, len(FAILURES), figsize=(4 * len(FAILURES), 3.2))
  for ax, name in zip(axes, FAILURES):
    for rows, label in ((truth_rows, "ground truth"), (model_rows, "model")):
      values = [r[name] for r in rows if r[name] is not None]
      if values:
        ax.hist(values, bins=12, alpha=0.6, label=label)
    ax.set_title(name)
  axes[0].legend()
  save_figure(fig, path)
  plt.close(fig)
  return path


def add_fvd_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags `fvd_scores` reads: --fvd-extractor, --train-fvd-extractor, --i3d."""
  parser.add_argument("--fvd-extractor", default=None, help="world extractor directory")
  parser.add_argument("--train-fvd-extractor", type=int, default=0,
                      help="train the world extractor for this many steps if absent")
  parser.add_argument("--i3d", default=None, help="TorchScript I3D for the standard FVD")


def fvd_scores(args, sampler: Sampler, videos: np.ndarray, count: int) -> dict[str, float]:
  """FVDs of `videos` against the held-out clips they were prompted with (and the
  real-vs-real floor), for each extractor asked for (`add_fvd_arguments`' flags)."""
  world = configs.world_config(sampler.config)
  extractors = []
  if args.fvd_extractor:
    if args.train_fvd_extractor and not os.path.isfile(
        os.path.join(args.fvd_extractor, "world_extractor.json")):
      fvd_lib.train_world_extractor(world, args.fvd_extractor, steps=args.train_fvd_extractor)
    extractors.append(("world", fvd_lib.WorldExtractor.load(args.fvd_extractor)))
  if args.i3d:
    extractors.append(("I3D", fvd_lib.TorchScriptExtractor(args.i3d)))
  if not extractors:
    return {}
  source = load_world_source(world, "test", sampler.config.world.data_dir or None)
  real = np.stack([source[i]["video"] for i in range(count)])
  half = len(source) // 2
  first = np.stack([source[i]["video"] for i in range(half)])
  second = np.stack([source[i]["video"] for i in range(half, 2 * half)])
  out = {}
  for name, extractor in extractors:
    out[f"FVD ({name} features), model vs held-out clips"] = fvd_lib.fvd(real, videos, extractor)
    out[f"FVD ({name} features), real vs real ({half} clips each)"] = fvd_lib.fvd(
        first, second, extractor)
  return out


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--samples-per-prompt", type=int, default=2)
  parser.add_argument("--steps", type=int, default=None, help="sampling steps (sample.steps)")
  parser.add_argument("--seed", type=int, default=2024)
  parser.add_argument("--out", default=None)
  add_fvd_arguments(parser)
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.workdir, "shapes_bench")
  os.makedirs(out, exist_ok=True)

  sampler = Sampler.from_workdir(args.workdir)
  result = run_bench(sampler, args.prompts, args.samples_per_prompt, args.seed, args.steps)
  videos, model_rows, truth_rows = result["videos"], result["rows"], result["truth_rows"]
  model, truth, by_objects = result["model"], result["ground_truth"], result["by_objects"]
  captions, sample_s = result["captions"], result["sample_seconds"]
  count = len(captions)

  fvds = fvd_scores(args, sampler, videos, count)
  for name, value in fvds.items():
    print(f"{name}: {value:.3f}")

  table_rows = [{"name": "model", **model}, {"name": "ground truth (held-out clips)", **truth}]
  table_rows += [{"name": f"model, {n}-object prompts", **s} for n, s in by_objects.items()]
  table_rows += [{"name": f"model, {label} ({s['videos']} videos)", **s}
                 for label, s in result["by_category"].items()]
  columns = [("videos", lambda r: r["name"])] + [(m, lambda r, m=m: cell(r[m]))
                                                  for m in bench.METRICS]
  table = markdown_table(table_rows, columns)
  confusion = bench.confusion_table(result["shape_confusion"])
  print(table + "\n\n" + confusion)

  worst = sorted(range(len(model_rows)), key=lambda i: -failure_score(model_rows[i]))[:8]
  sheet = write_generated_sheet(
      os.path.join(out, "worst.png"), videos[worst],
      [f"{model_rows[i]['prompt']} | hallucinated {model_rows[i]['hallucinated_frames']:.2f}, "
       f"appear/vanish {model_rows[i]['appear_vanish']}, colour {model_rows[i]['colour']:.2f}, "
       f"direction {model_rows[i]['direction']:.2f}" for i in worst], scale=4,
      config=sampler.config, step=sampler.step)
  plot = write_plot(os.path.join(out, "distributions.png"), model_rows, truth_rows)
  with open(os.path.join(out, "shapes_bench.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n\n" + confusion + "\n")
  with open(os.path.join(out, "shapes_bench.json"), "w", encoding="utf-8") as f:
    json.dump({"workdir": args.workdir, "samples_per_prompt": args.samples_per_prompt,
               "prompts": count, "sample_seconds": sample_s, "model": model,
               "ground_truth": truth, "by_objects": by_objects,
               "by_category": result["by_category"],
               "shape_confusion": result["shape_confusion"], "score": bench.score(model),
               "fvd": fvds,
               "ground_truth_score": bench.score(truth), "videos": model_rows,
               "ground_truth_videos": truth_rows, "worst": sheet, "plot": plot}, f, indent=1)
  print(f"\nWrote {out}/shapes_bench.json, shapes_bench.md, worst.png"
        + (", distributions.png" if plot else "") + f" ({len(videos)} videos in {sample_s:.0f} s)")


if __name__ == "__main__":
  main()
