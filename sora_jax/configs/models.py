"""Typed model configs of a config: variant strings, the DiT, the text encoder, the VAE,
and what the config's autoencoder diffuses (its run's or Wan's config files; no weights).

Every function takes a ConfigDict or a typed `Config` (`sora_jax.configs.typed`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import ml_collections

import sora_jax.configs.schema as schema  # the module, not the package (no import cycle)
from sora_jax.configs.convert import _section, typed
from sora_jax.data.camera import camera_channels
from sora_jax.data.world import WorldConfig
from sora_jax.diffusion import conditioning
from sora_jax.interop.wan_vae import vae_config_from_diffusers
from sora_jax.models.dit import DiTConfig
from sora_jax.models.text import TextEncoderConfig
from sora_jax.models.vae import VAEConfig
from sora_jax.models.vision import VisionConfig

# name -> (width, depth, heads)
VARIANTS: dict[str, tuple[int, int, int]] = {
    "Pico": (32, 2, 2), "Nano": (128, 4, 4), "Ti": (192, 12, 3), "S": (384, 12, 6),
    "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16), "XXL": (1536, 30, 12),
}


def decode_variant(variant: str) -> dict[str, Any]:
  """`"B/1x2x2"` -> `{"width": 768, "depth": 12, "heads": 12, "patch": (1, 2, 2)}`."""
  match = re.fullmatch(r"(\w+?)/(\d+)x(\d+)x(\d+)", variant)
  if not match or match.group(1) not in VARIANTS:
    raise ValueError(f"model.variant={variant!r}: expected '<size>/<pt>x<ph>x<pw>' with size in "
                     f"{sorted(VARIANTS)}, e.g. 'B/1x2x2'.")
  width, depth, heads = VARIANTS[match.group(1)]
  patch = tuple(int(match.group(i)) for i in (2, 3, 4))
  if min(patch) < 1:
    raise ValueError(f"model.variant={variant!r}: patch sizes must be positive.")
  return {"width": width, "depth": depth, "heads": heads, "patch": patch}


def world_config(config) -> WorldConfig:
  """The `WorldConfig` of `config.world` (validated; raises ValueError naming `world.*`)."""
  world = typed(config).world
  values = {f.name: getattr(world, f.name) for f in dataclasses.fields(WorldConfig)}
  return WorldConfig.from_dict(values)


def dit_config(config, text_width: int, in_channels: int = 3) -> DiTConfig:
  """The transformer's config: the variant, overridden by non-zero model.width/depth/heads."""
  t = typed(config)
  m = t.model
  base = decode_variant(m.variant)
  return DiTConfig(
      width=m.width or base["width"], depth=m.depth or base["depth"],
      heads=m.heads or base["heads"], patch=base["patch"], in_channels=in_channels,
      text_width=text_width, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
      modulation=m.modulation, text_projection=m.text_projection,
      cross_attn_norm=m.cross_attn_norm, rope_theta=m.rope_theta,
      scan_layers=m.scan_layers, remat=m.remat,
      cond_channels=conditioning.extra_channels(t, in_channels, _wan_mask_channels(t)),
      image_width=t.image_encoder.width, image_positions=m.image_positions,
      # Options presets of other architectures set (configs/wan2_1_t2v.py).
      mlp_hidden=m.mlp_hidden, token_chunks=m.token_chunks, text_padding=m.text_padding,
      freq_dim=m.freq_dim, eps=m.eps,
      guidance_embedding=m.guidance_embedding, step_embedding=m.step_embedding,
      prediction=m.prediction, output_head=m.output_head, field_hidden=m.field_hidden,
      head_hidden=m.head_hidden, head_overlap=m.head_overlap,
      causal_frames=m.causal_frames, pooled_text=m.pooled_text,
      camera_channels=(camera_channels(*autoencoder_factors(t.autoencoder))
                       if m.camera_control else 0), camera_rope=m.camera_rope,
      self_condition=m.self_condition)


def _wan_mask_channels(t: schema.Config) -> int:
  """Mask channels of Wan's conditioning scheme: the autoencoder's temporal factor (its
  config is read only for that scheme)."""
  wan = conditioning.enabled(t) and conditioning.scheme(t) == "wan"
  return temporal_factor(t.autoencoder) if wan else 1


def vision_config(config) -> VisionConfig | None:
  """The image encoder's `VisionConfig` (None when `image_encoder.width` is 0)."""
  v = typed(config).image_encoder
  if not v.width:
    return None
  values = {f.name: getattr(v, f.name) for f in dataclasses.fields(VisionConfig)}
  cfg = VisionConfig(**{**values, "mean": tuple(v.mean), "std": tuple(v.std)})
  cfg.validate()
  return cfg


def vae_config(config) -> VAEConfig:
  """The `VAEConfig` of `config.vae` (raises ValueError naming `vae.*` keys)."""
  v = typed(config).vae
  if v is None:
    raise ValueError("vae: the config has no `vae` section (not a VAE run).")
  return VAEConfig(compression=v.compression, latent_channels=v.latent_channels,
                   channels=v.channels, num_res_blocks=v.num_res_blocks,
                   factorized=v.factorized, patch=v.patch, shortcuts=v.shortcuts,
                   decoder_channels=v.decoder_channels or None)


def text_encoder_config(config, vocab_size: int) -> TextEncoderConfig:
  """The text encoder's config for a tokenizer of `vocab_size` pieces.

  `text_encoder.vocab_size` (when set) gives the embedding rows instead: pretrained
  encoders have more rows than their tokenizer has pieces (UMT5: 256384 for 256000).
  """
  t = typed(config).text_encoder
  rows = t.vocab_size or vocab_size
  if rows < vocab_size:
    raise ValueError(f"text_encoder.vocab_size={rows} is smaller than the tokenizer's "
                     f"{vocab_size} pieces.")
  return TextEncoderConfig(vocab_size=rows, width=t.width, depth=t.depth, heads=t.heads,
                           mlp_width=t.mlp_width, num_buckets=t.num_buckets,
                           max_distance=t.max_distance, eps=t.eps)


def mesh_shape(config) -> dict[str, int]:
  mesh = typed(config).mesh
  return {f.name: int(getattr(mesh, f.name)) for f in dataclasses.fields(schema.Mesh)}


def sharding_rules(config) -> tuple[tuple[str, Any], ...]:
  """`config.sharding.rules` as a tuple of `(logical, mesh_axes)` (JSON lists normalised)."""
  return tuple((name, target) for name, target in typed(config).sharding.rules)


# The autoencoder a config names (its run's or Wan's config files; no weights) ----------


def _autoencoder(section) -> schema.Autoencoder:
  if isinstance(section, schema.Autoencoder):
    return section
  return _section(schema.Autoencoder, section, "autoencoder")


def vae_workdir_config(section) -> ml_collections.ConfigDict:
  """The config of the VAE run named by `autoencoder.workdir` (no weights are read)."""
  workdir = _autoencoder(section).workdir
  path = os.path.join(workdir, "config.json")
  if not workdir or not os.path.exists(path):
    raise ValueError(f"autoencoder.workdir={workdir!r}: no trained VAE there (expected "
                     f"{path}); run `sora-jax train-vae` first.")
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  if "vae" not in config:
    raise ValueError(f"autoencoder.workdir={workdir!r} holds no VAE run (no 'vae' section).")
  return config


def wan_vae_config(section) -> VAEConfig:
  """The `VAEConfig` of the Wan VAE directory `autoencoder.path` (no weights are read)."""
  path = _autoencoder(section).path
  config_file = os.path.join(path, "config.json")
  if not path or not os.path.isfile(config_file):
    raise ValueError(f"autoencoder.path={path!r}: expected a diffusers AutoencoderKLWan "
                     f"directory with {config_file}.")
  with open(config_file, encoding="utf-8") as f:
    return vae_config_from_diffusers(json.load(f))


def autoencoder_factors(section) -> tuple[int, int]:
  """`(temporal, spatial)` of the config's `autoencoder`: video frames per latent frame
  (after the first) and video pixels per latent position along the height and the width;
  (1, 1) for pixels."""
  section = _autoencoder(section)
  if section.name == "vae":
    compression = vae_config(vae_workdir_config(section)).compression
  elif section.name == "wan":
    compression = wan_vae_config(section).compression
  else:
    return 1, 1
  return compression[0], compression[1]


def temporal_factor(section) -> int:
  """Video frames per latent frame (after the first) of the config's `autoencoder`."""
  return autoencoder_factors(section)[0]


def latent_channels(section) -> int:
  """Channels C' of what the transformer diffuses under the config's `autoencoder` section."""
  return latent_shape_of(section, 1, 0, 0)[-1]


def latent_shape_of(section, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
  """`(T', H', W', C')` the transformer diffuses for a `[frames, height, width]` video under
  the config's `autoencoder` section; raises ValueError when the video does not fit it."""
  section = _autoencoder(section)
  if section.name == "identity":
    return (frames, height, width, 3)
  if section.name == "vae":
    return vae_config(vae_workdir_config(section)).latent_shape(frames, height, width)
  if section.name == "wan":
    return wan_vae_config(section).latent_shape(frames, height, width)
  raise ValueError(f"autoencoder.name={section.name!r}: known autoencoders are "
                   "['identity', 'vae', 'wan'].")
