"""The GPU measurement, in one command: a Wan 2.1 1.3B-shaped DiT in bfloat16, trained and
sampled by sora_jax and by diffusers/torch on the same shapes and random weights.

  bash experiments/device_bench.sh          # on a lent GPU: installs .whl/, writes to $OUT
  python -m experiments.device_bench [--tiny] [--out-dir DIR] [--budget-s 420] \
      [--tokens 16k,32k] [--sampling-steps 50] [--student-steps 4]

Sections, in this order (torch first: JAX's allocator keeps what it has taken, torch's
gives its cache back), each skipped and reported "not measured (time budget)" once
`--budget-s` seconds have passed:

  ceilings   measured rates on this device: a bf16 8192^3 matmul (JAX) and a
             device-to-device copy
  train      per tokens-per-sample size, batch 1: torch (diffusers' transformer, SDPA,
             float32 weights under bf16 autocast, fused AdamW; gradient checkpointing only
             if it runs out of memory without) and sora_jax's own train step (bf16
             compute, cuDNN attention, scanned blocks, remat "dots"): step time, tokens/s,
             MFU (analytic model FLOPs, `sora_jax.models.flops`, over 989 TFLOP/s dense
             bf16), peak memory
  sampling   480x832x81 (32,760 tokens), `--sampling-steps` Euler steps with guidance 5
             from precomputed text states, one timed run after compiling / a 2-step
             warm-up, in two measured parts: the denoising steps (transformer only) and
             the VAE decode, and end to end; `WanPipeline` vs `sample_from_text_states`;
             then sora_jax with step caching at the most skipping schedule MagCache's
             rule allows (`CACHED`: 20% computed first, then two of every three
             evaluations reuse the blocks' residual), the cost side of caching (random
             weights have no quality to keep); and one pass per step (guidance 1) at
             `--student-steps` and at `--sampling-steps` steps: the compute of a distilled
             few-step student and of a CFG-distilled one (`sora-jax distill`; a student's
             step or guidance input adds two small matmuls per step); then streaming: a
             block-causal twin of the same weights (`model.causal_frames=1`: a block per
             latent frame) made autoregressively a latent frame per chunk after a cache
             of 4 chunks (`sora_jax.autoregressive.stream`, text encoder and VAE decode
             included): seconds to the first frames, frames per second after them,
             seconds of the first and the last chunk

It writes device_bench.json and device_bench.md (the table) to --out-dir. --tiny runs the
same code at a tiny size on whatever device there is (the CPU test keeps it working).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

# Before JAX starts: take device memory as needed (torch shares the device), not 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import versus_diffusers as vd  # pylint: disable=wrong-import-position
from experiments.report import markdown_table  # pylint: disable=wrong-import-position
from sora_jax.diffusion import step_cache  # pylint: disable=wrong-import-position
from sora_jax.interop.wan import dit_config_from_diffusers  # pylint: disable=wrong-import-position
from sora_jax.interop.wan_import import import_wan  # pylint: disable=wrong-import-position
from sora_jax.models import attention as attention_ops  # pylint: disable=wrong-import-position
from sora_jax.models.flops import dit_forward_flops  # pylint: disable=wrong-import-position
from sora_jax import autoregressive  # pylint: disable=wrong-import-position
from sora_jax.sample import Sampler, initial_noise  # pylint: disable=wrong-import-position
from sora_jax.train.state import abstract_model  # pylint: disable=wrong-import-position
from sora_jax.train.workdir import load_config  # pylint: disable=wrong-import-position

PEAK_BF16 = 989e12      # H100/H200 SXM dense bf16, the vendor's figure
# Wan 2.1 1.3B's transformer with UMT5-XXL's text width and Wan's VAE, batch 1; latent
# grids [T', H', W'] per tokens-per-sample size (patch 1x2x2).
FULL = dict(heads=12, layers=30, ffn=8960, text_dim=4096, batch=1, vae_base_dim=96,
            vae_res_blocks=2)
GRIDS = {"16k": (21, 40, 78), "32k": (21, 60, 104)}        # 16,380 and 32,760 tokens
TINY = dict(heads=2, layers=2, ffn=128, text_dim=64, batch=1, vae_base_dim=8,
            vae_res_blocks=1, text_length=16)
TINY_GRIDS = {"16k": (2, 4, 4), "32k": (2, 8, 8)}


class Budget:
  """Seconds left of the run; a section runs only while some are."""

  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()


def run_section(results: dict, key: str, budget: Budget, fn: Callable[[], Any],
                save: Callable[[], Any] = lambda: None) -> None:
  """results[key] = fn(), or why not: out of budget, out of memory, or the error's line;
  then `save()`, so that a run stopped from outside keeps every section it finished."""
  if budget.left() <= 0:
    results[key] = {"not_measured": "time budget"}
    print(f"[{key}] not measured: time budget spent", flush=True)
    save()
    return
  start = time.monotonic()
  try:
    results[key] = fn()
  except Exception as e:  # pylint: disable=broad-except
    results[key] = {"not_measured": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  results[key]["section_s"] = time.monotonic() - start
  print(f"[{key}] {json.dumps(results[key])[:400]}", flush=True)
  save()


def step_times(fn: Callable[[], Any], warmup: int, steps: int) -> dict[str, float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"step_ms": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
          "step_ms_max": 1e3 * max(times), "steps": steps}


# Sections ----------------------------------------------------------------------

def ceilings(tiny: bool) -> dict[str, Any]:
  n = 512 if tiny else 8192
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a)
  t = step_times(lambda: matmul(a).block_until_ready(), 3, 10)
  copy = jax.jit(lambda x: x * 1)      # reads and writes every byte once
  x = jnp.ones(((64 if tiny else 4096) * 2 ** 20,), jnp.bfloat16)
  c = step_times(lambda: copy(x).block_until_ready(), 3, 10)
  return {"bf16_matmul_tflops": 2 * n ** 3 / (t["step_ms"] / 1e3) / 1e12, "matmul_n": n,
          "copy_gb_per_s": 2 * x.nbytes / (c["step_ms"] / 1e3) / 1e9}


def attention_kernel(tiny: bool) -> dict[str, Any]:
  """The attention the GPU train step and sampler run (`model.attention=dot_product`:
  `models.attention.cudnn_attention`) at Wan 1.3B's 32,760 tokens and 12 heads of 128,
  bfloat16, against the float32 XLA reference on the same inputs: whether the compiled
  program calls cuDNN's fused kernel, its relative error, and the time of the forward and
  of forward + backward on each side (4 B H Q K D FLOPs forward; 3.5x that both ways,
  the backward recomputing the scores)."""
  b, n, h, d = (1, 256, 2, 64) if tiny else (1, 32760, 12, 128)
  q, k, v, g = (jax.random.normal(key, (b, n, h, d), jnp.bfloat16)
                for key in jax.random.split(jax.random.PRNGKey(1), 4))
  result: dict[str, Any] = {"shape": [b, n, h, d]}
  for name, attend in (("cudnn_attention", attention_ops.cudnn_attention),
                       ("xla_reference", attention_ops.dot_product_attention)):
    forward = jax.jit(attend)
    both = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(attend(q, k, v).astype(jnp.float32),
                                                     g.astype(jnp.float32)), (0, 1, 2)))
    hlo = forward.lower(q, k, v).compile().as_text()
    out = forward(q, k, v)
    flops = 4 * b * h * n * n * d
    fwd = step_times(lambda: forward(q, k, v).block_until_ready(), 2, 5)
    bwd = step_times(lambda: jax.block_until_ready(both(q, k, v)), 2, 5)
    result[name] = {"calls_cudnn_kernel": "__cudnn$fmha" in hlo,
                    "forward_ms": fwd["step_ms"], "forward_tflops": flops / fwd["step_ms"] / 1e9,
                    "forward_backward_ms": bwd["step_ms"],
                    "forward_backward_tflops": 3.5 * flops / bwd["step_ms"] / 1e9}
    if name == "cudnn_attention":
      reference = attention_ops.dot_product_attention(
          *(t.astype(jnp.float32) for t in (q, k, v)))
      result[name]["rel_error"] = float(jnp.linalg.norm(out.astype(jnp.float32) - reference)
                                        / jnp.linalg.norm(reference))
  return result


def model_flops(c: vd.Case) -> float:
  """Analytic model FLOPs of one training step (forward + backward = 3x forward)."""
  cfg = dit_config_from_diffusers({
      "num_attention_heads": c.heads, "attention_head_dim": vd.HEAD_DIM, "num_layers": c.layers,
      "patch_size": [1, 2, 2], "in_channels": vd.LATENT_CHANNELS, "text_dim": c.text_dim,
      "ffn_dim": c.ffn, "freq_dim": 256})
  return 3.0 * c.batch * dit_forward_flops(cfg, c.tokens, c.text_length)


def with_rates(times: dict[str, float], c: vd.Case, memory_bytes: float) -> dict[str, Any]:
  seconds = times["step_ms"] / 1e3
  flops = model_flops(c)
  return {**times, "tokens": c.tokens, "tokens_per_s": c.batch * c.tokens / seconds,
          "model_tflop_per_step": flops / 1e12, "mfu": flops / seconds / PEAK_BF16,
          "peak_memory_gib": memory_bytes / 2 ** 30}


def inputs(c: vd.Case) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  t, h, w = c.latents
  return {"latents": rng.standard_normal((c.batch, t, h, w, vd.LATENT_CHANNELS), np.float32),
          "text": rng.standard_normal((c.batch, c.text_length, c.text_dim), np.float32),
          "null_text": rng.standard_normal((c.batch, c.text_length, c.text_dim), np.float32)}


def torch_train(side: vd.Diffusers, c: vd.Case, steps: int) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  data = inputs(c)
  cuda = side.device == "cuda"
  result = {}
  for checkpointing in (False, True):
    try:
      if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
      call = side.train_step(data["latents"], data["text"], grad_clip=1.0, lr=1e-5,
                             checkpointing=checkpointing)
      times = step_times(call, 3, steps)
      memory = torch.cuda.max_memory_allocated() if cuda else float("nan")
      result = {**with_rates(times, c, memory), "gradient_checkpointing": checkpointing}
      break
    except torch.cuda.OutOfMemoryError:      # then once more, with checkpointing
      result = {"not_measured": "out of memory without gradient checkpointing"}
  if cuda:
    torch.cuda.empty_cache()
  return result


def torch_sampling(side: vd.Diffusers, c: vd.Case, steps: int) -> dict[str, Any]:
  data = inputs(c)
  noise = np.asarray(initial_noise(np.zeros(1, np.int32), c.latents + (vd.LATENT_CHANNELS,)))
  return side.timed_sampling(c, data["text"][:1], data["null_text"][:1], noise, steps, 5.0)


def jax_train(side: vd.SoraJax, c: vd.Case, steps: int) -> dict[str, Any]:
  data = inputs(c)
  start = time.perf_counter()
  call = side.train_step(data["latents"], data["text"])
  call()                               # compiles
  compile_s = time.perf_counter() - start
  times = step_times(call, 2, steps)
  stats = jax.devices()[0].memory_stats() or {}
  return {**with_rates(times, c, stats.get("peak_bytes_in_use", float("nan"))),
          "first_step_s": compile_s}


def cached_schedule(steps: int) -> tuple[bool, ...]:
  """The most skipping schedule of MagCache's rule for `steps` Euler steps: constant
  magnitude ratios (no error ever accumulates), so only the retained first 20% and every
  third evaluation after them are computed."""
  return tuple(bool(s) for s in step_cache.skip_schedule(np.ones(steps), threshold=1.0))


def jax_sampling(side: vd.SoraJax, c: vd.Case, steps: int, cached: bool = False,
                 cfg_scale: float = 5.0) -> dict[str, Any]:
  """Timed sampling; `cfg_scale` 1: one pass per step (a distilled student's compute)."""
  data = inputs(c)
  skips = cached_schedule(steps) if cached else None
  out = side.timed_sampling(data["text"][:1], data["null_text"][:1], steps, cfg_scale,
                            cache_skips=skips)
  calls = steps - sum(skips or ())
  return {**out, "transformer_calls": calls,
          "forward_passes": calls * (1 if cfg_scale == 1.0 else 2)}


def jax_stream(side: vd.SoraJax, c: vd.Case, steps: int, window: int = 4) -> dict[str, Any]:
  """Streaming the latent grid of `c` with a block-causal twin of the imported weights
  (random weights: the cost of streaming, not its quality)."""
  base = side.sampler
  config = base.config.copy_and_resolve_references()
  config.model.causal_frames = 1
  graphdef, _ = abstract_model(config, base.tokenizer.vocab_size)
  causal = Sampler(config, base.tokenizer, graphdef, side.params, mesh=base.mesh)
  t, h, w = c.latents
  probe = causal.autoencoder.latent_shape(1 + causal.autoencoder.temporal_factor, 64, 64, 3)
  spatial = 64 // probe[1]
  frames = 1 + causal.autoencoder.temporal_factor * (t - 1)
  stats = autoregressive.StreamStats()
  start = time.perf_counter()
  made = sum(len(f) for f in autoregressive.stream(
      causal, "a cat walks on the grass", 0, frames=frames, height=spatial * h,
      width=spatial * w, window=window, steps=steps, stats=stats))
  return {"end_to_end_s": time.perf_counter() - start, "frames": made, "chunks": t,
          "window": window, "first_frames_s": stats.first_frames_s,
          "frames_per_s": stats.frames_per_s, "first_chunk_after_s": stats.chunk_s[0],
          "last_chunk_s": stats.chunk_s[-1]}


# The run -------------------------------------------------------------------------

def table(results: dict[str, Any], sizes: Sequence[str], sampling_steps: int,
          student_steps: int) -> str:
  def get(key, field, fmt):
    r = results.get(key, {})
    return fmt.format(r[field]) if field in r else r.get("not_measured", "not measured")

  rows = []
  attention = results.get("attention", {})
  for name, side in (("cudnn_attention", "sora_jax dot_product (cuDNN)"),
                     ("xla_reference", "sora_jax xla (reference)")):
    r = attention.get(name)
    rows.append({"what": "attention alone, 32,760 tokens x 12 heads of 128, bf16: forward / "
                         "forward + backward", "side": side,
                 "time": (f"{r['forward_ms']:.1f} ms / {r['forward_backward_ms']:.1f} ms"
                          if r else attention.get("not_measured", "not measured")),
                 "tokens/s": "", "MFU": (f"{r['forward_backward_tflops'] * 1e12 / PEAK_BF16:.1%}"
                                         if r else ""),
                 "peak memory": ""})
  for size in sizes:
    for side in ("sora_jax", "torch"):
      key = f"train_{size}_{side}"
      rows.append({"what": f"train step, {size} tokens/sample, batch 1", "side": side,
                   "time": get(key, "step_ms", "{:.1f} ms"),
                   "tokens/s": get(key, "tokens_per_s", "{:,.0f}"),
                   "MFU": get(key, "mfu", "{:.1%}"),
                   "peak memory": get(key, "peak_memory_gib", "{:.1f} GiB")})
  for part, field in (("transformer only", "transformer_s"), ("VAE decode", "decode_s"),
                      ("end to end", "end_to_end_s")):
    for side in ("sora_jax", "torch"):
      rows.append({"what": f"sampling {sampling_steps} steps + CFG, {part}", "side": side,
                   "time": get(f"sampling_{side}", field, "{:.1f} s"), "tokens/s": "",
                   "MFU": "", "peak memory": ""})
  calls = sampling_steps - sum(cached_schedule(sampling_steps))
  rows.append({"what": f"sampling {sampling_steps} steps + CFG, step caching ({calls} "
                       "transformer calls), transformer only", "side": "sora_jax",
               "time": get("sampling_sora_jax_cached", "transformer_s", "{:.1f} s"),
               "tokens/s": "", "MFU": "", "peak memory": ""})
  for steps, who in ((student_steps, "a few-step student"),
                     (sampling_steps, "a CFG-distilled student")):
    rows.append({"what": f"sampling {steps} steps, one pass each ({who}), end to end",
                 "side": "sora_jax",
                 "time": get(f"sampling_sora_jax_one_pass_{steps}", "end_to_end_s", "{:.1f} s"),
                 "tokens/s": "", "MFU": "", "peak memory": ""})
  stream = results.get("stream_sora_jax", {})
  rows.append({"what": f"streaming {sampling_steps} steps + CFG, a latent frame per chunk "
                       "(block-causal twin): first frames / each later chunk", "side": "sora_jax",
               "time": (f"{stream['first_frames_s']:.2f} s / {stream['last_chunk_s']:.2f} s"
                        if "first_frames_s" in stream
                        else stream.get("not_measured", "not measured")),
               "tokens/s": (f"{stream['frames_per_s']:.1f} frames/s"
                            if stream.get("frames_per_s") else ""),
               "MFU": "", "peak memory": ""})
  columns = [(k, (lambda k: lambda r: r[k])(k)) for k in rows[0]]
  return markdown_table(rows, columns)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the measurement; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="A tiny model (the CPU test).")
  parser.add_argument("--out-dir", default=os.environ.get("OUT", "."),
                      help="Where device_bench.json and device_bench.md go (default $OUT).")
  parser.add_argument("--budget-s", type=float, default=420.0,
                      help="Seconds after which remaining sections are skipped.")
  parser.add_argument("--tokens", default="16k,32k", help=f"Sizes of {sorted(GRIDS)}.")
  parser.add_argument("--sampling-steps", type=int, default=50, help="Solver steps.")
  parser.add_argument("--student-steps", type=int, default=4,
                      help="Steps of the one-pass row of a few-step student.")
  parser.add_argument("--train-steps", type=int, default=5, help="Timed train steps.")
  parser.add_argument("--sections", default="ceilings,attention,train,sampling",
                      help="Comma-separated: ceilings, attention, train, sampling.")
  args = parser.parse_args(argv)
  sizes = [s.strip() for s in args.tokens.split(",") if s.strip()]
  if not sizes or set(sizes) - set(GRIDS):
    raise SystemExit(f"device_bench: --tokens={args.tokens!r}; expected some of {sorted(GRIDS)}.")
  sections = {s.strip() for s in args.sections.split(",") if s.strip()}
  if not sections or sections - {"ceilings", "attention", "train", "sampling"}:
    raise SystemExit(f"device_bench: --sections={args.sections!r}; expected some of "
                     "ceilings, attention, train, sampling.")
  os.makedirs(args.out_dir, exist_ok=True)
  budget = Budget(args.budget_s)
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
  attention = "dot_product" if jax.default_backend() == "gpu" else "auto"   # cuDNN on GPU
  spec, grids = (TINY, TINY_GRIDS) if args.tiny else (FULL, GRIDS)
  results: dict[str, Any] = {"environment": vd.environment(), "arguments": vars(args)}
  print(json.dumps(results["environment"]), flush=True)

  def save() -> str:
    """Writes the JSON and the table of what is measured so far (rewritten after each
    section); returns the table with its header."""
    text = table(results, sizes, args.sampling_steps, args.student_steps)
    header = (f"Device: {results['environment']['device']} (jax {jax.__version__}, torch "
              f"{torch.__version__}); {'tiny model' if args.tiny else 'Wan 2.1 1.3B shape'}, "
              f"{dtype}. MFU: analytic model FLOPs over {PEAK_BF16 / 1e12:.0f} TFLOP/s.")
    with open(os.path.join(args.out_dir, "device_bench.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, default=str)
    with open(os.path.join(args.out_dir, "device_bench.md"), "w", encoding="utf-8") as f:
      f.write(header + "\n\n" + text + "\n")
    return header + "\n\n" + text

  if "ceilings" in sections:
    run_section(results, "ceilings", budget, lambda: ceilings(args.tiny), save)
  if "attention" in sections:
    run_section(results, "attention", budget, lambda: attention_kernel(args.tiny), save)

  work = None   # the random Wan weights and their import: gigabytes at full size
  try:
    sides: dict[str, Any] = {}     # each side loaded once, when a section first needs it
    if sections & {"train", "sampling"}:
      cases = {size: vd.Case(name=f"wan1.3b-{size}", latents=grids[size], **spec)
               for size in sorted(set(sizes) | ({"32k"} if "sampling" in sections else set()))}
      # One set of random weights serves every size (the transformer does not depend on it).
      start = time.perf_counter()
      work = tempfile.mkdtemp(prefix="device_bench_")
      first = cases[sizes[0]]
      wan_dir = vd.save_wan_pipeline(first, work)
      config = vd.preset(first, scan_layers=True, remat="dots", compute_dtype=dtype,
                         attention=attention)
      imported = import_wan(wan_dir, os.path.join(work, "imported"), config)
      results["setup_s"] = time.perf_counter() - start
      sampled = cases.get("32k", first)

      def torch_side() -> vd.Diffusers:
        if "torch" not in sides:
          sides["torch"] = vd.Diffusers(wan_dir, device=device, dtype=(
              torch.bfloat16 if device == "cuda" else torch.float32))
        return sides["torch"]

      def jax_side() -> vd.SoraJax:
        if "jax" not in sides:
          jax_config = load_config(imported)
          jax_config.train.compute_dtype = dtype
          sides["jax"] = vd.SoraJax(imported, sampled, jax_config)
        return sides["jax"]

    # torch first (it gives its cache back; JAX's pool stays), the 32k rows before 16k:
    # what the budget leaves out is the least needed.
    order = sorted(sizes, key=lambda size: size != "32k")
    if "train" in sections:
      for size in order:
        run_section(results, f"train_{size}_torch", budget,
                    lambda size=size: torch_train(torch_side(), cases[size], args.train_steps),
                    save)
    if "sampling" in sections:
      run_section(results, "sampling_torch", budget,
                  lambda: torch_sampling(torch_side(), sampled, args.sampling_steps), save)
    if sides.pop("torch", None) is not None and device == "cuda":
      torch.cuda.empty_cache()
    if "train" in sections and "32k" in sizes:
      run_section(results, "train_32k_sora_jax", budget,
                  lambda: jax_train(jax_side(), cases["32k"], args.train_steps), save)
    if "sampling" in sections:
      run_section(results, "sampling_sora_jax", budget,
                  lambda: jax_sampling(jax_side(), sampled, args.sampling_steps), save)
      run_section(results, "sampling_sora_jax_cached", budget,
                  lambda: jax_sampling(jax_side(), sampled, args.sampling_steps, cached=True),
                  save)
      for steps in dict.fromkeys((args.student_steps, args.sampling_steps)):
        run_section(results, f"sampling_sora_jax_one_pass_{steps}", budget,
                    lambda steps=steps: jax_sampling(jax_side(), sampled, steps, cfg_scale=1.0),
                    save)
      run_section(results, "stream_sora_jax", budget,
                  lambda: jax_stream(jax_side(), sampled, args.sampling_steps), save)
    if "train" in sections:
      for size in (s for s in order if s != "32k"):
        run_section(results, f"train_{size}_sora_jax", budget,
                    lambda size=size: jax_train(jax_side(), cases[size], args.train_steps),
                    save)

    print("\n" + save(), flush=True)
    print(f"\nWrote {args.out_dir}/device_bench.json and device_bench.md", file=sys.stderr)
  finally:
    if work is not None:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
