"""The autoencoder interface between pixels and the space the transformer diffuses in.

Videos are `[B, T, H, W, C]` in [-1, 1]. An autoencoder maps them to latents
`[B, T', H', W', C']` and back. `IdentityAutoencoder` diffuses pixels directly;
`VAEAutoencoder` diffuses the normalised latents of a causal video VAE: one trained
here (`sora-jax train-vae`) or Wan 2.1's (a diffusers `AutoencoderKLWan` directory),
chosen in a config by

  autoencoder = dict(name="vae", workdir="runs/vae")
  autoencoder = dict(name="wan", path="Wan2.1-T2V-1.3B-Diffusers/vae")

Building one from a config (which loads a run's or Wan's weights) belongs to the layer
that owns runs: `sora_jax.train.autoencoders.make_autoencoder`; the latent shape a
config's autoencoder gives is `sora_jax.configs.latent_shape_of`.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax


class Autoencoder(Protocol):
  """What the trainer and sampler need from a video autoencoder."""

  # Video frames per latent frame after the first (causal: latent 0 is frame 0 alone).
  temporal_factor: int
  # Video pixels per latent position along the height and the width.
  spatial_factor: int

  def latent_shape(self, frames: int, height: int, width: int,
                   channels: int) -> tuple[int, int, int, int]:
    """`(T', H', W', C')` of the latent of a `[T, H, W, C]` video."""
    ...

  def encode(self, video: jax.Array) -> jax.Array:
    """`[B, T, H, W, C]` -> normalised latent `[B, T', H', W', C']`."""
    ...

  def decode(self, latent: jax.Array) -> jax.Array:
    """`[B, T', H', W', C']` -> video `[B, T, H, W, C]`."""
    ...

  def decode_next(self, latent: jax.Array, state: Any = None) -> tuple[jax.Array, Any]:
    """Decodes the latent frames after those decoded into `state` (None: a video's first
    ones) -> `(video of these frames, state)`; chunk by chunk equals `decode` of the whole."""
    ...


class IdentityAutoencoder:
  """Pixels are the latent: the transformer diffuses the video itself."""

  temporal_factor = 1
  spatial_factor = 1

  def latent_shape(self, frames: int, height: int, width: int,
                   channels: int) -> tuple[int, int, int, int]:
    return (frames, height, width, channels)

  def encode(self, video: jax.Array) -> jax.Array:
    return video

  def decode(self, latent: jax.Array) -> jax.Array:
    return latent

  def decode_next(self, latent: jax.Array, state: Any = None) -> tuple[jax.Array, Any]:
    return latent, state


class VAEAutoencoder:
  """A trained `VideoVAE`: encodes to posterior means normalised per channel by the
  latent statistics saved with it, and decodes back."""

  def __init__(self, vae):
    self.vae = vae
    self.temporal_factor = vae.config.compression[0]
    self.spatial_factor = vae.config.compression[1]

  def latent_shape(self, frames: int, height: int, width: int,
                   channels: int) -> tuple[int, int, int, int]:
    del channels
    return self.vae.config.latent_shape(frames, height, width)

  def encode(self, video: jax.Array) -> jax.Array:
    return self.vae.normalise(self.vae.encode(video)[0])

  def decode(self, latent: jax.Array) -> jax.Array:
    return self.vae.decode(self.vae.denormalise(latent.astype(jax.numpy.float32)))

  def decode_next(self, latent: jax.Array, state: Any = None) -> tuple[jax.Array, Any]:
    return self.vae.decode_next(self.vae.denormalise(latent.astype(jax.numpy.float32)), state)
