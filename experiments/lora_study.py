"""LoRA versus full fine-tuning: teaching a base model an attribute combination it never saw.

  python -m experiments.lora_study --out runs/lora_study [--holdout "red triangle"] \
      [--base-steps 900] [--steps 300] [--clips 300] [--ranks 4,16,64] [--prompts 64] \
      [--base WORKDIR]

1. A base model (the demo config, `configs/world_tiny.py`) is trained on a world whose
   train split has no object with the held-out combination (`world.holdout`).
2. It is fine-tuned on a small set (`--clips` clips of the world without the hold-out,
   where the combination occurs at its natural rate) by LoRA at each rank
   (`configs/world_tiny.py:lora`, `lora.rank`) and by full fine-tuning, for `--steps` steps
   each, from the same base (`train.init_from`).
3. Every model, the base included, runs ShapesBench on the held-out split of the base's
   world (the same prompts for all): adherence on prompts with the held-out combination
   (what was taught) and on the others (forgetting).

Per variant it reports trainable parameters, the optimiser state's bytes (AdamW moments
and the EMA: what the checkpoint's `opt_state` and `ema` hold), checkpoint size, the
train step's time (steps per second at the end of the run) and the ShapesBench numbers.
Runs that exist in `--out` are resumed or reused (a finished run is not retrained);
`--base` takes an existing run as the base instead (its world, with `--holdout` as the
held-out combination the prompts are split by, is the one evaluated).
Writes `lora_study.json` and `lora_study.md` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.report import markdown_table
from sora_jax.evaluation import bench
from sora_jax.evaluation.shapes_bench import run_bench
from sora_jax.sample import Sampler
from sora_jax.train import workdir as wd
from sora_jax.train.loop import train

SCORED = ("colour", "shape", "direction", "count")


def _world_tiny():
  import sys  # pylint: disable=g-import-not-at-top
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
  sys.path.insert(0, here)
  import world_tiny  # pylint: disable=g-import-not-at-top
  return world_tiny


def base_config(args: argparse.Namespace, preset: str | None):
  """The base's config: the preset with the combination held out of its train split."""
  c = _world_tiny().get_config(preset)
  c.world.update(holdout=(args.holdout,))
  if args.data_dir:
    c.world.data_dir = args.data_dir
  if args.base_steps:
    c.train.steps = args.base_steps
  return c


def finetune_config(args: argparse.Namespace, preset: str | None, rank: int, base: str):
  """A fine-tune from `base` (rank 0: full) on `--clips` clips of the world without the
  hold-out, `--steps` steps, its learning-rate schedule fitted to them."""
  c = _world_tiny().get_config(f"{preset}-lora" if preset and rank else
                               ("lora" if rank else preset))
  c.world.update(holdout=(), num_train=args.clips)
  if args.data_dir:
    c.world.data_dir = args.data_dir
  if rank:
    c.lora.update(rank=rank, alpha=float(rank))
    c.optim.update(lr=args.lora_lr)
  else:
    c.optim.update(lr=args.full_lr)
  c.optim.update(warmup_steps=min(int(c.optim.warmup_steps), max(1, args.steps // 10)))
  c.train.update(steps=args.steps, init_from=base,
                 checkpoint_every=args.steps, keep_checkpoints=1)
  return c


def _finished(workdir: str, steps: int) -> bool:
  return os.path.isdir(os.path.join(wd.checkpoint_dir(workdir), str(steps)))


def _latest_step(workdir: str) -> int:
  return max(int(s) for s in os.listdir(wd.checkpoint_dir(workdir)) if s.isdigit())


def _bytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def _elements(tree) -> int:
  return int(sum(np.asarray(x).size for x in jax.tree.leaves(tree)))


def run_costs(workdir: str, steps: int) -> dict:
  """Trainable parameters, optimiser/EMA bytes and checkpoint bytes of a finished run."""
  step_dir = os.path.join(wd.checkpoint_dir(workdir), str(steps))
  state = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
  size = sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(step_dir) for f in files)
  return {"trainable_params": _elements(state["params"]),
          "optimizer_bytes": _bytes(state["opt_state"]),
          "ema_bytes": _bytes(state.get("ema_params", state.get("ema", {}))),
          "checkpoint_bytes": int(size)}


def _steps_per_second(workdir: str) -> float | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rates = [json.loads(line).get("steps_per_second") for line in open(path, encoding="utf-8")]
  rates = [r for r in rates if r]
  return float(rates[-1]) if rates else None


def evaluate(workdir: str, world_section, args: argparse.Namespace) -> dict:
  """ShapesBench of a run on the base world's held-out split: overall, on prompts with
  the held-out combination and on the rest."""
  sampler = Sampler.from_workdir(workdir)
  result = run_bench(sampler, args.prompts, args.samples_per_prompt, args.seed,
                     args.sample_steps, world_section=world_section)
  out = {"overall": result["model"], "score": bench.score(result["model"])}
  for label, key in (("held-out combinations", "taught"),
                     ("in-distribution combinations", "kept")):
    summary = result["by_category"].get(label)
    out[key] = summary
    out[f"{key}_score"] = None if summary is None else float(
        np.mean([summary[k] for k in SCORED if summary.get(k) is not None]))
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory of the runs and the results")
  parser.add_argument("--holdout", default="red triangle",
                      help="the attribute combination the base never sees")
  parser.add_argument("--preset", default=None,
                      help="configs/world_tiny.py preset (default: the demo; 'test' for a "
                           "smoke run)")
  parser.add_argument("--base-steps", type=int, default=0, help="0: the preset's")
  parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
  parser.add_argument("--clips", type=int, default=300, help="fine-tuning set size")
  parser.add_argument("--ranks", default="4,16,64")
  parser.add_argument("--lora-lr", type=float, default=1e-3)
  parser.add_argument("--full-lr", type=float, default=2e-4)
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--samples-per-prompt", type=int, default=1)
  parser.add_argument("--sample-steps", type=int, default=None)
  parser.add_argument("--seed", type=int, default=2024)
  parser.add_argument("--data-dir", default="", help="TFDS directory of the worlds")
  parser.add_argument("--base", default=None, help="an existing base run (skips training one)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  if args.base:
    base_dir, base = args.base, wd.load_config(args.base)
    base.world.holdout = (args.holdout,)
  else:
    base_dir = os.path.join(args.out, "base")
    base = base_config(args, args.preset)
    if not _finished(base_dir, int(base.train.steps)):
      train(base, base_dir, progress=False)
  variants = [("base", base_dir, None)]
  for rank in [0] + [int(r) for r in args.ranks.split(",") if r]:
    name = f"lora r{rank}" if rank else "full fine-tuning"
    workdir = os.path.join(args.out, f"lora_r{rank}" if rank else "full")
    config = finetune_config(args, args.preset, rank, base_dir)
    if not _finished(workdir, args.steps):
      train(config, workdir, progress=False)
    variants.append((name, workdir, config))

  rows = []
  for name, workdir, config in variants:
    steps = _latest_step(workdir) if config is None else args.steps
    row = {"variant": name, **run_costs(workdir, steps),
           "steps_per_second": _steps_per_second(workdir),
           **evaluate(workdir, base.world, args)}
    rows.append(row)
    print(f"{name}: taught {row['taught_score']}, kept {row['kept_score']}", flush=True)

  def score(key):
    return lambda r: "-" if r[key] is None else f"{r[key]:.3f}"

  table = markdown_table(rows, [
      ("variant", lambda r: r["variant"]),
      ("trainable params", lambda r: f"{r['trainable_params']:,}"),
      ("optimiser state", lambda r: f"{r['optimizer_bytes'] / 2**20:.2f} MiB"),
      ("checkpoint", lambda r: f"{r['checkpoint_bytes'] / 2**20:.2f} MiB"),
      ("steps/s", lambda r: "-" if r["steps_per_second"] is None
       else f"{r['steps_per_second']:.2f}"),
      ("held-out combination (taught)", score("taught_score")),
      ("other prompts (kept)", score("kept_score")),
      ("ShapesBench score", score("score"))])
  print(table)
  with open(os.path.join(args.out, "lora_study.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "lora_study.json"), "w", encoding="utf-8") as f:
    json.dump({"args": vars(args), "rows": rows}, f, indent=1)
  print(f"Wrote {args.out}/lora_study.json and lora_study.md")


if __name__ == "__main__":
  main()
