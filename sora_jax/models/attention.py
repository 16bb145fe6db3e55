"""Scaled dot-product attention behind one function.

Shape letters: B batch, Q query tokens, K key tokens, H heads, D head dimension.
The XLA reference here is the ground truth other backends are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The backend choice follows the devices a program runs on, so it lives with the mesh.
from sora_jax.parallel.sharding import ATTENTION_BACKENDS as BACKENDS
from sora_jax.parallel.sharding import resolve_backend


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None,
                          bias: jax.Array | None = None,
                          scale: float | None = None) -> jax.Array:
  """Softmax attention computed in float32.

  Args:
    q: `[B, Q, H, D]`.
    k, v: `[B, K, H, D]`.
    mask: boolean, broadcastable to `[B, H, Q, K]`; False blocks attention.
      Every query must be allowed at least one key.
    bias: additive logits, broadcastable to `[B, H, Q, K]`.
    scale: logit scale; 1/sqrt(D) when None (T5-style encoders use 1).

  Returns:
    `[B, Q, H, D]` in q's dtype.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


# Backends ---------------------------------------------------------------------

def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """`[B, N]` segment ids -> `[B, 1, N, N]` mask of same-segment pairs."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                    bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU when the shapes and
  dtypes allow it, XLA otherwise. Same layout and semantics as `dot_product_attention`."""
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     segment_ids: jax.Array | None = None,
                     key_mask: jax.Array | None = None, scale: float | None = None,
                     block: int = 512, interpret: bool | None = None) -> jax.Array:
  """Pallas splash attention (TPU): self-attention with optional segment ids, or
  cross-attention with an optional mask of the keys.

  q: `[B, Q, H, D]`; k, v: `[B, K, H, D]`. segment_ids: `[B, N]` (self-attention, Q = K =
  N) queries attend to keys of their own segment. key_mask: `[B, K]` bool, False keys are
  attended by no query (each query needs one True key). The kernel works on blocks of a
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
  if segment_ids is not None and kv_length != length:
    raise ValueError(f"splash attention: segment_ids need self-attention, got {length} "
                     f"queries and {kv_length} keys.")
  padded = lambda n, blk: -(-n // blk) * blk  # noqa: E731
  block_q = min(block, padded(length, 128))
  block_kv = min(block, padded(kv_length, 128))
  n, m = padded(length, block_q), padded(kv_length, block_kv)
  if segment_ids is not None:
    q_segments = kv_segments = segment_ids
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
  mask = mask_lib.MultiHeadMask([mask_lib.FullMask((n, m)) for _ in range(h)])
  kernel = kernel_lib.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1,
                                      block_sizes=sizes, interpret=interpret)
  scale = d ** -0.5 if scale is None else scale
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)   # [B, N, H, D] <-> [B, H, N, D]  # noqa: E731
  out = jax.vmap(lambda q, k, v, sq, skv: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(
      q=sq, kv=skv)))(heads_first(q * scale), heads_first(k), heads_first(v), q_segments,
                      kv_segments)
  return heads_first(out)[:, :length].astype(q.dtype)
