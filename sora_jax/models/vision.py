"""A CLIP vision transformer (ViT) that embeds a conditioning image (Flax NNX).

Wan 2.1's image-to-video models condition on the states of CLIP ViT-H/14's penultimate
layer (transformers' `CLIPVisionModel(...).hidden_states[-2]`, `[B, 257, 1280]` at 224
px); `VisionEncoder` runs the embedding, the pre-norm and `depth` pre-LN encoder layers
and returns their states, so a model built with `depth = num_hidden_layers - 1` gives
exactly those (the last layer and the post-norm are never run, and not loaded).

`preprocess` is CLIPImageProcessor's: the shorter side resized to `image_size` (bicubic),
a centre crop, and normalisation by CLIP's per-channel mean and std.
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.layers import ACTIVATIONS, MLP, Attention, LayerNorm, dense
from sora_jax.parallel import axes

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Hyper-parameters of `VisionEncoder`."""
  width: int
  depth: int                 # encoder layers run (Wan: all but CLIP's last)
  heads: int
  mlp_width: int
  patch: int
  image_size: int
  activation: str = "gelu"   # gelu | quick_gelu (OpenAI's CLIP)
  eps: float = 1e-5
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD

  @property
  def tokens(self) -> int:
    """States per image: the class token and one per patch."""
    return 1 + (self.image_size // self.patch) ** 2

  def validate(self) -> None:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"image_encoder.activation={self.activation!r}: expected one of "
                       f"{sorted(ACTIVATIONS)}.")
    if self.image_size % self.patch:
      raise ValueError(f"image_encoder.image_size={self.image_size} is not a multiple of its "
                       f"patch {self.patch}.")


def preprocess(images: jax.Array, cfg: VisionConfig) -> jax.Array:
  """CLIP's input `[B, S, S, 3]` (S = image_size) of images `[B, H, W, 3]` in [0, 1].

  The shorter side is resized to S (bicubic, antialiased when shrinking), the centre
  S x S is cropped, and channels are normalised by `cfg.mean` / `cfg.std`.
  """
  b, h, w, c = images.shape
  s = cfg.image_size
  scale = s / min(h, w)
  size = (max(s, round(h * scale)), max(s, round(w * scale)))
  x = images.astype(jnp.float32)
  if size != (h, w):
    x = jax.image.resize(x, (b,) + size + (c,), method="bicubic", antialias=True)
  top, left = (size[0] - s) // 2, (size[1] - s) // 2
  x = jnp.clip(x[:, top:top + s, left:left + s], 0.0, 1.0)
  return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


class VisionBlock(nnx.Module):
  """Pre-LN encoder layer: self-attention and MLP, each added to the residual."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.norm1 = LayerNorm(cfg.width, affine=True, eps=cfg.eps)
    self.attn = Attention(cfg.width, cfg.heads, qk_norm="none", rngs=rngs)
    self.norm2 = LayerNorm(cfg.width, affine=True, eps=cfg.eps)
    self.mlp = MLP(cfg.width, cfg.mlp_width, cfg.width, (axes.EMBED, axes.MLP, axes.EMBED),
                   activation=cfg.activation, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, N, width]` -> `[B, N, width]`."""
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionEncoder(nnx.Module):
  """CLIP's vision transformer up to its `depth`-th layer."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    d = cfg.width
    self.patch_embed = dense(cfg.patch * cfg.patch * 3, d, (axes.PATCH, axes.EMBED),
                             use_bias=False, rngs=rngs)
    self.class_token = nnx.Param(jnp.zeros((d,)), out_sharding=(axes.EMBED,))
    self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.tokens, d)),
                               out_sharding=(None, axes.EMBED))
    self.norm_pre = LayerNorm(d, affine=True, eps=cfg.eps)
    self.layers = nnx.List([VisionBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """States `[B, 1 + N, width]` (class token first) of `pixels [B, S, S, 3]` (`preprocess`)."""
    p = self.cfg.patch
    patches = einops.rearrange(pixels, "b (h ph) (w pw) c -> b (h w) (ph pw c)", ph=p, pw=p)
    x = self.patch_embed(patches.astype(self.patch_embed.kernel.dtype))
    cls = jnp.broadcast_to(self.class_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.positions[...].astype(x.dtype)
    x = self.norm_pre(x)
    for layer in self.layers:
      x = layer(x)
    return x

  def embed(self, images: jax.Array) -> jax.Array:
    """States `[B, tokens, width]` of images `[B, H, W, 3]` in [0, 1] (`preprocess`d here)."""
    return self(preprocess(images, self.cfg))
