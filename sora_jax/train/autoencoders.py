"""Building the autoencoder a config names, with its weights: a VAE run trained here
(`autoencoder.name="vae"`, `autoencoder.workdir`), Wan's VAE (`"wan"`, `autoencoder.path`)
or pixels (`"identity"`). The interface and the modules are in `sora_jax.models`; this
module reads runs and checkpoints, so it lives with them."""

from __future__ import annotations

import ml_collections

from sora_jax import configs
from sora_jax.interop.load import load_wan_vae
from sora_jax.models.autoencoder import Autoencoder, IdentityAutoencoder, VAEAutoencoder
from sora_jax.train.vae_loop import load_vae


def make_autoencoder(section: ml_collections.ConfigDict) -> Autoencoder:
  """The autoencoder of a config's `autoencoder` section (loads a VAE's weights)."""
  configs.latent_channels(section)   # checks the name and the VAE workdir
  if section.name == "identity":
    return IdentityAutoencoder()
  if section.name == "wan":
    return VAEAutoencoder(load_wan_vae(section.path))
  return VAEAutoencoder(load_vae(section.workdir)[0])
