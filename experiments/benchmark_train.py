"""Training-step throughput and MFU of a config.

  python -m experiments.benchmark_train --config configs/world_tiny.py [--steps 20] \
      [--warmup 3] [--config.KEY=VALUE ...] [--out benchmark_train.json]

For the config's model and batch (synthetic data of the config's clip size, or packed
rows for `data.grouping=pack`) on all local devices with the config's mesh, it measures:
compile time; step time (median of --steps after --warmup, each step waited for);
tokens/s; peak memory (device `peak_bytes_in_use` where the backend reports it, else
the host process's peak RSS); analytic model FLOPs per step (`sora_jax.models.flops`)
and MFU against the device's peak (CPU: a measured float32 matmul rate). The config's
own step is measured, its text encoder included.

The side-by-side with PyTorch on identical work (the same Wan architecture, weights and
inputs on both sides) is `experiments/versus_diffusers.py`; on a GPU,
`experiments/device_bench.py`.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from experiments.report import markdown_table
from experiments.step_timing import peak_flops_per_device, time_sora_jax
from sora_jax import configs
from sora_jax.cli.args import parse_with_config


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]", help="Config file; overrides as --config.KEY=VALUE.")
  parser.add_argument("--steps", type=int, default=20, help="Timed steps.")
  parser.add_argument("--warmup", type=int, default=3, help="Untimed steps after compilation.")
  parser.add_argument("--vocab", type=int, default=64, help="Text vocabulary size of the synthetic model.")
  parser.add_argument("--out", type=str, default='benchmark_train.json', help="JSON output path.")
  args, config = parse_with_config(parser, argv, lock=True)
  configs.validate(config)
  result = time_sora_jax(config, vocab=args.vocab, warmup=args.warmup, steps=args.steps)
  peak, peak_source = peak_flops_per_device()
  achieved = result["flops_per_step"] / result["step_s"]
  result.update(tokens_per_s=result["tokens_per_step"] / result["step_s"],
                achieved_flops=achieved, peak_flops_per_device=peak, peak_source=peak_source,
                mfu=achieved / (peak * result["devices"]))
  print(markdown_table([result], [
      ("devices", lambda r: f"{r['devices']} x {r['device_kind']}"),
      ("step (ms, median)", lambda r: f"{1e3 * r['step_s']:.1f}"),
      ("compile (s)", lambda r: f"{r['compile_s']:.1f}"),
      ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
      ("model TFLOP/step", lambda r: f"{r['flops_per_step'] / 1e12:.4f}"),
      ("achieved TFLOP/s", lambda r: f"{r['achieved_flops'] / 1e12:.3f}"),
      ("MFU", lambda r: f"{r['mfu']:.1%} of {r['peak_source']}"),
      ("memory (MiB)", lambda r: f"{r['memory_bytes'] / 2**20:,.0f} ({r['memory_kind']})"),
  ]))
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"config": configs.to_json(config), "rows": [result]}, f, indent=2)
  print(f"\nWrote {args.out}")


if __name__ == "__main__":
  main()
