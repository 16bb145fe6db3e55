"""The text-to-video model: text encoder + diffusion transformer, and its construction."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from sora_jax import configs
from sora_jax.models.autoencoder import latent_channels
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


def build_model(config: ml_collections.ConfigDict, vocab_size: int, rngs: nnx.Rngs,
                in_channels: int | None = None) -> SoraModel:
  """Builds the model of `config` with unsharded parameters.

  `in_channels` defaults to the channels of what `config.autoencoder` makes of a video
  (3 for pixels, the VAE's latent channels).

  Parameters carry logical axis names; sharding is applied by the caller (see
  `sora_jax.train.state`), so eager sharding is off here.
  """
  if in_channels is None:
    in_channels = latent_channels(config.autoencoder)
  text_cfg = configs.text_encoder_config(config, vocab_size)
  dit_cfg = configs.dit_config(config, text_width=text_cfg.width, in_channels=in_channels)
  with nnx.use_eager_sharding(False):
    return SoraModel(text_cfg, dit_cfg, rngs=rngs,
                     text_frozen="text_encoder" in tuple(config.optim.get("frozen", ())))
