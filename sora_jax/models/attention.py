"""Scaled dot-product attention behind one function.

Shape letters: B batch, Q query tokens, K key tokens, H heads, D head dimension.
The XLA reference here is the ground truth other backends are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
