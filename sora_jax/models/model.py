"""The text-to-video model: text encoder + diffusion transformer (+ an image encoder for
models with an image branch, Wan 2.1 image-to-video).

Built from a config by `sora_jax.train.state.build_model`."""

from __future__ import annotations

import jax
from flax import nnx

from sora_jax.models.dit import DiffusionTransformer, DiTConfig
from sora_jax.models.text import TextEncoder
from sora_jax.models.vision import VisionConfig, VisionEncoder


class SoraModel(nnx.Module):
  """Text encoder and diffusion transformer, trained jointly."""

  def __init__(self, text_cfg, dit_cfg, *, rngs: nnx.Rngs, text_frozen: bool = False,
               image_cfg: VisionConfig | None = None, boundary: float = 0.0,
               critic_cfg: DiTConfig | None = None):
    """`text_frozen`: no gradient flows into the text encoder (a pretrained one kept fixed,
    see `optim.frozen`), so its backward pass is never computed. `image_cfg`: the image
    encoder feeding the transformer's image branch (`dit_cfg.image_width` wide).
    `boundary > 0`: a second transformer of the same architecture, `low_noise_dit`, that
    the sampler runs at flow times below `boundary` (Wan 2.2's mixture of two experts;
    `dit` is the high-noise expert). `critic_cfg`: a third transformer, `critic`, that the
    model never calls itself: a DMD student's score of its own samples (`sora-jax distill`,
    `sora_jax.diffusion.distillation`), of its teacher's architecture."""
    self.text_encoder = TextEncoder(text_cfg, rngs=rngs)
    self.dit = DiffusionTransformer(dit_cfg, rngs=rngs)
    self.text_frozen = text_frozen
    if (image_cfg.width if image_cfg else 0) != dit_cfg.image_width:
      raise ValueError(f"the image encoder's width ({image_cfg.width if image_cfg else 0}) is "
                       f"not the transformer's image width ({dit_cfg.image_width}).")
    self.image_encoder = VisionEncoder(image_cfg, rngs=rngs) if image_cfg else None
    if not 0.0 <= boundary < 1.0:
      raise ValueError(f"boundary={boundary} must be in [0, 1) (0: one transformer).")
    self.boundary = float(boundary)
    self.low_noise_dit = DiffusionTransformer(dit_cfg, rngs=rngs) if boundary else None
    self.critic = DiffusionTransformer(critic_cfg, rngs=rngs) if critic_cfg else None

  def encode_text(self, ids: jax.Array, mask: jax.Array, **kwargs) -> jax.Array:
    """Text states `[B, L, D]` of `ids [B, L]` (see `TextEncoder`)."""
    text = self.text_encoder(ids, mask, **kwargs)
    return jax.lax.stop_gradient(text) if self.text_frozen else text

  def encode_image(self, images: jax.Array) -> jax.Array:
    """Image-encoder states `[B, I, image_width]` of images `[B, H, W, 3]` in [0, 1]."""
    return self.image_encoder.embed(images)

  def __call__(self, x: jax.Array, t: jax.Array, text_ids: jax.Array,
               text_mask: jax.Array, conditioning: jax.Array | None = None,
               camera: jax.Array | None = None) -> jax.Array:
    """Velocity `[B, T, H, W, C]` of `x [B, T, H, W, C]` at times `t [B]` for `text_ids [B, L]`
    (and given frames `conditioning [B, T, H, W, C + 1]`, camera rays `camera`, see
    `DiffusionTransformer`)."""
    return self.dit(x, t, self.encode_text(text_ids, text_mask), text_mask,
                    conditioning=conditioning, camera=camera)

  def forward_packed(self, patches: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                     t: jax.Array, text_ids: jax.Array, text_segment_ids: jax.Array,
                     text_positions: jax.Array) -> jax.Array:
    """Velocity `[B, N, P]` of rows packing several examples (NaViT's Patch n' Pack).

    Args:
      patches: `[B, N, P]` spacetime patches of the examples, concatenated per row.
      positions: `[B, N, 3]` each patch's (t, h, w) position within its own example.
      segment_ids: `[B, N]` example k of a row has id k + 1; 0 is padding.
      t: `[B, K]` flow time per example.
      text_ids, text_segment_ids, text_positions: `[B, S]` the captions packed likewise,
        with positions within each caption.
    """
    text_mask = text_segment_ids > 0
    text = self.encode_text(text_ids, text_mask, segment_ids=text_segment_ids,
                            positions=text_positions)
    return self.dit.forward_tokens(patches, positions, t, text, text_mask,
                                   segment_ids=segment_ids, text_segment_ids=text_segment_ids)
