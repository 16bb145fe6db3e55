"""Context parallelism: attention over a sequence split across the `sequence` mesh axis,
by a ring of key/value chunks or by all-to-all over the heads (Ulysses).

Ring attention (Liu et al., 2023): every device keeps its chunk of queries and passes
its chunk of keys/values (and their segment ids) around the ring with `ppermute`;
each of the P steps attends to one chunk and merges it into running softmax
statistics (online softmax), so no device ever holds the whole sequence's keys; within a
chunk, keys go `kv_block` at a time (flash-style), so no device holds a chunk's whole
score matrix either.
The result equals `models.attention.dot_product_attention` with a segment mask,
forward and backward (autodiff through `shard_map` and `ppermute`).

Cached attention (`cached_attention`, autoregressive sampling) attends a chunk's queries
to a KV cache whose tokens are split over the same axis, by a split of the keys across
devices (flash decoding's): the cache stays where it is.

Ulysses attention (`ulysses_attention`) trades the token split for a head split with two
all-to-alls, so that each device runs an ordinary attention kernel (splash on TPU) over
the whole sequence for its share of the heads.

Shape letters: B batch, N tokens (sharded over the ring), H heads, D head dim.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

_NEG = jnp.finfo(jnp.float32).min


def _merge(carry, q, k, v, q_seg, kv_seg, scale, q_blk=None, kv_blk=None):
  """Merges the attention of local queries to one block of keys/values into the carry
  (softmax statistics in float32; the weights meet the values in the values' dtype with
  float32 accumulation, as flash attention kernels do). q_seg/kv_seg: segment ids (a query attends to its own segment); q_blk/kv_blk: causal
  block indices (a query attends to keys of its own block and earlier ones); either pair
  may be None."""
  out, row_max, row_sum = carry                                             # [B,Nq,H,D], [B,H,Nq]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  allowed = None
  if q_seg is not None:
    allowed = q_seg[:, :, None] == kv_seg[:, None, :]
  if q_blk is not None:
    causal = kv_blk[:, None, :] <= q_blk[:, :, None]
    allowed = causal if allowed is None else allowed & causal
  if allowed is not None:
    logits = jnp.where(allowed[:, None], logits, _NEG)
  new_max = jnp.maximum(row_max, logits.max(-1))
  correction = jnp.exp(row_max - new_max)
  weights = jnp.exp(logits - new_max[..., None])
  row_sum = row_sum * correction + weights.sum(-1)
  out = (out * jnp.transpose(correction, (0, 2, 1))[..., None]
         + jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                      preferred_element_type=jnp.float32))
  return out, new_max, row_sum


def _ring_step(carry, q, k, v, q_seg, kv_seg, scale, block, q_blk=None, kv_blk=None):
  """Merges the local queries' attention to one chunk of keys/values, `block` keys at a
  time (flash-style): a block's scores `[B, H, Nq, block]` exist one at a time and are
  recomputed in the backward pass, never the chunk's whole `[B, H, Nq, Nk]`. A chunk that
  does not divide into blocks is padded with keys of segment -1, which no query attends
  to (the last block keeps at least one real key). q_blk/kv_blk: causal block indices
  (see `_merge`), or None."""
  b, nk, h, d = k.shape
  if not 0 < block < nk:
    return _merge(carry, q, k, v, q_seg, kv_seg, scale, q_blk, kv_blk)
  pad = -nk % block
  if pad:
    k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)), constant_values=-1)
    if kv_blk is not None:
      kv_blk = jnp.pad(kv_blk, ((0, 0), (0, pad)))
    if q_seg is None:      # no segments: every real key is segment 0, like the queries
      q_seg = jnp.zeros(q.shape[:2], kv_seg.dtype)
    nk += pad
  blocks = nk // block
  split = lambda x: jnp.swapaxes(x.reshape(b, blocks, block, *x.shape[2:]), 0, 1)  # noqa: E731

  @jax.checkpoint
  def one(carry, kv):
    kb, vb, sb, *cb = kv        # cb: the block's causal indices, when there are some
    return _merge(carry, q, kb, vb, q_seg, sb if q_seg is not None else None, scale,
                  q_blk, cb[0] if cb else None), None

  xs = (split(k), split(v), split(kv_seg)) + ((split(kv_blk),) if kv_blk is not None else ())
  carry, _ = jax.lax.scan(one, carry, xs)
  return carry


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh,
                   segment_ids: jax.Array | None = None, scale: float | None = None,
                   causal_blocks: jax.Array | None = None, axis: str = "sequence",
                   batch_axes: Sequence[str] = ("data", "fsdp"),
                   head_axis: str | None = "tensor", kv_block: int = 512) -> jax.Array:
  """Self-attention with the token axis sharded over `mesh.shape[axis]` devices.

  Args:
    q, k, v: `[B, N, H, D]` (N divisible by the ring size).
    segment_ids: `[B, N]` int; a token attends only to tokens of its own segment
      (packed examples; padding is one more segment). None: full attention.
    scale: logit scale, 1/sqrt(D) when None.
    axis: the mesh axis of the ring; batch_axes / head_axis shard B and H.
    kv_block: keys per inner step within a device's chunk (flash-style; the chunk whole
      when it does not divide into such blocks).

  Returns:
    `[B, N, H, D]` in q's dtype, sharded like q.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  ring = mesh.shape[axis]
  qkv_spec, seg_spec = sequence_specs(mesh, axis, batch_axes, head_axis)
  perm = [(i, (i + 1) % ring) for i in range(ring)]
  has_segments = segment_ids is not None
  if not has_segments:
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
  causal = causal_blocks is not None
  if not causal:
    causal_blocks = jnp.zeros(q.shape[:2], jnp.int32)

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,) * 2,
                     out_specs=qkv_spec, check_vma=False)
  def local(q, k, v, seg, blk):
    b, n, h, d = q.shape
    carry = (jnp.zeros((b, n, h, d), jnp.float32), jnp.full((b, h, n), _NEG, jnp.float32),
             jnp.zeros((b, h, n), jnp.float32))
    kv_seg, kv_blk = seg, blk
    for step in range(ring):
      carry = _ring_step(carry, q, k, v, seg if has_segments else None, kv_seg, scale,
                         kv_block, blk if causal else None, kv_blk if causal else None)
      if step + 1 < ring:
        k, v, kv_seg = (jax.lax.ppermute(x, axis, perm) for x in (k, v, kv_seg))
        if causal:        # the keys' causal indices travel with them
          kv_blk = jax.lax.ppermute(kv_blk, axis, perm)
    out, _, row_sum = carry
    return (out / jnp.transpose(row_sum, (0, 2, 1))[..., None]).astype(q.dtype)

  return local(q, k, v, segment_ids, causal_blocks)


def sequence_specs(mesh: Mesh, axis: str = "sequence",
                   batch_axes: Sequence[str] = ("data", "fsdp"),
                   head_axis: str | None = "tensor") -> tuple[P, P]:
  """`(tokens, ids)`: the partition specs of `[B, N, H, D]` queries, keys or values with
  their tokens over `axis` (batch over the `batch_axes` and heads over `head_axis` that
  split, as the ring and the cache keep them), and of `[B, N]` per-token ids."""
  batch = tuple(a for a in batch_axes if mesh.shape[a] > 1) or None
  heads = head_axis if head_axis and mesh.shape[head_axis] > 1 else None
  return P(batch, axis, heads, None), P(batch, axis)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, past_keys: jax.Array,
                     past_values: jax.Array, past_valid: jax.Array, *, mesh: Mesh,
                     causal_blocks: jax.Array | None = None, scale: float | None = None,
                     axis: str = "sequence", batch_axes: Sequence[str] = ("data", "fsdp"),
                     head_axis: str | None = "tensor", kv_block: int = 512) -> jax.Array:
  """Attention of a chunk's queries to a KV cache and to the chunk's own keys, with the
  cache's tokens and the chunk's split over the P = `mesh.shape[axis]` devices of `axis`
  (autoregressive sampling of a long video: no device holds the whole cache, nor gathers
  it). Split-K across devices (flash decoding's split of the keys): every device gathers
  the chunk's queries (a chunk is short), attends them to its share of the cache and of
  the chunk's keys `kv_block` at a time (online softmax, as `ring_attention` within a
  chunk), and the partial softmax statistics are combined with a `pmax` and a
  reduce-scatter that leaves each device its own queries' rows.

  Args:
    q, k, v: `[B, Q, H, D]` the chunk's queries, keys and values (Q divisible by P).
    past_keys, past_values: `[B, L, H, D]` the cache (L divisible by P; RoPE applied);
      past_valid: `[B, L]` bool, False for an empty slot (attended by nobody). Every valid
      cached token is in every query's past.
    causal_blocks: `[B, Q]` int, the chunk's tokens' causal blocks (a query attends to the
      chunk's keys of its block and earlier ones); None: to all of them.
    scale: logit scale, 1/sqrt(D) when None.
    axis, batch_axes, head_axis, kv_block: as `ring_attention`.

  Returns:
    `[B, Q, H, D]` in q's dtype, sharded like q.
  """
  parts = mesh.shape[axis]
  if q.shape[1] % parts or past_keys.shape[1] % parts:
    raise ValueError(f"cached attention: {q.shape[1]} chunk tokens and {past_keys.shape[1]} "
                     f"cache slots must each divide over the {parts} devices of mesh axis "
                     f"{axis!r}.")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  tokens, ids = sequence_specs(mesh, axis, batch_axes, head_axis)
  causal = causal_blocks is not None
  blocks = causal_blocks if causal else jnp.zeros(q.shape[:2], jnp.int32)

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(tokens,) * 5 + (ids,) * 2,
                     out_specs=tokens, check_vma=False)
  def local(q, k, v, past_k, past_v, valid, blk):
    queries = jax.lax.all_gather(q, axis, axis=1, tiled=True)              # [B, Q, H, D]
    query_blocks = jax.lax.all_gather(blk, axis, axis=1, tiled=True)       # [B, Q]
    keys = jnp.concatenate([past_k.astype(k.dtype), k], axis=1)            # [B, K, H, D]
    values = jnp.concatenate([past_v.astype(v.dtype), v], axis=1)
    # Segments: every query 0, a key 0 when it may be attended (-1: an empty slot);
    # causal blocks: the cache before every block of the chunk (-1).
    key_segments = jnp.concatenate([jnp.where(valid, 0, -1), jnp.zeros_like(blk)], axis=1)
    key_blocks = jnp.concatenate([jnp.full(valid.shape, -1, blk.dtype), blk], axis=1)
    b, n, h, d = queries.shape
    carry = (jnp.zeros((b, n, h, d), jnp.float32), jnp.full((b, h, n), _NEG, jnp.float32),
             jnp.zeros((b, h, n), jnp.float32))
    out, row_max, row_sum = _ring_step(
        carry, queries, keys, values, jnp.zeros((b, n), jnp.int32), key_segments, scale,
        kv_block, query_blocks if causal else None, key_blocks if causal else None)
    # A device with no key a query may attend to has row_max _NEG: its share weighs 0.
    top = jax.lax.pmax(row_max, axis)
    correction = jnp.exp(row_max - top)                                    # [B, H, Q]
    row_sum = jax.lax.psum_scatter(row_sum * correction, axis, scatter_dimension=2,
                                   tiled=True)                             # [B, H, Q/P]
    out = jax.lax.psum_scatter(out * jnp.transpose(correction, (0, 2, 1))[..., None], axis,
                               scatter_dimension=1, tiled=True)            # [B, Q/P, H, D]
    return (out / jnp.transpose(row_sum, (0, 2, 1))[..., None]).astype(q.dtype)

  valid = jnp.broadcast_to(past_valid, past_keys.shape[:2])
  return local(q, k, v, past_keys, past_values, valid, blocks)


def ulysses_degree(heads: int, parts: int) -> int:
  """The largest divisor of `parts` that divides `heads`: how many devices of a sequence
  axis of `parts` split the heads by all-to-all in `ulysses_attention` (the rest gather
  keys and values)."""
  return max(u for u in range(1, parts + 1) if parts % u == 0 and heads % u == 0)


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh,
                      attend: Callable[..., jax.Array],
                      segment_ids: jax.Array | None = None,
                      causal_blocks: jax.Array | None = None, axis: str = "sequence",
                      batch_axes: Sequence[str] = ("data", "fsdp"),
                      head_axis: str | None = "tensor", degree: int | None = None
                      ) -> jax.Array:
  """Self-attention with the token axis sharded over P = `mesh.shape[axis]` devices, by
  all-to-all over the heads (DeepSpeed-Ulysses, Jacobs et al., 2023), combined with a
  gather of keys and values where the heads do not split P ways (as USP, Fang & Zhao,
  2024, combines Ulysses with a ring).

  The axis is read as R groups of U = `degree` consecutive devices (U divides P; by
  default `ulysses_degree`, the largest divisor of P that divides the heads). Within a
  group, an all-to-all trades each device's tokens of every head for the group's tokens
  (1/R of the sequence) of 1/U of the heads; the R devices with the same heads then
  gather each other's keys and values, so that each device attends its queries (N/R
  tokens, H/U heads) to the whole sequence with `attend`, one kernel call; a second
  all-to-all trades back. Per device that is N^2 H / P query-key pairs whatever H is.
  With U = P it is plain Ulysses; heads that do not divide U are padded with zero heads
  (their output dropped), at their share of the FLOPs.

  Args:
    q, k, v: `[B, N, H, D]` (N divisible by P).
    attend: `attend(q, k, v, segment_ids, causal_blocks) -> out` on one device:
      q `[B, N/R, H', D]`, k, v `[B, N, H', D]`; segment_ids / causal_blocks each None
      or a pair `([B, N/R], [B, N])` int of the queries and the keys (a splash kernel on
      TPU, the XLA reference elsewhere).
    segment_ids: `[B, N]` int; tokens attend within their segment. None: full attention.
    causal_blocks: `[B, N]` int block indices; a token attends to keys of its block and
      earlier ones. None: bidirectional.
    axis, batch_axes, head_axis: mesh axes of the tokens, the batch and the heads.
    degree: U above (None: `ulysses_degree` of the heads on each device).

  Returns:
    `[B, N, H, D]` in q's dtype, sharded like q.
  """
  parts = mesh.shape[axis]
  batch = tuple(a for a in batch_axes if mesh.shape[a] > 1) or None
  heads = head_axis if head_axis and mesh.shape[head_axis] > 1 else None
  local_heads = q.shape[2] // (mesh.shape[head_axis] if heads else 1)
  degree = ulysses_degree(local_heads, parts) if degree is None else degree
  if parts % degree:
    raise ValueError(f"Ulysses attention: degree {degree} does not divide the {parts} "
                     f"devices of mesh axis {axis!r}.")
  groups = parts // degree
  within = [list(range(g * degree, (g + 1) * degree)) for g in range(groups)]   # all-to-all
  across = [list(range(u, parts, degree)) for u in range(degree)]                # gather
  qkv_spec = P(batch, axis, heads, None)
  seg_spec = P(batch, axis)
  has_segments, causal = segment_ids is not None, causal_blocks is not None
  ids = [x if x is not None else jnp.zeros(q.shape[:2], jnp.int32)
         for x in (segment_ids, causal_blocks)]

  def trade(x, split_axis, concat_axis):
    return jax.lax.all_to_all(x, axis, split_axis, concat_axis, tiled=True,
                              axis_index_groups=within if groups > 1 else None)

  def gather(x):    # [B, N/R, ...] -> [B, N, ...]: the R groups' tokens, in order
    return (jax.lax.all_gather(x, axis, axis=1, tiled=True, axis_index_groups=across)
            if groups > 1 else x)

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,) * 2,
                     out_specs=qkv_spec, check_vma=False)
  def local(q, k, v, seg, blk):
    h = q.shape[2]
    pad = -h % degree
    if pad:
      q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
    # [B, N/P, H, D] -> [B, N/R, H/U, D]: split the heads, join the group's tokens.
    q, k, v = (trade(x, 2, 1) for x in (q, k, v))
    k, v = gather(k), gather(v)
    group_ids = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True,  # noqa: E731
                                             axis_index_groups=within if groups > 1 else None)
    whole_ids = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)  # noqa: E731
    out = attend(q, k, v, (group_ids(seg), whole_ids(seg)) if has_segments else None,
                 (group_ids(blk), whole_ids(blk)) if causal else None)
    out = trade(out, 1, 2)
    return out[:, :, :h].astype(q.dtype)

  return local(q, k, v, *ids)
