"""A latent dataset: clips encoded once by a trained VAE, written as a TFDS ArrayRecord
dataset, so diffusion training reads latents instead of encoding pixels every step.

`sora-jax encode-dataset --config CONFIG --out DIR` writes it for a config whose
`autoencoder` is a VAE; training reads it when `data.latents_dir` is set. Each record:
  latent   float32 `[T', H', W', Z]` normalised posterior mean (what `VAEAutoencoder.encode`
           gives the transformer)
  caption  the source clip's caption
  index    the source record's index in its split (to trace a latent to its clip)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from sora_jax.data.pipeline import as_text, normalise_video


def encode_source(autoencoder, source: Sequence[dict[str, Any]], batch_size: int
                  ) -> Iterator[tuple[int, np.ndarray, str]]:
  """Yields `(index, latent [T', H', W', Z], caption)` for every record of `source`,
  encoding `batch_size` clips at a time with one compiled function."""
  encode = jax.jit(autoencoder.encode)
  for start in range(0, len(source), batch_size):
    indices = list(range(start, min(start + batch_size, len(source))))
    records = [source[i] for i in indices]
    videos = np.stack([normalise_video(r["video"]) for r in records])
    pad = batch_size - len(videos)
    if pad:
      videos = np.concatenate([videos, np.repeat(videos[-1:], pad, 0)])
    latents = np.asarray(jax.device_get(encode(videos)), np.float32)
    for i, record, latent in zip(indices, records, latents):
      yield i, latent, as_text(record["caption"])


@functools.cache
def _builder_class():
  """The TFDS builder class, defined (and registered with TFDS) once, on first use."""
  import tensorflow_datasets as tfds  # imported lazily: heavy

  class EncodedLatents(tfds.core.GeneratorBasedBuilder):
    """Latents of a pixel dataset's splits under one autoencoder; one builder config per
    (dataset, autoencoder) pair, named by `fingerprint`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, fingerprint: str = "", description: str = "", splits=None,
                 autoencoder=None, batch_size: int = 16, **kwargs):
      self.splits, self.autoencoder, self.batch_size = splits or {}, autoencoder, batch_size
      config = tfds.core.BuilderConfig(name=fingerprint, description=description)
      super().__init__(config=config, **kwargs)

    def _info(self):
      f = tfds.features
      # Shapes are stored per record (as for the world's videos), so a reader needs no
      # knowledge of the autoencoder to describe the features.
      return self.dataset_info_from_configs(features=f.FeaturesDict({
          "latent": f.Tensor(shape=(None, None, None, None), dtype=np.float32, encoding="zlib"),
          "caption": f.Text(),
          "index": f.Scalar(dtype=np.int64),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {name: self._generate_examples(source) for name, source in self.splits.items()}

    def _generate_examples(self, source):
      for index, latent, caption in encode_source(self.autoencoder, source, self.batch_size):
        yield index, {"latent": latent, "caption": caption, "index": index}

  return EncodedLatents


def latents_fingerprint(description: dict[str, Any]) -> str:
  blob = json.dumps(description, sort_keys=True).encode()
  return "latents_" + hashlib.sha256(blob).hexdigest()[:12]


def write_latent_dataset(out_dir: str, splits: dict[str, Sequence[dict[str, Any]]],
                         autoencoder, description: dict[str, Any], batch_size: int = 16):
  """Encodes every split of `splits` and writes them under `out_dir` (once: an existing
  dataset with the same `description` is reused). Returns the TFDS builder."""
  builder = _builder_class()(
      fingerprint=latents_fingerprint(description), description=json.dumps(description),
      splits=splits, autoencoder=autoencoder, batch_size=batch_size, data_dir=out_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder


def load_latent_source(out_dir: str, description: dict[str, Any], split: str):
  """A random-access source over one split of the latent dataset `write_latent_dataset`
  wrote for `description`; FileNotFoundError naming the command when it is missing."""
  builder = _builder_class()(fingerprint=latents_fingerprint(description),
                             description=json.dumps(description), data_dir=out_dir,
                             file_format="array_record")
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"data.latents_dir={out_dir!r} holds no latents of this world and autoencoder; "
        "write them with `sora-jax encode-dataset --config <this config> --out <dir>`.")
  return builder.as_data_source(split=split)


def latents_description(config) -> dict[str, Any]:
  """What a latent dataset depends on: the world and the VAE (its workdir and step)."""
  from sora_jax.train import workdir as wd  # pylint: disable=g-import-not-at-top
  from sora_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  world = {k: v for k, v in config.world.to_dict().items() if k != "data_dir"}
  vae_dir = os.path.abspath(config.autoencoder.workdir)
  checkpointer = Checkpointer(wd.checkpoint_dir(vae_dir), keep=1, every=1, async_save=False)
  step = checkpointer.latest_step()
  checkpointer.close()
  return json.loads(json.dumps({"world": world, "vae_workdir": vae_dir, "vae_step": step}))


def encode_dataset(config, out_dir: str, batch_size: int = 16):
  """Encodes the train and test splits of `config`'s world with its VAE into `out_dir`
  (see `write_latent_dataset`); returns the TFDS builder."""
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  from sora_jax.data.world import load_world_source  # pylint: disable=g-import-not-at-top
  from sora_jax.models.autoencoder import make_autoencoder  # pylint: disable=g-import-not-at-top
  if config.autoencoder.name != "vae":
    raise ValueError(f"autoencoder.name={config.autoencoder.name!r}: encode-dataset needs a "
                     "VAE (autoencoder.name='vae', autoencoder.workdir=<train-vae workdir>).")
  world = configs.world_config(config)
  if world.sizes or world.image_ratio:
    raise ValueError("world.sizes/image_ratio: latent datasets of mixed sizes are not supported "
                     "yet; encode a fixed-size world.")
  data_dir = config.world.data_dir or None
  splits = {split: load_world_source(world, split, data_dir) for split in ("train", "test")}
  return write_latent_dataset(out_dir, splits, make_autoencoder(config.autoencoder),
                              latents_description(config), batch_size)
