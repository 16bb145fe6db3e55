"""The autoencoder interface between pixels and the space the transformer diffuses in.

Videos are `[B, T, H, W, C]` in [-1, 1]. An autoencoder maps them to latents
`[B, T', H', W', C']` and back. `IdentityAutoencoder` diffuses pixels directly;
`VAEAutoencoder` diffuses the normalised latents of a causal video VAE: one trained
here (`sora-jax train-vae`) or Wan 2.1's (a diffusers `AutoencoderKLWan` directory),
chosen in a config by

  autoencoder = dict(name="vae", workdir="runs/vae")
  autoencoder = dict(name="wan", path="Wan2.1-T2V-1.3B-Diffusers/vae")
"""

from __future__ import annotations

from typing import Protocol

import json
import os

import jax
import ml_collections


class Autoencoder(Protocol):
  """What the trainer and sampler need from a video autoencoder."""

  # Video frames per latent frame after the first (causal: latent 0 is frame 0 alone).
  temporal_factor: int

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

  temporal_factor = 1

  def latent_shape(self, frames: int, height: int, width: int,
                   channels: int) -> tuple[int, int, int, int]:
    return (frames, height, width, channels)

  def encode(self, video: jax.Array) -> jax.Array:
    return video

  def decode(self, latent: jax.Array) -> jax.Array:
    return latent


class VAEAutoencoder:
  """A trained `VideoVAE`: encodes to posterior means normalised per channel by the
  latent statistics saved with it, and decodes back."""

  def __init__(self, vae):
    self.vae = vae
    self.temporal_factor = vae.config.compression[0]

  def latent_shape(self, frames: int, height: int, width: int,
                   channels: int) -> tuple[int, int, int, int]:
    del channels
    return self.vae.config.latent_shape(frames, height, width)

  def encode(self, video: jax.Array) -> jax.Array:
    return self.vae.normalise(self.vae.encode(video)[0])

  def decode(self, latent: jax.Array) -> jax.Array:
    return self.vae.decode(self.vae.denormalise(latent.astype(jax.numpy.float32)))


def vae_workdir_config(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the VAE run named by `autoencoder.workdir` (no weights are read)."""
  workdir = section.get("workdir", "")
  path = os.path.join(workdir, "config.json")
  if not workdir or not os.path.exists(path):
    raise ValueError(f"autoencoder.workdir={workdir!r}: no trained VAE there (expected "
                     f"{path}); run `sora-jax train-vae` first.")
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  if "vae" not in config:
    raise ValueError(f"autoencoder.workdir={workdir!r} holds no VAE run (no 'vae' section).")
  return config


def wan_vae_config(section: ml_collections.ConfigDict):
  """The `VAEConfig` of the Wan VAE directory `autoencoder.path` (no weights are read)."""
  path = section.get("path", "")
  config_file = os.path.join(path, "config.json")
  if not path or not os.path.isfile(config_file):
    raise ValueError(f"autoencoder.path={path!r}: expected a diffusers AutoencoderKLWan "
                     f"directory with {config_file}.")
  from sora_jax.interop.wan_vae import vae_config_from_diffusers  # pylint: disable=g-import-not-at-top
  with open(config_file, encoding="utf-8") as f:
    return vae_config_from_diffusers(json.load(f))


def latent_channels(section: ml_collections.ConfigDict) -> int:
  """Channels C' of what the transformer diffuses under the config's `autoencoder` section."""
  return latent_shape_of(section, 1, 0, 0)[-1]


def latent_shape_of(section: ml_collections.ConfigDict, frames: int, height: int,
                    width: int) -> tuple[int, int, int, int]:
  """`(T', H', W', C')` the transformer diffuses for a `[frames, height, width]` video under
  the config's `autoencoder` section; raises ValueError when the video does not fit it."""
  if section.name == "identity":
    return (frames, height, width, 3)
  if section.name == "vae":
    from sora_jax import configs  # pylint: disable=g-import-not-at-top
    return configs.vae_config(vae_workdir_config(section)).latent_shape(frames, height, width)
  if section.name == "wan":
    return wan_vae_config(section).latent_shape(frames, height, width)
  raise ValueError(f"autoencoder.name={section.name!r}: known autoencoders are "
                   "['identity', 'vae', 'wan'].")


def make_autoencoder(section: ml_collections.ConfigDict) -> Autoencoder:
  """The autoencoder of a config's `autoencoder` section (loads a VAE's weights)."""
  latent_channels(section)   # checks the name and the VAE workdir
  if section.name == "identity":
    return IdentityAutoencoder()
  if section.name == "wan":
    from sora_jax.interop.load import load_wan_vae  # pylint: disable=g-import-not-at-top
    return VAEAutoencoder(load_wan_vae(section.path))
  from sora_jax.train.vae_loop import load_vae  # pylint: disable=g-import-not-at-top
  return VAEAutoencoder(load_vae(section.workdir)[0])
