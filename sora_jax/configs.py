"""Config schema helpers: variant strings, model configs and validation before compilation.

Configs are Python files in `configs/` whose `get_config(arg)` returns an
`ml_collections.ConfigDict`; this module turns one into typed model configs and
checks it, raising `ValueError` that names the offending key before any compilation.
"""

from __future__ import annotations

import json
import os
import math
import re
from typing import Any

import jax
import ml_collections

from sora_jax.data.bucketing import BucketSpec
from sora_jax.data.folder import MediaSettings
from sora_jax.data.sources import TfdsVideoSpec
from sora_jax.data.world import WorldConfig
from sora_jax.diffusion import conditioning
from sora_jax.diffusion.flow import SCHEDULES
from sora_jax.diffusion.solvers import SOLVERS
from sora_jax.interop.wan_vae import vae_config_from_diffusers
from sora_jax.models.attention import BACKENDS
from sora_jax.models.dit import REMAT_POLICIES, DiTConfig
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.text import TextEncoderConfig
from sora_jax.models.vae import VAEConfig, check_video_shape
from sora_jax.parallel.sharding import mesh_sizes

# name -> (width, depth, heads)
VARIANTS: dict[str, tuple[int, int, int]] = {
    "Pico": (32, 2, 2), "Nano": (128, 4, 4), "Ti": (192, 12, 3), "S": (384, 12, 6),
    "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16), "XXL": (1536, 30, 12),
}
COMPUTE_DTYPES = ("float32", "bfloat16")
GROUPINGS = ("none", "pack", "bucket")


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


def world_config(config: ml_collections.ConfigDict) -> WorldConfig:
  return WorldConfig.from_dict(config.world.to_dict())


def dit_config(config: ml_collections.ConfigDict, text_width: int, in_channels: int = 3) -> DiTConfig:
  """The transformer's config: the variant, overridden by non-zero model.width/depth/heads."""
  m = config.model
  base = decode_variant(m.variant)
  return DiTConfig(
      width=m.get("width") or base["width"], depth=m.get("depth") or base["depth"],
      heads=m.get("heads") or base["heads"], patch=base["patch"], in_channels=in_channels,
      text_width=text_width, mlp_ratio=float(m.mlp_ratio), qk_norm=m.qk_norm,
      modulation=m.modulation, text_projection=m.text_projection,
      cross_attn_norm=bool(m.cross_attn_norm), rope_theta=float(m.rope_theta),
      scan_layers=bool(m.get("scan_layers", False)), remat=m.get("remat", "none"),
      cond_channels=conditioning.extra_channels(config, in_channels),
      # Options presets of other architectures set (configs/wan2_1_t2v.py).
      mlp_hidden=int(m.get("mlp_hidden", 0)), text_padding=m.get("text_padding", "mask"),
      freq_dim=int(m.get("freq_dim", 256)), eps=float(m.get("eps", 1e-6)))


def vae_config(config: ml_collections.ConfigDict) -> VAEConfig:
  """The `VAEConfig` of `config.vae` (raises ValueError naming `vae.*` keys)."""
  v = config.vae
  return VAEConfig(compression=tuple(int(f) for f in v.compression),
                   latent_channels=int(v.latent_channels),
                   channels=tuple(int(c) for c in v.channels),
                   num_res_blocks=int(v.num_res_blocks),
                   factorized=bool(v.get("factorized", False)),
                   patch=int(v.get("patch", 1)), shortcuts=bool(v.get("shortcuts", False)),
                   decoder_channels=(tuple(int(c) for c in v.decoder_channels)
                                     if v.get("decoder_channels") else None))


# The autoencoder a config names (its run's or Wan's config files; no weights) ----------


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
    return vae_config(vae_workdir_config(section)).latent_shape(frames, height, width)
  if section.name == "wan":
    return wan_vae_config(section).latent_shape(frames, height, width)
  raise ValueError(f"autoencoder.name={section.name!r}: known autoencoders are "
                   "['identity', 'vae', 'wan'].")


def validate_vae(config: ml_collections.ConfigDict, num_devices: int | None = None,
                 num_processes: int | None = None) -> None:
  """Checks a VAE training config; raises ValueError naming the key at fault."""
  vae = vae_config(config)
  world = world_config(config)
  for size in world.all_sizes:
    try:
      check_video_shape(vae, *size)
    except ValueError as e:
      raise ValueError(f"world size {size} does not fit vae.compression={vae.compression}: "
                       f"{e}") from None
  for key, value in config.vae_loss.items():
    if isinstance(value, (int, float)) and value < 0:
      raise ValueError(f"vae_loss.{key}={value} must not be negative.")
  validate_data_source(config)
  _check_positive(config, ("train.steps", "optim.lr", "data.batch_size",
                            "train.checkpoint_every", "train.log_every", "eval.batch_size"))
  if config.train.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"train.compute_dtype={config.train.compute_dtype!r}: expected one of "
                     f"{COMPUTE_DTYPES}.")
  _check_batch_divides(config, ("data.batch_size", "eval.batch_size"),
                       *_batch_shards(config, num_devices, num_processes))


def text_encoder_config(config: ml_collections.ConfigDict, vocab_size: int) -> TextEncoderConfig:
  """The text encoder's config for a tokenizer of `vocab_size` pieces.

  `text_encoder.vocab_size` (when set) gives the embedding rows instead: pretrained
  encoders have more rows than their tokenizer has pieces (UMT5: 256384 for 256000).
  """
  t = config.text_encoder
  rows = int(t.get("vocab_size", 0)) or vocab_size
  if rows < vocab_size:
    raise ValueError(f"text_encoder.vocab_size={rows} is smaller than the tokenizer's "
                     f"{vocab_size} pieces.")
  return TextEncoderConfig(vocab_size=rows, width=t.width, depth=t.depth, heads=t.heads,
                           mlp_width=t.mlp_width, num_buckets=t.num_buckets,
                           max_distance=t.max_distance, eps=float(t.get("eps", 1e-6)))


def mesh_shape(config: ml_collections.ConfigDict) -> dict[str, int]:
  return {k: int(v) for k, v in config.mesh.to_dict().items()}


def sharding_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """`config.sharding.rules` as a tuple of `(logical, mesh_axes)` (JSON lists normalised)."""
  rules = []
  for name, target in config.sharding.rules:
    rules.append((name, tuple(target) if isinstance(target, (list, tuple)) else target))
  return tuple(rules)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
  """Checks a training config; raises ValueError naming the key at fault."""
  world = world_config(config)
  base = decode_variant(config.model.variant)
  patch = base["patch"]
  latent_channels(config.autoencoder)   # raises naming autoencoder.name / autoencoder.workdir
  latent_space = config.autoencoder.name != "identity"
  for size in world.all_sizes:
    key = "world.sizes" if world.sizes else "world"
    try:
      diffused = latent_shape_of(config.autoencoder, *size)[:3]
    except ValueError as e:
      raise ValueError(f"{key} size {size} does not fit the autoencoder: {e}") from None
    for axis, value, p in zip(("frames", "height", "width"), diffused, patch):
      if value % p:
        where = f"{key}.{axis}={value}" if not world.sizes else f"{key} entry {size} ({axis})"
        if latent_space:
          where = f"the latent {axis} {value} of {key} size {size}"
        raise ValueError(f"model.variant={config.model.variant!r}: patch size {p} does not "
                         f"divide {where}.")
  conditioning.validate(config)
  validate_data_source(config)
  if conditioning.enabled(config) and config.data.grouping == "pack":
    raise ValueError("conditioning: frame conditioning works on whole clips; use "
                     "data.grouping='none' or 'bucket' (not 'pack'), or set "
                     "conditioning.probs to none=1.")
  if latent_space and config.data.grouping != "none":
    raise ValueError("data.grouping: packing and bucketing work in pixel space for now; use "
                     "'none' with autoencoder.name='vae'.")
  grouping = config.data.grouping
  if grouping not in GROUPINGS:
    raise ValueError(f"data.grouping={grouping!r}: expected one of {GROUPINGS}.")
  if grouping == "none" and len(world.all_sizes) > 1:
    raise ValueError("world.sizes/image_ratio give clips of several sizes: set "
                     "data.grouping='pack' or 'bucket'.")
  if grouping == "bucket":
    if not config.data.get("buckets"):
      raise ValueError("data.buckets: bucketing needs a list of (frames, height, width).")
    for bucket in config.data.buckets:
      for axis, value, p in zip(("frames", "height", "width"), bucket, patch):
        if value % p:
          raise ValueError(f"data.buckets entry {tuple(bucket)}: patch size {p} of "
                           f"model.variant does not divide its {axis}.")
  if grouping == "pack":
    largest = max(num_tokens(size, patch) for size in world.all_sizes)
    if config.data.tokens_per_row < largest:
      raise ValueError(f"data.tokens_per_row={config.data.tokens_per_row} is smaller than the "
                       f"largest clip ({largest} tokens).")
    if config.data.text_tokens_per_row < config.data.text_length:
      raise ValueError(f"data.text_tokens_per_row={config.data.text_tokens_per_row} must be at "
                       f"least data.text_length={config.data.text_length}.")
    if config.data.max_examples_per_row < 1:
      raise ValueError("data.max_examples_per_row must be positive.")
  dit = dit_config(config, text_width=config.text_encoder.width)
  if dit.width % dit.heads:
    raise ValueError(f"model.heads={dit.heads} does not divide model.width={dit.width}.")
  if (dit.width // dit.heads) % 2:
    raise ValueError(f"model.width/model.heads={dit.width // dit.heads} must be even (RoPE).")
  t = config.text_encoder
  if t.width % t.heads:
    raise ValueError(f"text_encoder.heads={t.heads} does not divide text_encoder.width={t.width}.")
  for key in ("qk_norm", "modulation", "text_projection", "attention", "remat"):
    allowed = {"qk_norm": ("none", "rms", "rms_across_heads"),
               "modulation": ("per_block", "shared"),
               "text_projection": ("mlp", "linear"),
               "attention": BACKENDS,
               "remat": tuple(REMAT_POLICIES)}[key]
    if config.model[key] not in allowed:
      raise ValueError(f"model.{key}={config.model[key]!r}: expected one of {allowed}.")
  if config.train.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"train.compute_dtype={config.train.compute_dtype!r}: expected one of "
                     f"{COMPUTE_DTYPES}.")
  if config.sample.solver not in SOLVERS:
    raise ValueError(f"sample.solver={config.sample.solver!r}: expected one of {sorted(SOLVERS)}.")
  if config.sample.get("schedule", "uniform") not in SCHEDULES:
    raise ValueError(f"sample.schedule={config.sample.schedule!r}: expected one of {SCHEDULES}.")
  if not 0.0 <= config.flow.caption_dropout < 1.0:
    raise ValueError(f"flow.caption_dropout={config.flow.caption_dropout} must be in [0, 1).")
  _check_positive(config, ("train.steps", "optim.lr", "data.batch_size", "data.text_length",
                            "train.checkpoint_every", "train.log_every"))
  if int(config.train.get("max_nonfinite_steps", 5)) < 1:
    raise ValueError(f"train.max_nonfinite_steps={config.train.max_nonfinite_steps} must be "
                     "positive.")
  batch_shards, processes = _batch_shards(config, num_devices, num_processes)
  if grouping == "bucket":
    bucket_spec(config, processes, batch_shards)   # raises naming data.tokens_per_batch
  else:
    _check_batch_divides(config, ("data.batch_size",), batch_shards, processes)


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
  section, name = key.split(".")
  return config[section][name]


def validate_data_source(config: ml_collections.ConfigDict) -> None:
  """Checks `data`'s choice of source (sora_jax/data/sources.py); ValueError naming the key."""
  d = config.data
  tfds_name = d.tfds.get("name") if d.get("tfds") is not None else ""
  if tfds_name:
    TfdsVideoSpec.from_dict(d.tfds.to_dict())
  # data.latents_dir reads the latents encode-dataset wrote of the source named here.
  chosen = [k for k, v in (("data.media_dir", d.get("media_dir")),
                           ("data.tfds.name", tfds_name)) if v]
  if len(chosen) > 1:
    raise ValueError(f"{' and '.join(chosen)} are both set; a run reads one data source.")
  if d.get("media_dir") and not os.path.isfile(os.path.join(d.media_dir, "dataset.json")):
    raise ValueError(f"data.media_dir={d.media_dir!r} holds no prepared dataset; run "
                     f"`sora-jax prepare-data --media <folder> --out {d.media_dir}` first.")
  if d.get("cache_text") and "text_encoder" not in tuple(config.optim.get("frozen", ())):
    raise ValueError("data.cache_text: cached text states need a text encoder kept fixed "
                     "(optim.frozen=('text_encoder',)) and loaded from train.init_from.")
  if d.get("num_workers", 0) < 0:
    raise ValueError(f"data.num_workers={d.num_workers} must not be negative.")
  if not 0 <= d.get("max_skipped_fraction", 0.05) <= 1:
    raise ValueError(f"data.max_skipped_fraction={d.max_skipped_fraction} must be in [0, 1].")
  if d.get("max_side", 4096) < 1:
    raise ValueError(f"data.max_side={d.max_side} must be positive.")


def media_settings(config: ml_collections.ConfigDict):
  """The `MediaSettings` of `config.media` (for `sora-jax prepare-data`); `media.grid` 0
  becomes the patch size times the autoencoder's spatial factor."""
  if "media" not in config:
    raise ValueError("the config has no `media` section (see sora_jax.data.folder.media_config).")
  patch = decode_variant(config.model.variant)["patch"] if "model" in config else (1, 1, 1)
  spatial = 1
  if config.get("autoencoder") is not None and config.autoencoder.get("name") == "vae":
    spatial = int(vae_workdir_config(config.autoencoder).vae.compression[1])
  elif config.get("autoencoder") is not None and config.autoencoder.get("name") == "wan":
    spatial = int(wan_vae_config(config.autoencoder).compression[1])
  elif "vae" in config:
    spatial = int(config.vae.compression[1])
  return MediaSettings.from_dict(config.media.to_dict(), grid=max(patch[1], patch[2]) * spatial)


def _check_positive(config: ml_collections.ConfigDict, keys: tuple[str, ...]) -> None:
  for key in keys:
    if not _value(config, key) > 0:
      raise ValueError(f"{key}={_value(config, key)} must be positive.")


def _batch_shards(config: ml_collections.ConfigDict, num_devices: int | None,
                  num_processes: int | None) -> tuple[int, int]:
  """`(mesh.data x mesh.fsdp, process count)`: what a global batch must divide by."""
  devices = jax.device_count() if num_devices is None else num_devices
  sizes = mesh_sizes(mesh_shape(config), devices)
  processes = jax.process_count() if num_processes is None else num_processes
  return sizes["data"] * sizes["fsdp"], processes


def _check_batch_divides(config: ml_collections.ConfigDict, keys: tuple[str, ...],
                         batch_shards: int, processes: int) -> None:
  for key in keys:
    value = _value(config, key)
    if value % batch_shards or value % processes:
      raise ValueError(f"{key}={value} must divide by mesh.data x mesh.fsdp = {batch_shards} "
                       f"and by the {processes} processes.")


def bucket_spec(config: ml_collections.ConfigDict, num_processes: int,
                batch_shards: int | None = None):
  """The `BucketSpec` of a bucketing config: batch sizes are multiples of the data-parallel
  shards (mesh.data x mesh.fsdp) and of the process count."""
  if batch_shards is None:
    sizes = mesh_sizes(mesh_shape(config), jax.device_count())
    batch_shards = sizes["data"] * sizes["fsdp"]
  return BucketSpec.make(config.data.buckets, decode_variant(config.model.variant)["patch"],
                         config.data.tokens_per_batch,
                         multiple_of=math.lcm(batch_shards, num_processes))


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))
