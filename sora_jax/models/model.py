"""The text-to-video model: text encoder + diffusion transformer.

Built from a config by `sora_jax.train.state.build_model`."""

from __future__ import annotations

import jax
from flax import nnx

from sora_jax.models.dit import DiffusionTransformer
from sora_jax.models.text import TextEncoder


class SoraModel(nnx.Module):
  """Text encoder and diffusion transformer, trained jointly."""

  def __init__(self, text_cfg, dit_cfg, *, rngs: nnx.Rngs, text_frozen: bool = False):
    """`text_frozen`: no gradient flows into the text encoder (a pretrained one kept fixed,
    see `optim.frozen`), so its backward pass is never computed."""
    self.text_encoder = TextEncoder(text_cfg, rngs=rngs)
    self.dit = DiffusionTransformer(dit_cfg, rngs=rngs)
    self.text_frozen = text_frozen

  def encode_text(self, ids: jax.Array, mask: jax.Array, **kwargs) -> jax.Array:
    """Text states `[B, L, D]` of `ids [B, L]` (see `TextEncoder`)."""
    text = self.text_encoder(ids, mask, **kwargs)
    return jax.lax.stop_gradient(text) if self.text_frozen else text

  def __call__(self, x: jax.Array, t: jax.Array, text_ids: jax.Array,
               text_mask: jax.Array, conditioning: jax.Array | None = None) -> jax.Array:
    """Velocity `[B, T, H, W, C]` of `x [B, T, H, W, C]` at times `t [B]` for `text_ids [B, L]`
    (and given frames `conditioning [B, T, H, W, C + 1]`, see `DiffusionTransformer`)."""
    return self.dit(x, t, self.encode_text(text_ids, text_mask), text_mask,
                    conditioning=conditioning)

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
