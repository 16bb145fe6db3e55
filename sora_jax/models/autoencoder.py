"""The autoencoder interface between pixels and the space the transformer diffuses in.

Videos are `[B, T, H, W, C]` in [-1, 1]. An autoencoder maps them to latents
`[B, T', H', W', C']` and back. `IdentityAutoencoder` diffuses pixels directly;
the causal 3D VAE plugs in behind the same interface.
"""

from __future__ import annotations

from typing import Protocol

import jax


class Autoencoder(Protocol):
  """What the trainer and sampler need from a video autoencoder."""

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


class IdentityAutoencoder:
  """Pixels are the latent: the transformer diffuses the video itself."""

  def latent_shape(self, frames: int, height: int, width: int,
                   channels: int) -> tuple[int, int, int, int]:
    return (frames, height, width, channels)

  def encode(self, video: jax.Array) -> jax.Array:
    return video

  def decode(self, latent: jax.Array) -> jax.Array:
    return latent


def make_autoencoder(name: str) -> Autoencoder:
  """The autoencoder named by `config.autoencoder.name`."""
  if name == "identity":
    return IdentityAutoencoder()
  raise ValueError(f"autoencoder.name={name!r}: known autoencoders are ['identity'].")
