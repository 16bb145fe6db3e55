"""The data a run reads: the config's source, latent datasets included, and the training
dataset its `data.grouping` asks for (fixed size, packed native sizes, or buckets).

A latent dataset (`sora_jax.data.latents`) is made from a run: its fingerprint names
the VAE run and checkpoint step that encoded it (and, with `data.cache_text`, the run
whose frozen text encoder it cached), so describing, writing and choosing one reads
runs and checkpoints and lives in this layer. The pixel sources (the world, a prepared
folder, a TFDS dataset) are `sora_jax.data.sources.pixel_source`.

  sora-jax encode-dataset --config CONFIG --out DIR    # `encode_dataset`
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from sora_jax import configs
from sora_jax.data.bucketing import make_bucketed_dataset
from sora_jax.data.latents import TextFn, load_latent_source, write_latent_dataset
from sora_jax.data.packing import make_packed_dataset, padding_fraction
from sora_jax.data.pipeline import make_train_dataset
from sora_jax.data.sources import CheckedSource, pixel_source, source_captions
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.tokenizer import Tokenizer
from sora_jax.parallel.distributed import sync
from sora_jax.parallel.sharding import process_batch_rows
from sora_jax.train import workdir as wd
from sora_jax.train.autoencoders import make_autoencoder
from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.restore import restore_params


def training_source(config: ml_collections.ConfigDict, split: str = "train"):
  """The records of `split` that `config.data` names, unchecked: the latent dataset of
  `data.latents_dir` (checked against what this config would encode), else the pixel
  source (`pixel_source`). `config`: a ConfigDict (missing keys at the schema's defaults)."""
  t = configs.typed(config)
  if t.data.latents_dir:
    return load_latent_source(t.data.latents_dir, latents_description(t), split)
  return pixel_source(configs.filled(config), split)


# World keys a latent dataset's description lacked before they existed.
WORLD_KEYS_ADDED = ("sizes", "image_ratio")

PaddingFn = Callable[[dict[str, np.ndarray]], float]


def make_dataset(config: ml_collections.ConfigDict, source: Sequence[dict[str, Any]],
                 tokenizer: Tokenizer, mesh: Mesh | None = None
                 ) -> tuple[grain.IterDataset, PaddingFn | None]:
  """The training dataset of `config.data.grouping`, and how much of a batch is padding.

  Records pass `CheckedSource` (bad ones replaced by good ones and counted); with
  `grouping="none"` clips are fitted to the config's `world` size (a no-op for
  records of that size) and, given the run's `mesh`, each process loads the rows its
  devices hold (`parallel.sharding.process_batch_rows`); without one, an equal share.

  Returns:
    `(dataset, padding)`: `padding(local_batch)` is the share of the batch's token budget
    that is padding (packing: padding tokens; bucketing: unused budget), or None for
    fixed-size batches, which have none.
  """
  t = configs.typed(config)
  d = t.data
  patch = configs.decode_variant(t.model.variant)["patch"]
  source = CheckedSource(source, max_side=d.max_side)
  common = dict(tokenizer=tokenizer, text_length=d.text_length, seed=d.shuffle_seed,
                num_threads=d.num_threads, prefetch=d.prefetch, num_workers=d.num_workers)
  if d.grouping == "pack":
    dataset = make_packed_dataset(
        source, patch=patch, tokens_per_row=d.tokens_per_row,
        text_tokens_per_row=d.text_tokens_per_row, max_examples_per_row=d.max_examples_per_row,
        global_batch_size=d.batch_size, packing_bins=d.packing_bins or None, **common)
    return dataset, padding_fraction
  if d.grouping == "bucket":
    spec = configs.bucket_spec(t, jax.process_count())
    if jax.process_index() == 0:
      for (bucket, waste), size in zip(spec.padding(patch).items(), spec.batch_sizes):
        logging.warning("bucket %s: batch %d, %.1f%% of the token budget unused.", bucket, size,
                        100 * waste)

    def unused_budget(batch: dict[str, np.ndarray]) -> float:
      video = batch["video"]
      tokens = num_tokens(video.shape[1:4], patch) * len(video) * jax.process_count()
      return 1 - tokens / spec.tokens_per_batch

    return make_bucketed_dataset(source, spec=spec, **common), unused_budget
  size = (t.world.frames, t.world.height, t.world.width)
  rows = (None if mesh is None
          else process_batch_rows(mesh, configs.sharding_rules(config), d.batch_size))
  return make_train_dataset(source, global_batch_size=d.batch_size, size=size,
                            camera=t.model.camera_control, rows=rows, **common), None


def latents_description(config) -> dict[str, Any]:
  """What a latent dataset depends on: the data source (the world, a prepared folder or a
  TFDS dataset), the clip size, the autoencoder (a VAE run and its step, or a Wan VAE
  directory) and, with `data.cache_text`, the text encoder's run and text length."""
  t = configs.typed(config)
  d = t.data
  world = {k: v for k, v in configs.as_dict(t.world).items() if k != "data_dir"}
  for key in WORLD_KEYS_ADDED:   # at their defaults, they leave older fingerprints alone
    if world[key] == getattr(configs.schema.World, key):
      del world[key]
  description: dict[str, Any] = {"world": world}
  if d.media_dir:
    with open(os.path.join(d.media_dir, "dataset.json"), encoding="utf-8") as f:
      description["media"] = {"dir": os.path.abspath(d.media_dir),
                              "dataset": json.load(f)["dataset_dir"]}
  elif d.tfds.name:
    description["tfds"] = configs.as_dict(d.tfds)
  if t.autoencoder.name == "wan":
    description["wan_vae"] = os.path.abspath(t.autoencoder.path)
  else:
    vae_dir = os.path.abspath(t.autoencoder.workdir)
    checkpointer = Checkpointer(wd.checkpoint_dir(vae_dir), keep=1, every=1, async_save=False)
    description.update(vae_workdir=vae_dir, vae_step=checkpointer.latest_step())
    checkpointer.close()
  if d.cache_text:
    description["text"] = {"init_from": os.path.abspath(t.train.init_from),
                           "text_length": int(d.text_length)}
  return json.loads(json.dumps(description))


def frozen_text_states(config) -> TextFn:
  """`captions -> (states [n, L, D], mask [n, L])` of the text encoder of
  `train.init_from` (tokenised by its tokenizer to `data.text_length`), for
  `data.cache_text`; ValueError unless `optim.frozen` keeps that encoder fixed."""
  t = configs.typed(config)
  init_from = t.train.init_from
  if not init_from or "text_encoder" not in t.optim.frozen:
    raise ValueError("data.cache_text: cached text states need a pretrained text encoder kept "
                     "fixed: set train.init_from and optim.frozen=('text_encoder',).")
  run = restore_params(init_from)
  tokenizer, model = run.tokenizer, nnx.merge(run.graphdef, run.params)
  encode = jax.jit(lambda ids, mask: model.text_encoder(ids, mask))
  length = t.data.text_length

  def text_fn(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = tokenizer.encode(captions, length)
    return np.asarray(jax.device_get(encode(ids, mask)), np.float32), mask
  return text_fn


def encode_dataset(config, out_dir: str, batch_size: int = 16):
  """Encodes the train and test splits of `config`'s data source with its VAE (and, with
  `data.cache_text`, the captions with its frozen text encoder) into `out_dir` (see
  `write_latent_dataset`); returns the TFDS builder. A source without a test split
  (a prepared folder with `media.test_fraction` 0) gives the train split only."""
  if config.autoencoder.name not in ("vae", "wan"):
    raise ValueError(f"autoencoder.name={config.autoencoder.name!r}: encode-dataset needs a "
                     "VAE (autoencoder.name='vae' with autoencoder.workdir=<train-vae "
                     "workdir>, or 'wan' with autoencoder.path=<AutoencoderKLWan dir>).")
  world = configs.world_config(config)
  if world.sizes or world.image_ratio:
    raise ValueError("world.sizes/image_ratio: latent datasets of mixed sizes are not supported "
                     "yet; encode a fixed-size world.")
  text_fn = frozen_text_states(config) if configs.typed(config).data.cache_text else None
  splits = {}
  for split in ("train", "test"):
    try:
      # The pixels the latents come from.
      splits[split] = pixel_source(configs.filled(config), split)
    except ValueError:
      if split == "train":
        raise
  return write_latent_dataset(out_dir, splits, make_autoencoder(config.autoencoder),
                              latents_description(config), batch_size,
                              size=(world.frames, world.height, world.width), text_fn=text_fn)


def run_data(config: ml_collections.ConfigDict, workdir: str, tokenizer_from: str = "",
             mesh: Mesh | None = None):
  """`(tokenizer, dataset, padding fn)` of a run in `workdir` on `mesh` (`make_dataset`):
  process 0 writes the
  dataset and the tokenizer (the one of the run or export `tokenizer_from`, a pretrained
  model's, or one trained on the captions); the others then read them."""
  if jax.process_index() == 0:
    if tokenizer_from and not os.path.exists(wd.tokenizer_path(workdir)):
      os.makedirs(workdir, exist_ok=True)
      shutil.copyfile(wd.tokenizer_path(tokenizer_from), wd.tokenizer_path(workdir))
    wd.ensure_tokenizer(workdir, config, source_captions(training_source(config)))
  sync("sora_jax_data_ready")
  source = training_source(config)
  tokenizer = wd.ensure_tokenizer(workdir, config, [])
  dataset, batch_padding = make_dataset(config, source, tokenizer, mesh)
  return tokenizer, dataset, batch_padding
