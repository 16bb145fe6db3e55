"""VAE recipes side by side: held-out PSNR against training steps and wall time.

  python -m experiments.vae_sweep [--variants lr_2e-3,lr_2e-3_wide_decoder] [--steps 4000]
      [--eval-every 1000] [--eval-examples 200] [--time-budget 0] [--tiny] [--out vae_sweep.json]

Each variant is `configs/vae_world_tiny.py` with the overrides in `VARIANTS`, trained by
the same jitted step as `sora-jax train-vae` (`make_vae_train_step`, with the schedule
of `--steps`) on the same batches: the world's train split rendered into memory (the
clips the TFDS builder writes, without TFDS or Grain, so this runs where only JAX is
installed). Every `--eval-every` steps the held-out split's first `--eval-examples` clips
are reconstructed from their posterior means, as `train-vae`'s evaluation does, and PSNR
and SSIM are recorded. `--time-budget S` stops a variant's training after S seconds
(its last evaluation is then at the step reached). The table gives, per variant, the
parameter count, the median step time on this machine, and PSNR / SSIM at each
evaluation; the JSON has every evaluation.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments.report import report
from sora_jax import configs
from sora_jax.data.world import SPLIT_SEEDS, render_example
from sora_jax.evaluation.reconstruction import psnr_ssim
from sora_jax.parallel.sharding import batch_sharding, make_mesh
from sora_jax.train.vae_step import (abstract_models, create_vae_state, make_vae_train_step,
                                     merge_vae)

CONFIG_FILE = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "vae_world_tiny.py")

# name -> overrides of configs/vae_world_tiny.py ("section.key": value). Each names its
# learning rate, so the names keep their meaning if the config's defaults move (the
# config's recipe is lr_4e-3 since this sweep).
LR2 = {"optim.lr": 2e-3}
VARIANTS: dict[str, dict[str, Any]] = {
    "lr_2e-3": {**LR2},
    "lr_2e-3_wide_decoder": {**LR2, "vae.decoder_channels": (64, 128, 128)},
    "lr_2e-3_wide": {**LR2, "vae.channels": (64, 128, 128)},
    "lr_2e-3_deep": {**LR2, "vae.num_res_blocks": 2},
    "lr_2e-3_kl_1e-4": {**LR2, "vae_loss.kl_weight": 1e-4},
    "lr_4e-3": {"optim.lr": 4e-3},
    "lr_6e-3": {"optim.lr": 6e-3},
    "lr_4e-3_deep": {"optim.lr": 4e-3, "vae.num_res_blocks": 2},
}


def variant_config(name: str, steps: int, tiny: bool = False) -> ml_collections.ConfigDict:
  """`configs/vae_world_tiny.py` (`:test` when `tiny`) with `VARIANTS[name]` applied and
  `train.steps = steps`."""
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; expected one of {sorted(VARIANTS)}.")
  spec = importlib.util.spec_from_file_location("vae_world_tiny", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("test" if tiny else "")
  for key, value in {**VARIANTS[name], "train.steps": steps}.items():
    section, field = key.split(".")
    config[section][field] = value
  configs.validate_vae(config, num_devices=jax.device_count())
  return config


def render_split(config: ml_collections.ConfigDict, split: str, count: int) -> np.ndarray:
  """The first `count` clips of a world split as the TFDS builder renders them, uint8 `[N, T, H, W, 3]`."""
  world = configs.world_config(config)
  return np.stack([render_example(world, SPLIT_SEEDS[split] + i, holdout=split == "train")["video"]
                   for i in range(count)])


def to_unit_range(videos: np.ndarray) -> np.ndarray:
  """uint8 videos -> float32 in [-1, 1] (`data.pipeline.normalise_video`'s formula; that
  module imports Grain, which this script avoids so that it runs on bare JAX images)."""
  return videos.astype(np.float32) / 127.5 - 1.0


def evaluate(graphdef: nnx.GraphDef, state: dict[str, Any], videos: np.ndarray, batch: int
             ) -> dict[str, float]:
  """Mean PSNR / SSIM of posterior-mean reconstructions of `videos` (`[N, T, H, W, 3]` in [-1, 1])."""
  @jax.jit
  def scores(params, stats, video):
    vae = merge_vae(graphdef, params, stats)
    return psnr_ssim(video, vae.decode(vae.encode(video)[0]))

  psnr, ssim = [], []
  for start in range(0, len(videos), batch):
    p, s = scores(state["params"], state["stats"], videos[start:start + batch])
    psnr.append(np.asarray(p))
    ssim.append(np.asarray(s))
  return {"psnr": float(np.concatenate(psnr).mean()), "ssim": float(np.concatenate(ssim).mean())}


def run_variant(name: str, args: argparse.Namespace, train: np.ndarray, held_out: np.ndarray
                ) -> dict[str, Any]:
  """Trains one variant, evaluating every `args.eval_every` steps; returns its row."""
  config = variant_config(name, args.steps, args.tiny)
  mesh = make_mesh(configs.mesh_shape(config))
  rules = configs.sharding_rules(config)
  state, shardings = create_vae_state(config, mesh)
  step = make_vae_train_step(config, shardings, mesh)
  graphdef = abstract_models(config)[0]
  sharding = batch_sharding(mesh, rules, 5)
  params = sum(x.size for x in jax.tree.leaves(state["params"]))
  rng = np.random.default_rng(config.data.shuffle_seed)
  b = config.data.batch_size
  order = np.empty((0,), np.int64)
  evals, step_times = [], []
  start, eval_time = time.perf_counter(), 0.0   # wall time counts training only
  for s in range(1, args.steps + 1):
    if len(order) < b:
      order = np.concatenate([order, rng.permutation(len(train))])
    idx, order = order[:b], order[b:]
    batch = {"video": jax.device_put(to_unit_range(train[idx]), sharding)}
    timed = s % args.log_every == 0   # one step alone: the queue drained before, synced after
    if timed:
      jax.block_until_ready((state, batch))
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    if timed:
      jax.block_until_ready(metrics)
      step_times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start - eval_time
    out_of_time = args.time_budget > 0 and wall > args.time_budget
    if s % args.eval_every == 0 or s == args.steps or out_of_time:
      jax.block_until_ready(state)
      wall = time.perf_counter() - start - eval_time
      t_eval = time.perf_counter()
      evals.append({"step": s, "wall_s": wall, "train_psnr": float(metrics["psnr"]),
                    **evaluate(graphdef, state, held_out, args.eval_batch)})
      print(f"{name:>18} step {s:6d}  {wall:7.1f} s  held-out PSNR {evals[-1]['psnr']:.2f} dB"
            f"  SSIM {evals[-1]['ssim']:.3f}", flush=True)
      eval_time += time.perf_counter() - t_eval
    if out_of_time:
      break
  return {"variant": name, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                         for k, v in VARIANTS[name].items()},
          "params": int(params), "batch_size": b, "steps": args.steps,
          "step_ms": 1e3 * float(np.median(step_times)) if step_times else float("nan"),
          "evals": evals, "device": jax.devices()[0].device_kind}


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="lr_2e-3,lr_4e-3",
                      help=f"comma-separated, from {sorted(VARIANTS)}")
  parser.add_argument("--steps", type=int, default=4000)
  parser.add_argument("--eval-every", type=int, default=1000)
  parser.add_argument("--eval-examples", type=int, default=200)
  parser.add_argument("--eval-batch", type=int, default=50)
  parser.add_argument("--log-every", type=int, default=50, help="steps between timed steps")
  parser.add_argument("--train-clips", type=int, default=0,
                      help="0 = the config's world.num_train")
  parser.add_argument("--time-budget", type=float, default=0.0,
                      help="seconds of training per variant (0 = no limit)")
  parser.add_argument("--tiny", action="store_true",
                      help="the test config (configs/vae_world_tiny.py:test: 5x16x16 clips, "
                           "8-16 channels) under each variant's overrides: the CPU test")
  parser.add_argument("--out", default="vae_sweep.json")
  args = parser.parse_args(argv)

  names = args.variants.split(",")
  base = variant_config(names[0], args.steps, args.tiny)
  t0 = time.perf_counter()
  train = render_split(base, "train", args.train_clips or base.world.num_train)
  held_out = to_unit_range(render_split(base, "test", args.eval_examples))
  print(f"rendered {len(train)} train / {len(held_out)} held-out clips in "
        f"{time.perf_counter() - t0:.1f} s on {jax.devices()[0].device_kind}", flush=True)
  rows = [run_variant(name, args, train, held_out) for name in names]

  def at(r, key):
    return " / ".join(f"{e[key]:.2f}" if key == "psnr" else f"{e[key]:.3f}" for e in r["evals"])
  report(rows, [
      ("variant", lambda r: r["variant"]),
      ("params", lambda r: f"{r['params'] / 1e6:.2f}M"),
      ("step (ms)", lambda r: f"{r['step_ms']:.1f}"),
      ("eval steps", lambda r: " / ".join(str(e["step"]) for e in r["evals"])),
      ("held-out PSNR (dB)", lambda r: at(r, "psnr")),
      ("SSIM", lambda r: at(r, "ssim")),
  ], args.out, steps=args.steps, eval_examples=len(held_out), train_clips=len(train),
      device=jax.devices()[0].device_kind)


if __name__ == "__main__":
  main()
