"""Does quality improve with compute? Model sizes x training budgets, scored by ShapesBench.

  python -m experiments.scaling --config configs/world_tiny.py:latent \
      --config.autoencoder.workdir=runs/vae --config.data.latents_dir=runs/latents \
      [--widths 64,128,192] [--budgets 300,900,2700] [--workdir runs/scaling] \
      [--prompts 32] [--samples-per-prompt 2]

For each width (depth and heads from the config's variant) one run trains to the
largest budget; at every budget it stops with a checkpoint (`train(stop_at=...)`,
resumed exactly afterwards) and ShapesBench scores its EMA weights on the held-out
prompts. Training FLOPs are `sora_jax.models.flops.train_step_flops` x steps. The
learning-rate schedule spans the largest budget, so smaller budgets are points along
one run (as in a compute-optimal sweep's "one run per size"), not separately tuned runs.
Writes `scaling.json`, a markdown table, and `scaling.png`: bench score and training
loss against training FLOPs, one line per size. Each evaluated point is appended to
`rows.jsonl` as it is made, so an interrupted study reruns from where it stopped.
"""

from __future__ import annotations

import argparse
from typing import Sequence
import json
import os

import jax
import numpy as np

from sora_jax.cli.args import parse_with_config
from experiments.report import pyplot, report, save_figure
from sora_jax import configs
from sora_jax.evaluation import bench
from sora_jax.evaluation.shapes_bench import run_bench
from sora_jax.configs import latent_channels, latent_shape_of
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.flops import train_step_flops
from sora_jax.sample import Sampler
from sora_jax.train.loop import train



def step_flops(config) -> float:
  """Model FLOPs of one training step of `config`."""
  w = config.world
  latent = latent_shape_of(config.autoencoder, w.frames, w.height, w.width)
  patch = configs.decode_variant(config.model.variant)["patch"]
  dit = configs.dit_config(config, text_width=config.text_encoder.width,
                           in_channels=latent_channels(config.autoencoder))
  return train_step_flops(dit, configs.text_encoder_config(config, config.tokenizer.vocab_size),
                          num_tokens(latent[:3], patch), config.data.text_length,
                          config.data.batch_size, config.flow.self_condition_rate)


def loss_at(workdir: str, step: int, window: int = 5) -> float:
  """Mean logged training loss over the last `window` logs up to `step`."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
  steps = sorted(s for s in logged if s <= step)[-window:]
  return float(np.mean([logged[s] for s in steps]))


def write_plot(path: str, rows: list[dict]) -> str | None:
  plt = pyplot()
  if plt is None:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for width in sorted({r["width"] for r in rows}):
    mine = sorted((r for r in rows if r["width"] == width), key=lambda r: r["flops"])
    label = f"width {width} ({mine[0]['params'] / 1e6:.2f}M params)"
    axes[0].plot([r["flops"] for r in mine], [r["score"] for r in mine], "o-", label=label)
    axes[1].plot([r["flops"] for r in mine], [r["loss"] for r in mine], "o-", label=label)
  for ax, name in zip(axes, ("ShapesBench score", "training loss")):
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(name)
  axes[0].legend()
  save_figure(fig, path)
  plt.close(fig)
  return path


def fmt(value, spec: str = ".2f") -> str:
  return "-" if value is None else format(value, spec)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]", help="Config file; overrides as --config.KEY=VALUE.")
  parser.add_argument("--widths", type=lambda v: v.split(","), default=['64', '128', '192'], help="Model widths.")
  parser.add_argument("--budgets", type=lambda v: v.split(","), default=['300', '900', '2700'], help="Training steps.")
  parser.add_argument("--workdir", type=str, default='runs/scaling', help="Where the runs go.")
  parser.add_argument("--prompts", type=int, default=32, help="Held-out prompts per evaluation.")
  parser.add_argument("--samples_per_prompt", type=int, default=2, help="Videos per prompt.")
  parser.add_argument("--seed", type=int, default=2024, help="First sampling seed.")
  args, config = parse_with_config(parser, argv, lock=False)
  base = config
  budgets = sorted(int(b) for b in args.budgets)
  os.makedirs(args.workdir, exist_ok=True)
  progress = os.path.join(args.workdir, "rows.jsonl")   # one line per evaluated point
  done = {}
  if os.path.exists(progress):
    with open(progress, encoding="utf-8") as f:
      done = {(r["width"], r["steps"]): r for r in map(json.loads, f)}
  rows = []
  for width in (int(w) for w in args.widths):
    config = base.copy_and_resolve_references()
    config.model.width = width
    config.train.update(steps=budgets[-1], checkpoint_every=budgets[-1], keep_checkpoints=1)
    workdir = os.path.join(args.workdir, f"width{width}")
    flops = step_flops(config)
    for budget in budgets:
      if (width, budget) in done:        # a rerun goes on where it stopped
        rows.append(done[(width, budget)])
        continue
      summary = train(config, workdir, stop_at=budget)
      sampler = Sampler.from_workdir(workdir)
      params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sampler.params))
      result = run_bench(sampler, args.prompts, args.samples_per_prompt, args.seed)
      rows.append({"width": width, "steps": budget, "params": params,
                   "flops": flops * budget, "loss": loss_at(workdir, budget),
                   "score": bench.score(result["model"]), **result["model"]})
      with open(progress, "a", encoding="utf-8") as f:
        f.write(json.dumps(rows[-1]) + "\n")
      print(f"width {width}, {budget} steps: score {rows[-1]['score']:.3f}, loss "
            f"{rows[-1]['loss']:.4f} (step {summary['step']})", flush=True)
  out = os.path.join(args.workdir, "scaling.json")
  plot = write_plot(os.path.join(args.workdir, "scaling.png"), rows)
  report(rows, [
      ("width", lambda r: str(r["width"])), ("params (M)", lambda r: f"{r['params'] / 1e6:.2f}"),
      ("steps", lambda r: str(r["steps"])), ("training TFLOPs", lambda r: f"{r['flops'] / 1e12:.2f}"),
      ("loss", lambda r: f"{r['loss']:.4f}"), ("score", lambda r: f"{r['score']:.3f}"),
      ("colour", lambda r: fmt(r["colour"])), ("shape", lambda r: fmt(r["shape"])),
      ("direction", lambda r: fmt(r["direction"])), ("count", lambda r: fmt(r["count"])),
      ("hallucinated frames", lambda r: fmt(r["hallucinated_frames"])),
      ("physics (px)", lambda r: fmt(r["physics"])),
  ], out, plot=plot, budgets=budgets)


if __name__ == "__main__":
  main()
