"""A T5-style text encoder (Flax NNX): pre-RMSNorm, relative position bias, gated GELU.

Each layer owns its relative-position bias (the UMT5 arrangement); attention logits
are not scaled (T5's convention, folded into the initialisation).
Shape letters: B batch, L text tokens, D width, H heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models import lora
from sora_jax.models.layers import Attention, RMSNorm, dense
from sora_jax.parallel import axes


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  vocab_size: int
  width: int
  depth: int
  heads: int
  mlp_width: int
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6


def relative_position_bucket(relative: jax.Array, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's bidirectional bucketing of integer `relative = key_pos - query_pos` (int32).

  Half the buckets are for keys after the query; within a half, distances below
  half/2 get a bucket each and larger ones share log-spaced buckets up to
  `max_distance`. Logs in float32, as T5 computes them.
  """
  half = num_buckets // 2
  relative = jnp.asarray(relative, jnp.int32)
  bucket = (relative > 0).astype(jnp.int32) * half
  distance = jnp.abs(relative)
  max_exact = half // 2
  large = max_exact + (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                       / np.log(max_distance / max_exact) * (half - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return bucket + jnp.where(distance < max_exact, distance, large)


class TextEncoderLayer(nnx.Module):

  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.norm1 = RMSNorm(cfg.width, eps=cfg.eps)
    self.attn = Attention(cfg.width, cfg.heads, qk_norm="none", use_bias=False, scale=1.0,
                          rngs=rngs)
    self.rel_bias = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_buckets, cfg.heads)),
        out_sharding=(axes.RELPOS, None))
    self.norm2 = RMSNorm(cfg.width, eps=cfg.eps)
    self.wi_gate = dense(cfg.width, cfg.mlp_width, (axes.TEXT_EMBED, axes.MLP), use_bias=False,
                         rngs=rngs)
    self.wi_up = dense(cfg.width, cfg.mlp_width, (axes.TEXT_EMBED, axes.MLP), use_bias=False,
                       rngs=rngs)
    self.wo = dense(cfg.mlp_width, cfg.width, (axes.MLP, axes.TEXT_EMBED), use_bias=False,
                    rngs=rngs)

  def relative_bias(self, positions: jax.Array) -> jax.Array:
    """Attention bias `[B, H, L, L]` from token positions `[B, L]` (T5 buckets)."""
    relative = positions[:, None, :] - positions[:, :, None]                # key - query
    buckets = relative_position_bucket(relative, self.cfg.num_buckets, self.cfg.max_distance)
    return jnp.transpose(self.rel_bias[...][buckets], (0, 3, 1, 2))

  def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array) -> jax.Array:
    """x: `[B, L, D]`; mask: bool broadcastable to `[B, H, L, L]`; bias: `[B, H, L, L]`."""
    x = x + self.attn(self.norm1(x), mask=mask, bias=bias)
    h = self.norm2(x)
    return x + self.wo(jax.nn.gelu(self.wi_gate(h), approximate=True) * self.wi_up(h))


class TextEncoder(nnx.Module):
  """Token ids `[B, L]` and mask `[B, L]` -> states `[B, L, D]`."""

  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.width,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0),
                                             (axes.VOCAB, axes.TEXT_EMBED)),
        rngs=rngs)
    self.layers = nnx.List([TextEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.final_norm = RMSNorm(cfg.width, eps=cfg.eps)

  def __call__(self, ids: jax.Array, mask: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """States `[B, L, D]` of token `ids [B, L]` with padding `mask [B, L]` (True: real token).

    Packed rows (several captions per row) give `segment_ids [B, L]` (0: padding) and
    each token's position within its caption `positions [B, L]`; attention then stays
    within a caption and relative positions restart at each caption.
    """
    if segment_ids is None:
      attn_mask = mask[:, None, None, :]
      positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    else:
      attn_mask = ((segment_ids[:, :, None] == segment_ids[:, None, :])
                   & mask[:, None, :])[:, None]
    x = self.embed(ids)
    for index, layer in enumerate(self.layers):
      with lora.stack_layer(index):       # each layer's own LoRA dropout masks (training)
        x = layer(x, attn_mask, layer.relative_bias(positions))
    return self.final_norm(x)
