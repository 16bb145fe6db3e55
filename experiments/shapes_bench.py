"""ShapesBench on one checkpoint: prompt adherence, hallucinations, object permanence, physics.

  python -m experiments.shapes_bench --workdir runs/demo [--samples-per-prompt 2] \
      [--prompts 64] [--steps N] [--out DIR]

Prompts are the captions of the first `--prompts` clips of the world's held-out split
(1-3 objects each; their ground truth gives the prompted colour, shape and direction of
every object). For each prompt it samples `--samples-per-prompt` videos and scores them
with `sora_jax.evaluation.bench.video_metrics`; the held-out clips themselves are scored
the same way in the same run, as the ceiling the trackers allow. Writes to `--out`
(default `<workdir>/shapes_bench/`): `shapes_bench.json` (every video's metrics, per
prompt and overall), `shapes_bench.md` (the table), `distributions.png` (per-video
distributions of the failure metrics, model vs ground truth) and `worst.png` (a
contact sheet of the worst videos, with their prompts and failures in `worst.txt`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from experiments.report import markdown_table
from sora_jax import configs, video_io
from sora_jax.data.world import load_world_source
from sora_jax.evaluation import bench
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
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("(no plot: matplotlib is not installed)")
    return None
  fig, axes = plt.subplots(1, len(FAILURES), figsize=(4 * len(FAILURES), 3.2))
  for ax, name in zip(axes, FAILURES):
    for rows, label in ((truth_rows, "ground truth"), (model_rows, "model")):
      values = [r[name] for r in rows if r[name] is not None]
      if values:
        ax.hist(values, bins=12, alpha=0.6, label=label)
    ax.set_title(name)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--samples-per-prompt", type=int, default=2)
  parser.add_argument("--steps", type=int, default=None, help="sampling steps (sample.steps)")
  parser.add_argument("--seed", type=int, default=2024)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  out = args.out or os.path.join(args.workdir, "shapes_bench")
  os.makedirs(out, exist_ok=True)

  sampler = Sampler.from_workdir(args.workdir)
  world = configs.world_config(sampler.config)
  source = load_world_source(world, "test", sampler.config.world.data_dir or None)
  count = min(args.prompts, len(source))
  examples = [source[i] for i in range(count)]
  captions = [e["caption"].decode() if isinstance(e["caption"], bytes) else str(e["caption"])
              for e in examples]
  prompts = [bench.prompt_objects(e, world) for e in examples]

  start = time.perf_counter()
  texts = [c for c in captions for _ in range(args.samples_per_prompt)]
  seeds = [args.seed + i for i in range(len(texts))]
  options = {"steps": args.steps} if args.steps else {}
  videos = sampler.generate(texts, seeds, **options)
  sample_s = time.perf_counter() - start

  model_rows, truth_rows = [], []
  for i, video in enumerate(videos):
    p = i // args.samples_per_prompt
    model_rows.append({"prompt": captions[p], "seed": seeds[i],
                       **bench.video_metrics(video, prompts[p], world)})
  for caption, prompt, example in zip(captions, prompts, examples):
    truth_rows.append({"prompt": caption, **bench.video_metrics(example["video"], prompt, world)})
  model, truth = bench.summarise(model_rows), bench.summarise(truth_rows)
  objects_of = [len(prompts[i // args.samples_per_prompt]) for i in range(len(model_rows))]
  by_objects = {n: bench.summarise([r for r, k in zip(model_rows, objects_of) if k == n])
                for n in sorted(set(objects_of))}

  table_rows = [{"name": "model", **model}, {"name": "ground truth (held-out clips)", **truth}]
  table_rows += [{"name": f"model, {n}-object prompts", **s} for n, s in by_objects.items()]
  columns = [("videos", lambda r: r["name"])] + [(m, lambda r, m=m: cell(r[m]))
                                                  for m in bench.METRICS]
  table = markdown_table(table_rows, columns)
  print(table)

  worst = sorted(range(len(model_rows)), key=lambda i: -failure_score(model_rows[i]))[:8]
  sheet = video_io.write_contact_sheet(
      os.path.join(out, "worst.png"), videos[worst],
      [f"{model_rows[i]['prompt']} | hallucinated {model_rows[i]['hallucinated_frames']:.2f}, "
       f"appear/vanish {model_rows[i]['appear_vanish']}, colour {model_rows[i]['colour']:.2f}, "
       f"direction {model_rows[i]['direction']:.2f}" for i in worst], scale=4)
  plot = write_plot(os.path.join(out, "distributions.png"), model_rows, truth_rows)
  with open(os.path.join(out, "shapes_bench.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  with open(os.path.join(out, "shapes_bench.json"), "w", encoding="utf-8") as f:
    json.dump({"workdir": args.workdir, "samples_per_prompt": args.samples_per_prompt,
               "prompts": count, "sample_seconds": sample_s, "model": model,
               "ground_truth": truth, "by_objects": by_objects, "videos": model_rows,
               "ground_truth_videos": truth_rows, "worst": sheet, "plot": plot}, f, indent=1)
  print(f"\nWrote {out}/shapes_bench.json, shapes_bench.md, worst.png"
        + (", distributions.png" if plot else "") + f" ({len(videos)} videos in {sample_s:.0f} s)")


if __name__ == "__main__":
  main()
