"""Timing the train step of a config on synthetic batches (shared by the benchmarks).

`time_sora_jax(config)` compiles the config's train step on all local devices with the
config's mesh and times it on a synthetic batch of its layout; `peak_flops_per_device`
gives the MFU denominator.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import configs
from sora_jax.data.pipeline import to_global_batch
from sora_jax.configs import latent_channels, latent_shape_of
from sora_jax.train.autoencoders import make_autoencoder
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.flops import train_step_flops
from sora_jax.parallel.sharding import make_mesh
from sora_jax.train import optim
from sora_jax.train.state import create_train_state
from sora_jax.train.step import make_train_step

# Dense bf16 peak FLOP/s per chip (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}



def peak_flops_per_device() -> tuple[float, str]:
  """The device's peak FLOP/s and where the figure comes from."""
  device = jax.devices()[0]
  for name, peak in PEAK_FLOPS.items():
    if device.device_kind.startswith(name):
      return peak, f"{name} bf16 peak"
  if device.platform == "cpu":   # measured: a float32 matmul on all threads
    a = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
      matmul(a).block_until_ready()
    return 5 * 2 * 2048 ** 3 / (time.perf_counter() - start), "measured CPU f32 matmul"
  return float("nan"), f"unknown device {device.device_kind}"


def synthetic_batch(config, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int, int]:
  """A batch of the config's layout; returns (batch, tokens per example/row, examples)."""
  w, d = config.world, config.data
  patch = configs.decode_variant(config.model.variant)["patch"]
  length = d.text_length
  if d.grouping == "pack":
    n, p = d.tokens_per_row, int(np.prod(patch)) * 3
    size = configs.world_config(config).all_sizes[0]
    per = num_tokens(size, patch)
    k = min(d.max_examples_per_row, n // per)
    seg = np.zeros((d.batch_size, n), np.int32)
    for j in range(k):
      seg[:, j * per:(j + 1) * per] = j + 1
    grid = np.stack(np.meshgrid(*[np.arange(s // q) for s, q in zip(size, patch)],
                                indexing="ij"), -1).reshape(-1, 3)
    positions = np.zeros((d.batch_size, n, 3), np.int32)
    positions[:, :k * per] = np.tile(grid, (k, 1))
    text_seg = np.zeros((d.batch_size, d.text_tokens_per_row), np.int32)
    for j in range(k):
      text_seg[:, j * 8:(j + 1) * 8] = j + 1
    batch = {"patches": rng.uniform(-1, 1, (d.batch_size, n, p)).astype(np.float32),
             "positions": positions, "segment_ids": seg,
             "text_ids": np.where(text_seg > 0, 5, 0).astype(np.int32),
             "text_segment_ids": text_seg,
             "text_positions": np.tile(np.arange(d.text_tokens_per_row) % 8,
                                       (d.batch_size, 1)).astype(np.int32)}
    return batch, n, d.batch_size * k
  ids = np.zeros((d.batch_size, length), np.int32)
  ids[:, :length // 2] = 5
  latent = latent_shape_of(config.autoencoder, w.frames, w.height, w.width)
  if d.get("latents_dir"):      # cached latents: the step reads them, encodes nothing
    x = {"latent": rng.normal(size=(d.batch_size,) + latent).astype(np.float32)}
  else:
    x = {"video": rng.uniform(-1, 1, (d.batch_size, w.frames, w.height, w.width, 3)
                              ).astype(np.float32)}
  return ({**x, "text_ids": ids, "text_mask": ids != 0}, num_tokens(latent[:3], patch),
          d.batch_size)


def time_sora_jax(config, *, vocab: int = 64, warmup: int = 3, steps: int = 20
                  ) -> dict[str, Any]:
  """Compiles and times the config's train step on a synthetic batch (median of `steps`)."""
  mesh = make_mesh(configs.mesh_shape(config))
  tx = optim.make_optimizer(config.optim, max(config.train.steps, 1))
  graphdef, state, shardings = create_train_state(config, vocab, mesh, tx)
  null = np.zeros(config.data.text_length, np.int32)
  null[0] = 1
  step = make_train_step(config, graphdef, tx, shardings, mesh,
                         make_autoencoder(config.autoencoder), null, null != 0)
  batch, tokens, examples = synthetic_batch(config, np.random.default_rng(0))
  batch = to_global_batch(batch, mesh, configs.sharding_rules(config))
  start = time.perf_counter()
  compiled = step.compile(state, batch)
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peak = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0)
  memory = (peak, "device peak") if peak else (
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS")
  dit = configs.dit_config(config, text_width=config.text_encoder.width,
                           in_channels=latent_channels(config.autoencoder))
  text_tokens = (config.data.text_tokens_per_row if config.data.grouping == "pack"
                 else config.data.text_length)
  flops = train_step_flops(dit, configs.text_encoder_config(config, vocab), tokens,
                           text_tokens, config.data.batch_size,
                           config.flow.self_condition_rate)
  return {"name": "sora_jax", "step_s": statistics.median(times), "compile_s": compile_s,
          "tokens_per_step": tokens * config.data.batch_size, "examples_per_step": examples,
          "flops_per_step": flops, "memory_bytes": memory[0], "memory_kind": memory[1],
          "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}
