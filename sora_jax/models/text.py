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


def relative_position_bucket(relative: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """T5's bidirectional bucketing of `relative = key_pos - query_pos` (numpy, int32)."""
  half = num_buckets // 2
  bucket = (relative > 0).astype(np.int32) * half
  distance = np.abs(relative)
  max_exact = half // 2
  large = max_exact + (np.log(np.maximum(distance, 1) / max_exact)
                       / np.log(max_distance / max_exact) * (half - max_exact)).astype(np.int32)
  large = np.minimum(large, half - 1)
  return bucket + np.where(distance < max_exact, distance, large).astype(np.int32)


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

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: `[B, L, D]`; mask: `[B, L]` bool."""
    length = x.shape[1]
    pos = np.arange(length)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets,
                                       self.cfg.max_distance)               # [L, L]
    bias = jnp.transpose(self.rel_bias[...][buckets], (2, 0, 1))[None]      # [1, H, L, L]
    x = x + self.attn(self.norm1(x), mask=mask[:, None, None, :], bias=bias)
    h = self.norm2(x)
    return x + self.wo(jax.nn.gelu(self.wi_gate(h), approximate=True) * self.wi_up(h))


class TextEncoder(nnx.Module):
  """Token ids `[B, L]` and mask `[B, L]` -> states `[B, L, D]`."""

  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.width,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0),
                                             (axes.VOCAB, axes.TEXT_EMBED)),
        rngs=rngs)
    self.layers = nnx.List([TextEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.final_norm = RMSNorm(cfg.width, eps=cfg.eps)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.embed(ids)
    for layer in self.layers:
      x = layer(x, mask)
    return self.final_norm(x)
