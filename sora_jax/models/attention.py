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
                     segment_ids: jax.Array | None = None, scale: float | None = None,
                     block: int = 512, interpret: bool | None = None) -> jax.Array:
  """Pallas splash attention (TPU) for self-attention with optional segment ids.

  q, k, v: `[B, N, H, D]`. The kernel works on blocks of a multiple of 128 tokens, so N
  is padded up to a whole number of blocks with tokens of their own segment (they attend
  only to each other and are cut off again). Runs the kernel in Pallas' interpreter off
  TPU (`interpret=None` decides by platform), which is how it is tested here.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
  b, length, h, d = q.shape
  if block % 128:
    raise ValueError(f"splash attention: block={block} must be a multiple of 128.")
  block = min(block, -(-length // 128) * 128)
  n = -(-length // block) * block                                           # padded length
  if segment_ids is None:
    segment_ids = jnp.zeros((b, length), jnp.int32)
  if n != length:
    pad = ((0, 0), (0, n - length), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, n - length)),
                          constant_values=jnp.iinfo(jnp.int32).min)
  interpret = jax.default_backend() != "tpu" if interpret is None else interpret
  sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                block_q_dkv=block, block_kv_dkv=block,
                                block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = mask_lib.MultiHeadMask([mask_lib.FullMask((n, n)) for _ in range(h)])
  kernel = kernel_lib.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1,
                                      block_sizes=sizes, interpret=interpret)
  scale = d ** -0.5 if scale is None else scale
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)   # [B, N, H, D] <-> [B, H, N, D]  # noqa: E731
  out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(q=s, kv=s)))(
      heads_first(q * scale), heads_first(k), heads_first(v), segment_ids)
  return heads_first(out)[:, :length].astype(q.dtype)
