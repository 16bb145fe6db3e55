"""A block-causal student's own long rollout, made as `sample --stream` makes it, and a
clip-long window of it: Self-Forcing++'s extended DMD (`distill.dmd_rollout_blocks`).

A DMD student trained on clips of the teacher's length only ever sees its own first
seconds; streaming a minute, its later chunks follow a past it never trained on, and they
drift (docs/results/long-video.md). Here the student streams `n` blocks, far past a clip,
through a rolling KV cache of `window` chunks (`kv_cache`, chunk c in slot c mod window, RoPE
positions counting on), in its own few Euler steps per block and without gradient. A window
of a clip's blocks at a random start is then cut from the rollout, and one block of it is
remade with gradient from the cache that block saw while streaming, so the gradient's block
is made exactly as streaming makes it; the teacher and the critic score the window as a
clip. (RoPE attention depends on position differences only, so the window's own positions,
from 0, give the teacher the attention that the rollout's absolute ones would.)

Shape letters: B examples, T latent frames, H' W' latent size, C channels, N tokens per
block.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sora_jax.diffusion.distillation import student_grid
from sora_jax.diffusion.solvers import euler
from sora_jax.models.kv_cache import insert_chunk, select_rows
from sora_jax.models.layers import KVCache

# velocity(x [B, block, H', W', C], index [] int32 chunk, t [B], step size [B], cache)
#   -> the student's average velocity over its step, [B, block, H', W', C]
ChunkVelocity = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, KVCache], jax.Array]
# keys_values(x [B, block, ...] clean, index [] int32, cache) -> the chunk's keys and values
#   at flow time 0, each [depth, B, N, heads, head_dim]
ChunkKeysValues = Callable[[jax.Array, jax.Array, KVCache], tuple[jax.Array, jax.Array]]


def stream_rollout(velocity: ChunkVelocity, keys_values: ChunkKeysValues, noise: jax.Array,
                   cache: KVCache, keep: jax.Array, *, block: int, steps: int, shift: float,
                   window: int) -> tuple[jax.Array, KVCache]:
  """The student's streamed video from `noise [B, T, ...]` and the cache each row's block
  `keep [B]` was made after, without gradient.

  Block c (latent frames c * block ...) is made from its own noise in `steps` Euler steps
  (`solvers.euler`, as streaming makes it) on the student's grid
  (`distillation.student_grid(steps, shift)`, the step input 1/steps), attending to
  `cache`; then its keys and values at time 0 go to slot c mod `window`
  (`autoregressive.sample_chunk` with one pass). `cache`: empty, `window * N`
  slots per row. Returns `(video [B, T, ...] float32, cache before block keep)`. Runs
  T / block * (steps + 1) calls of the student on one block of every row."""
  b, frames = noise.shape[:2]
  if block < 1 or frames % block:
    raise ValueError(f"{frames} latent frames do not split into causal blocks of {block}.")
  grid = student_grid(steps, shift)
  size = jnp.full((b,), 1.0 / steps)

  def make(j, carry):
    video, cache, kept = carry
    kept = select_rows(keep == j, cache, kept)
    x = euler(lambda y, t: velocity(y, j, t, size, cache),
              jax.lax.dynamic_slice_in_dim(video, j * block, block, axis=1), grid)
    keys, values = keys_values(x, j, cache)
    cache = insert_chunk(cache, keys, values, j % window)
    return jax.lax.dynamic_update_slice_in_dim(video, x, j * block, axis=1), cache, kept

  video, _, kept = jax.lax.fori_loop(0, frames // block, make,
                                     (noise.astype(jnp.float32), cache, cache))
  return jax.lax.stop_gradient((video, kept))


def rows_slice(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """Per row, frames `start [B] ... start + size` of `x [B, T, ...]`: `[B, size, ...]`."""
  return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, size, axis=0))(x, start)


def windows(key: jax.Array, batch: int, blocks: int, clip_blocks: int,
            at_start: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """`(start, remade)`, each `[batch]` block indices into a rollout of `blocks`: a window
  of `clip_blocks` at block 0 with probability `at_start` (the stream's first seconds,
  where its scene is set), else at a start drawn uniformly, and the block of it remade
  with gradient, drawn uniformly within it."""
  if blocks < clip_blocks:
    raise ValueError(f"distill.dmd_rollout_blocks={blocks}: a rollout shorter than the "
                     f"training clip's {clip_blocks} blocks; use 0 (the clip) or >= "
                     f"{clip_blocks}.")
  k_first, k_start, k_block = jax.random.split(key, 3)
  start = jax.random.randint(k_start, (batch,), 0, blocks - clip_blocks + 1)
  start = jnp.where(jax.random.uniform(k_first, (batch,)) < at_start, 0, start)
  return start, start + jax.random.randint(k_block, (batch,), 0, clip_blocks)
