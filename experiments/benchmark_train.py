"""Training-step throughput and MFU, side by side with a PyTorch reference of the same shape.

  python -m experiments.benchmark_train --config configs/world_tiny.py [--steps 20] \
      [--warmup 3] [--config.KEY=VALUE ...] [--out benchmark_train.json] [--no-reference]

For the config's model and batch (synthetic data of the config's clip size, or packed
rows for `data.grouping=pack`) on all local devices with the config's mesh, it measures:
compile time; step time (median of --steps after --warmup, each step waited for);
tokens/s; peak memory (device `peak_bytes_in_use` where the backend reports it, else
the host process's peak RSS); analytic model FLOPs per step (`sora_jax.models.flops`)
and MFU against the device's peak (table below; CPU: a measured float32 matmul rate).
In the same run it times diffusers' `WanTransformer3DModel` with the same width,
depth, heads, MLP width, patch, text width and tokens (forward + backward + AdamW, on
CUDA when torch sees a GPU, else CPU) and prints the step-time ratio. The reference
has no text encoder (sora_jax's small one is included in its step and its FLOPs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Sequence


from sora_jax.cli.args import parse_with_config
from experiments.report import markdown_table
from experiments.step_timing import peak_flops_per_device, time_sora_jax
from sora_jax import configs
from sora_jax.configs import latent_channels, latent_shape_of



def time_wan_reference(config, warmup: int, steps: int) -> dict[str, Any] | None:
  """diffusers' WanTransformer3DModel of the same shape: forward + backward + AdamW."""
  try:
    from diffusers import WanTransformer3DModel  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"(reference skipped: {e}; pip install -e '.[torch]')", file=sys.stderr)
    return None
  dit = configs.dit_config(config, text_width=config.text_encoder.width,
                           in_channels=latent_channels(config.autoencoder))
  if config.data.grouping == "pack":
    print("(reference skipped: packed rows have no Wan equivalent)", file=sys.stderr)
    return None
  w, d = config.world, config.data
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = WanTransformer3DModel(
      patch_size=dit.patch, num_attention_heads=dit.heads,
      attention_head_dim=dit.width // dit.heads, in_channels=dit.in_channels,
      out_channels=dit.in_channels,
      text_dim=dit.text_width, freq_dim=dit.freq_dim, ffn_dim=dit.mlp_width,
      num_layers=dit.depth, cross_attn_norm=True, qk_norm="rms_norm_across_heads").to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  t, h, wd, c = latent_shape_of(config.autoencoder, w.frames, w.height, w.width)
  x = torch.randn(d.batch_size, c, t, h, wd, device=device)   # what the transformer diffuses
  text = torch.randn(d.batch_size, d.text_length, dit.text_width, device=device)
  timestep = torch.randint(0, 1000, (d.batch_size,), device=device)

  def step():
    opt.zero_grad()
    out = model(x, timestep, text, return_dict=False)[0]
    out.float().square().mean().backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  for _ in range(warmup + 1):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {"name": f"diffusers WanTransformer3DModel (torch {torch.__version__}, {device})",
          "step_s": statistics.median(times), "threads": torch.get_num_threads()}


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]", help="Config file; overrides as --config.KEY=VALUE.")
  parser.add_argument("--steps", type=int, default=20, help="Timed steps.")
  parser.add_argument("--warmup", type=int, default=3, help="Untimed steps after compilation.")
  parser.add_argument("--vocab", type=int, default=64, help="Text vocabulary size of the synthetic model.")
  parser.add_argument("--out", type=str, default='benchmark_train.json', help="JSON output path.")
  parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True, help="Also time the diffusers Wan reference.")
  args, config = parse_with_config(parser, argv, lock=True)
  config = config
  configs.validate(config)
  result = time_sora_jax(config, vocab=args.vocab, warmup=args.warmup, steps=args.steps)
  peak, peak_source = peak_flops_per_device()
  achieved = result["flops_per_step"] / result["step_s"]
  result.update(tokens_per_s=result["tokens_per_step"] / result["step_s"],
                achieved_flops=achieved, peak_flops_per_device=peak, peak_source=peak_source,
                mfu=achieved / (peak * result["devices"]))
  reference = time_wan_reference(config, args.warmup, args.steps) if args.reference else None
  rows = [result] + ([reference] if reference else [])
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
  if reference:
    print("\n" + markdown_table(rows, [
        ("implementation", lambda r: r["name"]),
        ("step (ms, median)", lambda r: f"{1e3 * r['step_s']:.1f}"),
        ("time vs sora_jax", lambda r: f"{r['step_s'] / result['step_s']:.2f}x"),
    ]))
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"config": configs.to_json(config), "rows": rows}, f, indent=2)
  print(f"\nWrote {args.out}")


if __name__ == "__main__":
  main()
