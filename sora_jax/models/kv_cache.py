"""The rolling KV cache of a block-causal transformer's chunks (`layers.KVCache`): an empty
one, a chunk written into its slot, and a chunk's token positions in the whole video.

Used by streaming (`sora_jax.autoregressive`) and by the student's own long rollouts in
distillation (`sora_jax.train.long_rollout`). Shape letters: B rows, L cache tokens,
N tokens per chunk, H heads, D head width.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from sora_jax.models.dit import DiTConfig
from sora_jax.models.embeddings import grid_positions
from sora_jax.models.layers import KVCache


def empty_cache(cfg: DiTConfig, rows: int, tokens: int, dtype=jnp.float32,
                layout: KVCache | None = None) -> KVCache:
  """A cache of `tokens` empty slots per row: keys and values `[depth, rows, L, H, D]`,
  placed by `layout` (`layers.cache_sharding`) when given."""
  shape = cfg.kv_cache_shape(rows, tokens)
  cache = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                  jnp.zeros((rows, tokens), bool))
  return cache if layout is None else jax.device_put(cache, layout)


def insert_chunk(cache: KVCache, keys: jax.Array, values: jax.Array,
                 slot: jax.Array) -> KVCache:
  """The cache with a chunk's keys and values `[depth, rows, N, H, D]` written to slot
  `slot` (tokens `slot * N ... (slot + 1) * N`), marked valid."""
  start = slot * keys.shape[2]
  at = (0, 0, start, 0, 0)
  return KVCache(jax.lax.dynamic_update_slice(cache.keys, keys.astype(cache.keys.dtype), at),
                 jax.lax.dynamic_update_slice(cache.values, values.astype(cache.values.dtype),
                                              at),
                 jax.lax.dynamic_update_slice(cache.valid, jnp.ones(keys.shape[1:3], bool),
                                              (0, start)))


def chunk_positions(index: jax.Array, grid: Sequence[int]) -> jax.Array:
  """`[N, 3]` (t, h, w) token positions of chunk `index` with patch grid `grid` (c/pt, h, w):
  its frames' place in the whole video. `index`: a scalar, or `[B]` (one chunk per row:
  `[B, N, 3]`)."""
  index = jnp.asarray(index)
  offset = jnp.asarray([1, 0, 0]) * (index * grid[0])[..., None, None]
  return grid_positions(tuple(grid)) + offset


def select_rows(chosen: jax.Array, new: KVCache, old: KVCache) -> KVCache:
  """Per row, `new`'s cache where `chosen [B]` is True, else `old`'s."""
  rows = lambda ndim, axis: chosen.reshape((1,) * axis + (-1,) + (1,) * (ndim - axis - 1))
  return KVCache(jnp.where(rows(new.keys.ndim, 1), new.keys, old.keys),
                 jnp.where(rows(new.values.ndim, 1), new.values, old.values),
                 jnp.where(rows(new.valid.ndim, 0), new.valid, old.valid))
