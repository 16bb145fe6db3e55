"""Checks of a config before any compilation, raising ValueError naming the key at fault.

Every function takes a ConfigDict or a typed `Config` (`sora_jax.configs.typed`); a key
the config leaves out is checked at its schema default.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax

import sora_jax.configs.schema as schema  # the module, not the package (no import cycle)
from sora_jax.configs.convert import typed
from sora_jax.configs.models import (decode_variant, dit_config, latent_channels,
                                     latent_shape_of, mesh_shape, vae_config,
                                     vae_workdir_config, wan_vae_config, world_config)
from sora_jax.data.bucketing import BucketSpec
from sora_jax.data.folder import MediaSettings
from sora_jax.diffusion import conditioning
from sora_jax.diffusion.distillation import METHODS as DISTILL_METHODS, check_base_steps
from sora_jax.diffusion.flow import FRAME_TIMES, LOSS_SPACES, SCHEDULES, frame_times_shared
from sora_jax.diffusion.solvers import SOLVERS
from sora_jax.models.attention import BACKENDS
from sora_jax.models.dit import OUTPUT_HEADS, PREDICTIONS, REMAT_POLICIES
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.vae import check_video_shape
from sora_jax.parallel.sharding import mesh_sizes

COMPUTE_DTYPES = ("float32", "bfloat16")
GROUPINGS = ("none", "pack", "bucket")
MODEL_CHOICES = {"qk_norm": ("none", "rms", "rms_across_heads"),
                 "modulation": ("per_block", "shared"),
                 "text_projection": ("mlp", "linear"),
                 "attention": BACKENDS,
                 "remat": tuple(REMAT_POLICIES),
                 "prediction": PREDICTIONS,
                 "output_head": OUTPUT_HEADS}


def validate_vae(config, num_devices: int | None = None,
                 num_processes: int | None = None) -> None:
  """Checks a VAE training config; raises ValueError naming the key at fault."""
  t = typed(config)
  vae = vae_config(t)
  for size in world_config(t).all_sizes:
    try:
      check_video_shape(vae, *size)
    except ValueError as e:
      raise ValueError(f"world size {size} does not fit vae.compression={vae.compression}: "
                       f"{e}") from None
  for f in dataclasses.fields(schema.VAELoss):
    value = getattr(t.vae_loss or schema.VAELoss(), f.name)
    if value < 0:
      raise ValueError(f"vae_loss.{f.name}={value} must not be negative.")
  validate_data_source(t)
  _check_positive(t, ("train.steps", "optim.lr", "data.batch_size",
                      "train.checkpoint_every", "train.log_every", "eval.batch_size"))
  _check_dtype(t)
  _check_batch_divides(t, ("data.batch_size", "eval.batch_size"),
                       *_batch_shards(t, num_devices, num_processes))
  if t.train.microbatches != 1:
    raise ValueError(f"train.microbatches={t.train.microbatches}: the VAE's step takes its "
                     "batch whole (gradient accumulation is the transformer's train step's).")


def _check_sizes(t: schema.Config, patch: tuple[int, ...]) -> None:
  """Every world size fits the autoencoder, and the patch divides what is diffused."""
  world = world_config(t)
  latent_channels(t.autoencoder)   # raises naming autoencoder.name / autoencoder.workdir
  latent_space = t.autoencoder.name != "identity"
  key = "world.sizes" if world.sizes else "world"
  for size in world.all_sizes:
    try:
      diffused = latent_shape_of(t.autoencoder, *size)[:3]
    except ValueError as e:
      raise ValueError(f"{key} size {size} does not fit the autoencoder: {e}") from None
    for axis, value, p in zip(("frames", "height", "width"), diffused, patch):
      if value % p:
        where = f"{key}.{axis}={value}" if not world.sizes else f"{key} entry {size} ({axis})"
        if latent_space:
          where = f"the latent {axis} {value} of {key} size {size}"
        raise ValueError(f"model.variant={t.model.variant!r}: patch size {p} does not "
                         f"divide {where}.")


def _check_grouping(t: schema.Config, patch: tuple[int, ...]) -> None:
  d = t.data
  if conditioning.enabled(t) and d.grouping == "pack":
    raise ValueError("conditioning: frame conditioning works on whole clips; use "
                     "data.grouping='none' or 'bucket' (not 'pack'), or set "
                     "conditioning.probs to none=1.")
  if t.flow.gradient_loss_weight and d.grouping == "pack":
    raise ValueError("flow.gradient_loss_weight differences neighbouring pixels of whole "
                     "clips: not with data.grouping=pack.")
  overlap = t.model.head_overlap
  if overlap and (overlap < 0 or t.model.output_head == "field"
                  or 2 * overlap > min(patch[1:]) or d.grouping == "pack"):
    raise ValueError(f"model.head_overlap={overlap}: needs output_head linear or mlp, "
                     f"twice the overlap at most the patch's height and width {patch[1:]}, "
                     "and whole clips (not data.grouping=pack).")
  if t.autoencoder.name != "identity" and d.grouping != "none":
    raise ValueError("data.grouping: packing and bucketing work in pixel space for now; use "
                     "'none' with autoencoder.name='vae'.")
  if d.grouping not in GROUPINGS:
    raise ValueError(f"data.grouping={d.grouping!r}: expected one of {GROUPINGS}.")
  sizes = world_config(t).all_sizes
  if d.grouping == "none" and len(sizes) > 1:
    raise ValueError("world.sizes/image_ratio give clips of several sizes: set "
                     "data.grouping='pack' or 'bucket'.")
  if d.grouping == "bucket":
    if not d.buckets:
      raise ValueError("data.buckets: bucketing needs a list of (frames, height, width).")
    for bucket in d.buckets:
      for axis, value, p in zip(("frames", "height", "width"), bucket, patch):
        if value % p:
          raise ValueError(f"data.buckets entry {tuple(bucket)}: patch size {p} of "
                           f"model.variant does not divide its {axis}.")
  if d.grouping == "pack":
    largest = max(num_tokens(size, patch) for size in sizes)
    if d.tokens_per_row < largest:
      raise ValueError(f"data.tokens_per_row={d.tokens_per_row} is smaller than the "
                       f"largest clip ({largest} tokens).")
    if d.text_tokens_per_row < d.text_length:
      raise ValueError(f"data.text_tokens_per_row={d.text_tokens_per_row} must be at "
                       f"least data.text_length={d.text_length}.")
    if d.max_examples_per_row < 1:
      raise ValueError("data.max_examples_per_row must be positive.")


def _check_model(t: schema.Config) -> None:
  dit = dit_config(t, text_width=t.text_encoder.width)
  if dit.width % dit.heads:
    raise ValueError(f"model.heads={dit.heads} does not divide model.width={dit.width}.")
  if (dit.width // dit.heads) % 2:
    raise ValueError(f"model.width/model.heads={dit.width // dit.heads} must be even (RoPE).")
  if t.model.token_chunks < 1:
    raise ValueError(f"model.token_chunks={t.model.token_chunks} must be at least 1.")
  if t.model.splash_block < 128 or t.model.splash_block % 128:
    raise ValueError(f"model.splash_block={t.model.splash_block} must be a positive multiple "
                     "of 128 (splash attention's blocks).")
  te = t.text_encoder
  if te.width % te.heads:
    raise ValueError(f"text_encoder.heads={te.heads} does not divide "
                     f"text_encoder.width={te.width}.")
  for key, allowed in MODEL_CHOICES.items():
    if getattr(t.model, key) not in allowed:
      raise ValueError(f"model.{key}={getattr(t.model, key)!r}: expected one of {allowed}.")
  if t.model.camera_control:
    if not world_config(t).camera or t.data.grouping != "none" or t.data.latents_dir:
      raise ValueError("model.camera_control needs a camera world (world.camera), clips of "
                       "one size (data.grouping=none) and videos encoded while training (no "
                       "data.latents_dir: cached latents keep no camera path).")
    if not 0.0 <= t.model.camera_dropout < 1.0:
      raise ValueError(f"model.camera_dropout={t.model.camera_dropout} must be in [0, 1).")
  if t.model.camera_rope and (not t.model.camera_control or t.autoencoder.name != "identity"):
    raise ValueError("model.camera_rope places a pixel model's tokens by the camera input: "
                     "it needs model.camera_control=true and autoencoder.name=identity.")
  if t.model.self_condition and (t.data.grouping == "pack"
                                 or not frame_times_shared(dict(t.flow.frame_times))):
    raise ValueError("model.self_condition trains clips of one flow time each: not with "
                     "data.grouping=pack or per-frame flow.frame_times.")
  if t.model.output_head == "field" and t.model.field_hidden < 1:
    raise ValueError(f"model.field_hidden={t.model.field_hidden} must be positive.")
  if t.model.output_head == "mlp" and t.model.head_hidden < 1:
    raise ValueError(f"model.head_hidden={t.model.head_hidden} must be positive.")
  if t.model.causal_frames < 0:
    raise ValueError(f"model.causal_frames={t.model.causal_frames} must be >= 0 (0: "
                     "bidirectional).")
  if (t.model.causal_frames and t.data.grouping == "pack"
      and t.model.attention == "splash"):
    raise ValueError("model.causal_frames with packed rows (data.grouping=pack): splash "
                     "attention's block-causal mask needs rows of one video; use "
                     "model.attention=xla, dot_product or ring.")
  _check_experts(t)
  # Imported Wan image-to-video models sample; their training inputs are not built here.
  if t.image_encoder.width or conditioning.scheme(t) in ("wan", "replace"):
    raise ValueError(f"image_encoder.width={t.image_encoder.width} / conditioning.scheme="
                     f"{conditioning.scheme(t)!r} (an imported Wan image-to-video model): "
                     "training it is not supported (its step would need CLIP states or Wan's "
                     "conditioning of every clip); sample or export it.")


def _check_experts(t: schema.Config) -> None:
  """Two experts (`model.boundary`) train on whole clips of one flow time each, without
  adapters; `train.expert` names one of them or neither."""
  if t.train.expert not in ("", "high", "low"):
    raise ValueError(f"train.expert={t.train.expert!r}: expected '' (both experts), 'high' "
                     "or 'low'.")
  if not t.model.boundary:
    if t.train.expert:
      raise ValueError(f"train.expert={t.train.expert!r} trains one of two experts: set "
                       "model.boundary (the flow time between them) in (0, 1).")
    return
  if not 0.0 < t.model.boundary < 1.0:
    raise ValueError(f"model.boundary={t.model.boundary} must be in (0, 1).")
  if (t.data.grouping == "pack" or t.lora.rank
      or not frame_times_shared(dict(t.flow.frame_times))):
    raise ValueError(f"model.boundary={t.model.boundary} (two experts) trains whole clips of "
                     "one flow time each, without adapters: not with data.grouping=pack, "
                     "lora.rank or per-frame flow.frame_times.")


def _check_lora(t: schema.Config) -> None:
  if t.lora.rank < 0:
    raise ValueError(f"lora.rank={t.lora.rank} must be >= 0 (0: no adapters).")
  if not 0.0 <= t.lora.dropout < 1.0:
    raise ValueError(f"lora.dropout={t.lora.dropout} must be in [0, 1).")
  if t.lora.alpha < 0:
    raise ValueError(f"lora.alpha={t.lora.alpha} must be >= 0 (0: alpha = rank).")
  if t.lora.rank and not t.lora.targets:
    raise ValueError("lora.targets is empty: name the linear layers to adapt "
                     "(e.g. ('dit.blocks.*attn.q',)).")


def _check_distill(t: schema.Config) -> None:
  d = t.distill
  if d.method not in DISTILL_METHODS:
    raise ValueError(f"distill.method={d.method!r}: expected one of {DISTILL_METHODS}.")
  check_base_steps(d.base_steps)
  if d.steps < 1 or d.steps & (d.steps - 1) or d.steps > d.base_steps:
    raise ValueError(f"distill.steps={d.steps} must be a power of two <= distill.base_steps="
                     f"{d.base_steps} (the step sizes a shortcut student learns).")
  if d.shift < 0 or (d.method == "shortcut" and d.shift != 1.0):
    raise ValueError(f"distill.shift={d.shift}: a shortcut student's grid is uniform "
                     "(shift 1); a trajectory student's shift must be >= 0 (0: the "
                     "teacher's sample.shift).")
  if d.teacher_steps < 1:
    raise ValueError(f"distill.teacher_steps={d.teacher_steps} must be at least 1.")
  if d.causal_frames < 0 or (d.causal_frames and d.method not in ("causal", "dmd")):
    raise ValueError(f"distill.causal_frames={d.causal_frames}: the causal block of a "
                     "distill.method='causal' or 'dmd' student of a bidirectional teacher "
                     "(>= 1), else 0.")
  if t.model.critic and d.method != "dmd":
    raise ValueError("model.critic: the critic of a distill.method='dmd' student (`sora-jax "
                     "distill` sets it); a model of any other run has none.")
  lo, hi = d.dmd_times
  if not 0.0 < lo <= hi < 1.0:
    raise ValueError(f"distill.dmd_times={d.dmd_times}: need 0 < lo <= hi < 1.")
  if d.past not in ("data", "student"):
    raise ValueError(f"distill.past={d.past!r}: expected 'data' or 'student'.")
  if d.past == "student" and (d.method != "causal" or d.causal_frames):
    raise ValueError("distill.past='student' (the student's own earlier blocks) needs "
                     "distill.method='causal' of a block-causal teacher (distill.causal_frames=0).")
  if d.dmd_rollout_blocks < 0 or (d.dmd_rollout_blocks and (
      d.method != "dmd" or not (t.model.causal_frames or d.causal_frames))):
    raise ValueError(f"distill.dmd_rollout_blocks={d.dmd_rollout_blocks}: the streamed "
                     "rollout of a distill.method='dmd' block-causal student (>= the clip's "
                     "blocks), else 0.")
  if not 0.0 <= d.dmd_window_at_start <= 1.0:
    raise ValueError(f"distill.dmd_window_at_start={d.dmd_window_at_start} must be in [0, 1].")
  if not 0.0 <= d.consistency_fraction < 1.0:
    raise ValueError(f"distill.consistency_fraction={d.consistency_fraction} must be in [0, 1).")
  lo, hi = d.guidance_range
  if not 0.0 <= lo <= hi:
    raise ValueError(f"distill.guidance_range={d.guidance_range}: need 0 <= lo <= hi.")
  if d.cfg_scale < 0:
    raise ValueError(f"distill.cfg_scale={d.cfg_scale} must be >= 0 (0: the teacher's "
                     "sample.cfg_scale).")


def validate(config, num_devices: int | None = None, num_processes: int | None = None) -> None:
  """Checks a training config; raises ValueError naming the key at fault."""
  t = typed(config)
  world_config(t)   # raises naming world.*
  patch = decode_variant(t.model.variant)["patch"]
  _check_sizes(t, patch)
  conditioning.validate(t)
  validate_data_source(t)
  _check_grouping(t, patch)
  _check_model(t)
  _check_lora(t)
  _check_distill(t)
  _check_dtype(t)
  if t.sample.solver not in SOLVERS:
    raise ValueError(f"sample.solver={t.sample.solver!r}: expected one of {sorted(SOLVERS)}.")
  _check_frame_times(t)
  if t.flow.loss_space not in LOSS_SPACES:
    raise ValueError(f"flow.loss_space={t.flow.loss_space!r}: expected one of {LOSS_SPACES}.")
  if t.sample.schedule not in SCHEDULES:
    raise ValueError(f"sample.schedule={t.sample.schedule!r}: expected one of {SCHEDULES}.")
  if not 0.0 <= t.sample.eta <= 1.0 or (t.sample.eta and t.sample.solver != "euler"):
    raise ValueError(f"sample.eta={t.sample.eta}: the share of fresh noise in the euler "
                     "solver's steps is in [0, 1], and 0 for other solvers.")
  if not 0.0 <= t.flow.caption_dropout < 1.0:
    raise ValueError(f"flow.caption_dropout={t.flow.caption_dropout} must be in [0, 1).")
  if not 0.0 <= t.flow.self_condition_rate <= 1.0:
    raise ValueError(f"flow.self_condition_rate={t.flow.self_condition_rate} must be in [0, 1].")
  if not 0.0 <= t.flow.second_shift_share <= 1.0:
    raise ValueError(f"flow.second_shift_share={t.flow.second_shift_share} must be in [0, 1].")
  if t.flow.second_shift_share and t.flow.second_shift <= 0:
    raise ValueError(f"flow.second_shift={t.flow.second_shift} must be > 0.")
  if t.flow.gradient_loss_weight < 0:
    raise ValueError(f"flow.gradient_loss_weight={t.flow.gradient_loss_weight} must be >= 0.")
  if not 0.0 < t.flow.gradient_loss_max_time <= 1.0:
    raise ValueError(f"flow.gradient_loss_max_time={t.flow.gradient_loss_max_time} must be "
                     "in (0, 1].")
  if not 0.0 <= t.flow.gradient_loss_min_time < t.flow.gradient_loss_max_time:
    raise ValueError(f"flow.gradient_loss_min_time={t.flow.gradient_loss_min_time} must be "
                     f"in [0, flow.gradient_loss_max_time={t.flow.gradient_loss_max_time}).")
  _check_positive(t, ("train.steps", "optim.lr", "data.batch_size", "data.text_length",
                      "train.checkpoint_every", "train.log_every", "train.max_nonfinite_steps"))
  batch_shards, processes = _batch_shards(t, num_devices, num_processes)
  if t.data.grouping == "bucket":
    bucket_spec(t, processes, batch_shards)   # raises naming data.tokens_per_batch
  else:
    _check_batch_divides(t, ("data.batch_size",), batch_shards, processes,
                         shared_rows=t.data.grouping == "none")
  _check_microbatches(t, batch_shards)


def validate_data_source(config) -> None:
  """Checks `data`'s choice of source (sora_jax/data/sources.py); ValueError naming the key."""
  t = typed(config)
  d = t.data
  # data.latents_dir reads the latents encode-dataset wrote of the source named here.
  chosen = [k for k, v in (("data.media_dir", d.media_dir), ("data.tfds.name", d.tfds.name))
            if v]
  if len(chosen) > 1:
    raise ValueError(f"{' and '.join(chosen)} are both set; a run reads one data source.")
  if d.media_dir and not os.path.isfile(os.path.join(d.media_dir, "dataset.json")):
    raise ValueError(f"data.media_dir={d.media_dir!r} holds no prepared dataset; run "
                     f"`sora-jax prepare-data --media <folder> --out {d.media_dir}` first.")
  if d.cache_text and "text_encoder" not in t.optim.frozen:
    raise ValueError("data.cache_text: cached text states need a text encoder kept fixed "
                     "(optim.frozen=('text_encoder',)) and loaded from train.init_from.")
  if d.num_workers < 0:
    raise ValueError(f"data.num_workers={d.num_workers} must not be negative.")
  if not 0 <= d.max_skipped_fraction <= 1:
    raise ValueError(f"data.max_skipped_fraction={d.max_skipped_fraction} must be in [0, 1].")
  if d.max_side < 1:
    raise ValueError(f"data.max_side={d.max_side} must be positive.")


def media_settings(config):
  """The `MediaSettings` of `config.media` (for `sora-jax prepare-data`); `media.grid` 0
  becomes the patch size times the autoencoder's spatial factor (a VAE run: its own)."""
  if "media" not in config:
    raise ValueError("the config has no `media` section (see sora_jax.data.folder.MediaConfig).")
  patch = decode_variant(config.model.variant)["patch"] if "model" in config else (1, 1, 1)
  t = typed(config)
  spatial = 1
  if "autoencoder" in config and t.autoencoder.name == "vae":
    spatial = int(vae_config(vae_workdir_config(t.autoencoder)).compression[1])
  elif "autoencoder" in config and t.autoencoder.name == "wan":
    spatial = int(wan_vae_config(t.autoencoder).compression[1])
  elif t.vae is not None:
    spatial = int(t.vae.compression[1])
  media = {f.name: getattr(t.media, f.name) for f in dataclasses.fields(t.media)}
  return MediaSettings.from_dict(media, grid=max(patch[1], patch[2]) * spatial)


def _value(t: schema.Config, key: str):
  section, name = key.split(".")
  return getattr(getattr(t, section), name)


def _check_positive(t: schema.Config, keys: tuple[str, ...]) -> None:
  for key in keys:
    if not _value(t, key) > 0:
      raise ValueError(f"{key}={_value(t, key)} must be positive.")


def _check_dtype(t: schema.Config) -> None:
  if t.train.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"train.compute_dtype={t.train.compute_dtype!r}: expected one of "
                     f"{COMPUTE_DTYPES}.")
  for key in ("frozen_dtype", "param_dtype"):
    if getattr(t.optim, key) not in ("",) + COMPUTE_DTYPES:
      raise ValueError(f"optim.{key}={getattr(t.optim, key)!r}: expected '' (as "
                       f"initialised) or one of {COMPUTE_DTYPES}.")
  if t.optim.master_copy and t.optim.param_dtype in ("", "float32"):
    raise ValueError("optim.master_copy keeps a float32 copy of weights stored in a lower "
                     "precision: set optim.param_dtype (e.g. bfloat16) too.")
  if any(len(pair) != 2 or not pair[1] > 0 for pair in t.optim.lr_scales):
    raise ValueError(f"optim.lr_scales={t.optim.lr_scales}: expected (group, factor > 0) "
                     "pairs, e.g. (('critic', 5.0),).")


def _batch_shards(t: schema.Config, num_devices: int | None,
                  num_processes: int | None) -> tuple[int, int]:
  """`(mesh.data x mesh.fsdp, process count)`: what a global batch must divide by."""
  devices = jax.device_count() if num_devices is None else num_devices
  sizes = mesh_sizes(mesh_shape(t), devices)
  processes = jax.process_count() if num_processes is None else num_processes
  return sizes["data"] * sizes["fsdp"], processes


def _check_microbatches(t: schema.Config, batch_shards: int) -> None:
  """`train.microbatches` splits a fixed batch into equal microbatches, each spread over
  the batch shards."""
  count = t.train.microbatches
  if count < 1:
    raise ValueError(f"train.microbatches={count} must be at least 1.")
  if count == 1:
    return
  if t.data.grouping == "bucket":
    raise ValueError(f"train.microbatches={count} splits a fixed batch (data.batch_size); "
                     "bucketed batches vary in size: use data.grouping=none or pack.")
  if t.data.batch_size % (count * batch_shards):
    raise ValueError(f"data.batch_size={t.data.batch_size} must divide by train.microbatches "
                     f"x mesh.data x mesh.fsdp = {count} x {batch_shards}.")


def _check_batch_divides(t: schema.Config, keys: tuple[str, ...], batch_shards: int,
                         processes: int, shared_rows: bool = False) -> None:
  """Each key's batch divides by the batch shards and by the processes; with `shared_rows`
  (a pipeline that loads the rows each process's devices hold) processes may instead share
  a batch shard (one sample split across hosts): their count then divides the shards or is
  a multiple of them."""
  for key in keys:
    value = _value(t, key)
    if shared_rows:
      if value % batch_shards or (batch_shards % processes and processes % batch_shards):
        raise ValueError(f"{key}={value} must divide by mesh.data x mesh.fsdp = "
                         f"{batch_shards}, and the {processes} processes must divide those "
                         "shards or be a multiple of them.")
    elif value % batch_shards or value % processes:
      raise ValueError(f"{key}={value} must divide by mesh.data x mesh.fsdp = {batch_shards} "
                       f"and by the {processes} processes.")


def bucket_spec(config, num_processes: int, batch_shards: int | None = None):
  """The `BucketSpec` of a bucketing config: batch sizes are multiples of the data-parallel
  shards (mesh.data x mesh.fsdp) and of the process count."""
  t = typed(config)
  if batch_shards is None:
    sizes = mesh_sizes(mesh_shape(t), jax.device_count())
    batch_shards = sizes["data"] * sizes["fsdp"]
  return BucketSpec.make(t.data.buckets, decode_variant(t.model.variant)["patch"],
                         t.data.tokens_per_batch, multiple_of=math.lcm(batch_shards, num_processes))


def _check_frame_times(t) -> None:
  """flow.frame_times: known kinds, weights >= 0 summing to > 0; per-frame times are for
  clips of one size (not packed rows)."""
  kinds = dict(t.flow.frame_times)
  unknown = sorted(set(kinds) - set(FRAME_TIMES))
  if unknown:
    raise ValueError(f"flow.frame_times: unknown kinds {unknown}; expected some of "
                     f"{FRAME_TIMES}.")
  if any(w < 0 for w in kinds.values()) or sum(kinds.values()) <= 0:
    raise ValueError(f"flow.frame_times={kinds}: weights must be >= 0 with a positive sum.")
  if not frame_times_shared(kinds) and t.data.grouping == "pack":
    raise ValueError("flow.frame_times: per-frame times are not supported with packed rows "
                     "(data.grouping='pack'); use shared times or bucketing.")
