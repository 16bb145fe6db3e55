"""The config schema: typed configs, model configs and validation before compilation.

Configs are Python files in `configs/` whose `get_config(arg)` returns an
`ml_collections.ConfigDict` whose sections start from the schema's defaults
(`defaults("train", steps=...)`). This package reads one into a typed `Config` once
(`typed`: missing keys take the schema's defaults, unknown keys and wrong types are
refused naming `section.key`), turns it into typed model configs and checks it, raising
`ValueError` that names the offending key before any compilation.

  schema       the sections, their fields, types, defaults and docs; the key reference
  convert      typed / filled / defaults: ConfigDicts in and out of the schema
  models       variant strings, DiT / text encoder / VAE configs, the autoencoder's shapes
  validation   validate (training), validate_vae, validate_data_source, media_settings
  reference    `python -m sora_jax.configs.reference > docs/reference/config-keys.md`
"""

from __future__ import annotations

import json

import ml_collections

from sora_jax.configs import schema
from sora_jax.configs.convert import (as_dict, as_section, defaults, filled, section,
                                      typed)
from sora_jax.configs.models import (VARIANTS, autoencoder_factors, decode_variant,
                                     dit_config, latent_channels, latent_shape_of, mesh_shape,
                                     sharding_rules, temporal_factor, text_encoder_config,
                                     vae_config, vae_workdir_config, vision_config,
                                     wan_vae_config, world_config)
from sora_jax.configs.schema import Config
from sora_jax.configs.validation import (COMPUTE_DTYPES, GROUPINGS, bucket_spec,
                                         media_settings, validate, validate_data_source,
                                         validate_vae)


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


__all__ = [
    "COMPUTE_DTYPES", "Config", "GROUPINGS", "VARIANTS", "as_dict", "as_section",
    "autoencoder_factors", "bucket_spec", "decode_variant", "defaults", "dit_config", "filled",
    "from_json", "latent_channels", "latent_shape_of", "media_settings", "mesh_shape", "schema",
    "section", "sharding_rules", "temporal_factor", "text_encoder_config", "to_json", "typed",
    "vae_config", "vae_workdir_config", "validate", "validate_data_source", "validate_vae",
    "vision_config", "wan_vae_config", "world_config",
]
