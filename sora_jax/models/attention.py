"""Scaled dot-product attention behind one function.

Shape letters: B batch, Q query tokens, K key tokens, H heads, D head dimension.
The XLA reference here is the ground truth other backends are tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# The backend choice follows the devices a program runs on, so it lives with the mesh.
from sora_jax.parallel.sharding import ATTENTION_BACKENDS as BACKENDS
from sora_jax.parallel.sharding import compile_platform
from sora_jax.parallel.sharding import resolve_backend
from sora_jax.parallel.sharding import SPLASH_BLOCK

# Queries per block of `dot_product_attention` (128: fastest on XLA:CPU at 1k-4k keys),
# used once the whole [B, H, Q, K] float32 logits would take more than WHOLE_LOGITS_BYTES
# (below that one block is faster: no loop).
QUERY_BLOCK = 128
WHOLE_LOGITS_BYTES = 8 * 2 ** 20
# The name of the attention output and log-sum-exp that remat policies may keep.
RESIDUAL_NAME = "attention_residuals"
_LOWEST = float(jnp.finfo(jnp.float32).min)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None,
                          bias: jax.Array | None = None,
                          scale: float | None = None,
                          query_block: int = QUERY_BLOCK) -> jax.Array:
  """Softmax attention computed in float32, a block of queries at a time.

  The logits of `query_block` queries against all keys exist at once (not all
  `[B, H, Q, K]`), and the backward pass recomputes them from the saved log-sum-exp of
  each query instead of keeping the softmax weights (flash attention's recipe, written
  in XLA): memory linear in Q, and on CPU the block stays in cache, which makes it about
  twice as fast as the whole-matrix form (`experiments/versus_diffusers.py`).

  Args:
    q: `[B, Q, H, D]`.
    k, v: `[B, K, H, D]`.
    mask: boolean, broadcastable to `[B, H, Q, K]`; False blocks attention.
      Every query must be allowed at least one key.
    bias: additive logits, broadcastable to `[B, H, Q, K]` (differentiable).
    scale: logit scale; 1/sqrt(D) when None (T5-style encoders use 1).
    query_block: queries per block when the whole logits exceed `WHOLE_LOGITS_BYTES`;
      Q is padded up to a whole number of blocks.

  Returns:
    `[B, Q, H, D]` in q's dtype.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  b, length, h, _ = q.shape
  full = (b, h, length, k.shape[1])
  mask = None if mask is None else jnp.asarray(mask, bool).reshape(_as_4d(mask.shape, full))
  bias = None if bias is None else bias.reshape(_as_4d(bias.shape, full))
  return _blocked_attention(q, k, v, mask, bias, scale, query_block)


def _as_4d(shape: tuple[int, ...], full: tuple[int, ...]) -> tuple[int, ...]:
  """A shape broadcastable to `full` [B, H, Q, K], written with all four axes."""
  shape = (1,) * (4 - len(shape)) + tuple(shape)
  for n, m in zip(shape, full):
    if n not in (1, m):
      raise ValueError(f"attention mask/bias of shape {shape} does not broadcast to {full}.")
  return shape


def _heads_first(x: jax.Array) -> jax.Array:
  """`[B, N, H, D]` <-> `[B, H, N, D]`: the blocks work heads-first, the layout of a
  batched matmul over (B, H), so no block transposes its operands or results."""
  return jnp.swapaxes(x, 1, 2)


def _transposed(shape: tuple[int, ...]) -> tuple[int, ...]:
  return shape[:-2] + shape[-1:] + shape[-2:-1]


def _logits(q, k, mask, bias, scale):
  """`[B, H, q, K]` float32 logits of a query block `q [B, H, q, D]` against `k [B, H, K, D]`
  (mask and bias already cut to the block)."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, _LOWEST)
  return logits


def _query_blocks(x: jax.Array, axis: int, blocks: int, block: int) -> jax.Array:
  """x padded along its query `axis` to blocks * block and split into `[blocks, ...]`."""
  pad = blocks * block - x.shape[axis]
  if pad:
    x = jnp.pad(x, [(0, pad if i == axis else 0) for i in range(x.ndim)])
  x = x.reshape(x.shape[:axis] + (blocks, block) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unblock(x: jax.Array, axis: int, length: int) -> jax.Array:
  """Inverse of `_query_blocks` for a blocked result `[blocks, ..., block, ...]`."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _blocking(q: jax.Array, k: jax.Array, query_block: int) -> tuple[int, int]:
  """(queries per block, blocks) for `q [B, Q, H, D]` against `k [B, K, H, D]`."""
  b, length, h, _ = q.shape
  if b * h * length * k.shape[1] * 4 <= WHOLE_LOGITS_BYTES or length <= query_block:
    return length, 1
  return query_block, -(-length // query_block)


def _spans_queries(x: jax.Array | None) -> bool:
  return x is not None and x.shape[2] != 1


def _mask_blocks(x: jax.Array | None, blocks: int, block: int) -> jax.Array | None:
  """A `[B|1, H|1, Q|1, K]` mask or bias split into query blocks when it has a query
  axis; None when every block uses all of it (see `_for_block`)."""
  return _query_blocks(x, 2, blocks, block) if _spans_queries(x) else None


def _for_block(whole: jax.Array | None, block: jax.Array | None) -> jax.Array | None:
  """A mask or bias for one query block: its block, or the whole one shared by all."""
  return whole if block is None else block


def _attention_forward(q, k, v, mask, bias, scale, query_block):
  """Output `[B, Q, H, D]` and log-sum-exp `[B, H, Q]` (float32)."""
  length = q.shape[1]
  block, blocks = _blocking(q, k, query_block)
  q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)

  def one(q, mask, bias):                                                 # q [B, H, q, D]
    logits = _logits(q, k, mask, bias, scale)                            # [B, H, q, K]
    top = logits.max(-1, keepdims=True)
    weights = jnp.exp(logits - top)
    total = weights.sum(-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkd->bhqd", (weights / total).astype(v.dtype), v)
    return out, (top + jnp.log(total))[..., 0]

  if blocks == 1:
    out, lse = one(q, mask, bias)
  else:
    out, lse = jax.lax.map(
        lambda xs: one(xs[0], _for_block(mask, xs[1]), _for_block(bias, xs[2])),
        (_query_blocks(q, 2, blocks, block), _mask_blocks(mask, blocks, block),
         _mask_blocks(bias, blocks, block)))
    out, lse = _unblock(out, 2, length), _unblock(lse, 2, length)
  return _heads_first(out), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blocked_attention(q, k, v, mask, bias, scale, query_block):
  return _attention_forward(q, k, v, mask, bias, scale, query_block)[0]


def _blocked_attention_fwd(q, k, v, mask, bias, scale, query_block):
  out, lse = _attention_forward(q, k, v, mask, bias, scale, query_block)
  # Named for remat policies: the output and log-sum-exp are all the backward pass
  # needs besides q, k, v (see `models.dit.REMAT_POLICIES`).
  out, lse = checkpoint_name(out, RESIDUAL_NAME), checkpoint_name(lse, RESIDUAL_NAME)
  return out, (q, k, v, mask, bias, out, lse)


def _blocked_attention_bwd(scale, query_block, residuals, d_out):
  """Gradients from recomputed softmax weights, a block of queries at a time: dq of a
  block is its own, dk and dv (and a bias shared by all queries) are summed over blocks."""
  q, k, v, mask, bias, out, lse = residuals
  dtypes = q.dtype, k.dtype, v.dtype
  length = q.shape[1]
  block, blocks = _blocking(q, k, query_block)
  # rowsum(dO * O) per query: [B, H, Q].
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  q, k, v, d_out = map(_heads_first, (q, k, v, d_out))
  bias_spans = _spans_queries(bias)

  def bias_gradient(d_logits):                                            # [B, H, q, K]
    summed = tuple(i for i in range(4) if bias.shape[i] == 1 and d_logits.shape[i] != 1)
    return d_logits.sum(summed, keepdims=True)

  def one(q, d_out, q_t, d_out_t, lse, delta, mask, bias_block):
    """q, d_out `[B, H, q, D]`; q_t, d_out_t the same `[B, H, D, q]`. dk and dv come out
    transposed, `[B, H, D, K]`: XLA:CPU's fast matmul wants each contraction on the left
    operand's last axis and the right one's first or last, and the q block's transposes,
    made outside the loop, give that (inside, the compiler folds them back into the dot)."""
    weights = jnp.exp(_logits(q, k, mask, bias_block, scale) - lse[..., None])
    dv = jnp.einsum("bhdq,bhqk->bhdk", d_out_t, weights.astype(d_out.dtype),
                    preferred_element_type=jnp.float32)
    d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    d_logits = weights * (d_weights - delta[..., None])                   # [B, H, q, K]
    dq = jnp.einsum("bhqk,bhkd->bhqd", d_logits.astype(k.dtype), k,
                    preferred_element_type=jnp.float32) * scale
    dk = jnp.einsum("bhdq,bhqk->bhdk", q_t, d_logits.astype(q.dtype),
                    preferred_element_type=jnp.float32) * scale
    d_bias = None if bias is None else bias_gradient(d_logits)
    return dq, dk, dv, d_bias

  q_t, d_out_t = jnp.swapaxes(q, 2, 3), jnp.swapaxes(d_out, 2, 3)
  if blocks == 1:
    dq, dk, dv, d_bias = one(q, d_out, q_t, d_out_t, lse, delta, mask, bias)
  else:
    xs = (_query_blocks(q, 2, blocks, block), _query_blocks(d_out, 2, blocks, block),
          _query_blocks(q_t, 3, blocks, block), _query_blocks(d_out_t, 3, blocks, block),
          _query_blocks(lse, 2, blocks, block), _query_blocks(delta, 2, blocks, block),
          _mask_blocks(mask, blocks, block), _mask_blocks(bias, blocks, block))

    def step(carry, xs):
      *block_args, mask_block, bias_block = xs
      dq, dk, dv, d_bias = one(*block_args, _for_block(mask, mask_block),
                               _for_block(bias, bias_block))
      carry = jax.tree.map(jnp.add, carry, (dk, dv) if bias_spans or bias is None
                           else (dk, dv, d_bias))
      return carry, (dq, d_bias if bias_spans else None)

    zeros = (jnp.zeros(_transposed(k.shape), jnp.float32),
             jnp.zeros(_transposed(v.shape), jnp.float32))
    if bias is not None and not bias_spans:
      zeros += (jnp.zeros(bias.shape, jnp.float32),)
    carry, (dq, d_bias) = jax.lax.scan(step, zeros, xs)
    dk, dv = carry[:2]
    dq = _unblock(dq, 2, length)
    d_bias = carry[2] if bias is not None and not bias_spans else (
        None if d_bias is None else _unblock(d_bias, 2, length))
  d_bias = None if bias is None else d_bias.reshape(bias.shape).astype(bias.dtype)
  dk, dv = jnp.swapaxes(dk, 2, 3), jnp.swapaxes(dv, 2, 3)
  dq, dk, dv = (_heads_first(g).astype(dtype) for g, dtype in zip((dq, dk, dv), dtypes))
  return dq, dk, dv, None, d_bias


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


# Backends ---------------------------------------------------------------------

def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """`[B, N]` segment ids -> `[B, 1, N, N]` mask of same-segment pairs."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def block_causal_mask(query_blocks: jax.Array, key_blocks: jax.Array | None = None
                      ) -> jax.Array:
  """`[B, Q]` and `[B, K]` causal block indices (e.g. each token's latent frame) ->
  `[B, 1, Q, K]` mask: a query attends to the keys of its own block and earlier ones.
  `key_blocks` defaults to `query_blocks` (self-attention)."""
  key_blocks = query_blocks if key_blocks is None else key_blocks
  return (key_blocks[:, None, :] <= query_blocks[:, :, None])[:, None]


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                    bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
  """cuDNN's fused flash-attention kernel (`jax.nn.dot_product_attention` with
  `implementation="cudnn"`) where the program compiles for a GPU and cuDNN takes the
  inputs (bfloat16 or float16, a head dimension cuDNN supports); everywhere else the XLA
  reference `dot_product_attention` (query blocks: memory linear in Q). Same layout and
  semantics as `dot_product_attention`.

  `jax.nn.dot_product_attention`'s default implementation is not cuDNN but XLA's
  whole-matrix form: at 32,760 tokens its `[B, H, Q, K]` float32 logits take 48 GiB a
  layer (seen on an H200), so the kernel is asked for by name. A mask or bias becomes an
  additive `[B|1, H|1, Q, K]` bias for the kernel (materialised: segment and block-causal
  masks cost Q x K elements a layer; a mask of keys, `[B, 1, 1, K]`, Q x K too).
  """
  if compile_platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])           # [B, H, Q, K]
    def query_key(t):   # cuDNN's bias has whole query and key axes
      if t is None:
        return None
      t = t.reshape(_as_4d(t.shape, full))
      return jnp.broadcast_to(t, t.shape[:2] + full[2:])
    try:
      return jax.nn.dot_product_attention(q, k, v, bias=query_key(bias), mask=query_key(mask),
                                          scale=scale, implementation="cudnn")
    except (NotImplementedError, RuntimeError):   # shapes or a cuDNN it does not take
      pass
  return dot_product_attention(q, k, v, mask=mask, bias=bias, scale=scale)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     segment_ids: jax.Array | None = None,
                     key_mask: jax.Array | None = None, scale: float | None = None,
                     causal_block: int | None = None,
                     block: int = SPLASH_BLOCK, interpret: bool | None = None) -> jax.Array:
  """Pallas splash attention (TPU): self-attention with optional segment ids, or
  cross-attention with an optional mask of the keys.

  q: `[B, Q, H, D]`; k, v: `[B, K, H, D]`. segment_ids: `[B, N]` (self-attention, Q = K =
  N) queries attend to keys of their own segment; or a pair `([B, Q], [B, K])` of the
  queries' and the keys' (queries of part of a sequence to the whole of it). key_mask: `[B, K]` bool, False keys are
  attended by no query (each query needs one True key). causal_block: self-attention is
  block-causal over blocks of this many consecutive tokens (token n is in block
  n // causal_block: a latent frame's tokens when it is the tokens per frame), a static
  mask the kernel skips whole blocks of; None: full. The kernel works on blocks of a
  multiple of 128 tokens, so queries and keys are padded up to whole blocks (padding keys
  are attended by no real query; padding queries are cut off again). Runs the kernel in
  Pallas' interpreter off TPU (`interpret=None` decides by platform), which is how it is
  tested here.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
  b, length, h, d = q.shape
  kv_length = k.shape[1]
  if block % 128:
    raise ValueError(f"splash attention: block={block} must be a multiple of 128.")
  if segment_ids is not None and key_mask is not None:
    raise ValueError("splash attention: segment_ids (self) and key_mask (cross) exclude "
                     "each other.")
  paired = isinstance(segment_ids, (tuple, list))
  if segment_ids is not None and not paired and kv_length != length:
    raise ValueError(f"splash attention: segment_ids need self-attention, got {length} "
                     f"queries and {kv_length} keys (or give a pair of the queries' and "
                     "the keys' ids).")
  padded = lambda n, blk: -(-n // blk) * blk  # noqa: E731
  block_q = min(block, padded(length, 128))
  block_kv = min(block, padded(kv_length, 128))
  n, m = padded(length, block_q), padded(kv_length, block_kv)
  if segment_ids is not None:
    q_segments, kv_segments = segment_ids if paired else (segment_ids, segment_ids)
  else:   # queries in segment 1; keys in segment 1 when attended, 0 when masked
    q_segments = jnp.ones((b, length), jnp.int32)
    kv_segments = (jnp.ones((b, kv_length), jnp.int32) if key_mask is None
                   else key_mask.astype(jnp.int32))
  # Padding: keys in a segment no real query has; queries in the same one, so that they
  # attend to the padding keys when there are some (and real keys otherwise).
  pad_segment = jnp.iinfo(jnp.int32).min if m != kv_length else 1
  if n != length:
    q = jnp.pad(q, ((0, 0), (0, n - length), (0, 0), (0, 0)))
    q_segments = jnp.pad(q_segments, ((0, 0), (0, n - length)), constant_values=pad_segment)
  if m != kv_length:
    k, v = (jnp.pad(x, ((0, 0), (0, m - kv_length), (0, 0), (0, 0))) for x in (k, v))
    kv_segments = jnp.pad(kv_segments, ((0, 0), (0, m - kv_length)),
                          constant_values=jnp.iinfo(jnp.int32).min)
  interpret = jax.default_backend() != "tpu" if interpret is None else interpret
  sizes = kernel_lib.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                                block_q_dkv=block_q, block_kv_dkv=block_kv,
                                block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                                block_kv_dq=block_kv)
  if causal_block is not None and (causal_block < 1 or kv_length != length):
    raise ValueError(f"splash attention: causal_block={causal_block} needs self-attention "
                     f"and a positive block, got {length} queries and {kv_length} keys.")
  one_head = (mask_lib.FullMask((n, m)) if causal_block is None
              else splash_block_causal_mask((n, m), causal_block))
  mask = mask_lib.MultiHeadMask([one_head for _ in range(h)])
  kernel = kernel_lib.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1,
                                      block_sizes=sizes, interpret=interpret)
  scale = d ** -0.5 if scale is None else scale
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)   # [B, N, H, D] <-> [B, H, N, D]  # noqa: E731
  out = jax.vmap(lambda q, k, v, sq, skv: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(
      q=sq, kv=skv)))(heads_first(q * scale), heads_first(k), heads_first(v), q_segments,
                      kv_segments)
  return heads_first(out)[:, :length].astype(q.dtype)



@functools.cache
def _block_causal_mask_class():
  """Splash's lazy block-causal mask class, built on first use (the Pallas TPU modules
  are imported only by programs that use splash attention)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_mask as mask_lib)

  class BlockCausalMask(mask_lib._ComputableMask):  # pylint: disable=protected-access
    """Lazy `[Q, K]` mask: query i attends to key j when `j // block <= i // block`,
    computed per kernel block, never stored whole (the kernel skips the blocks it rules
    out entirely)."""

    def __init__(self, shape: tuple[int, int], block: int, shard_count: int = 1):
      self.block = int(block)
      super().__init__(shape=shape, shard_count=shard_count,
                       mask_function=lambda q, kv: kv // self.block <= q // self.block)

    def __eq__(self, other: object):
      if not isinstance(other, type(self)):
        return NotImplemented
      return self.shape == other.shape and self.block == other.block

    def __hash__(self):
      return hash((type(self), self.shape, self.block))

  return BlockCausalMask


def splash_block_causal_mask(shape: tuple[int, int], block: int):
  """Splash attention's mask for one head `[Q, K]`: the rule of `block_causal_mask` with
  token n in block n // block."""
  return _block_causal_mask_class()(shape, block)
