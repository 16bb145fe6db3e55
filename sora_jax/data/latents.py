"""A latent dataset: clips encoded once by a VAE, written as a TFDS ArrayRecord dataset,
so diffusion training reads latents instead of encoding pixels every step, and, with a
frozen pretrained text encoder, its outputs instead of running it.

`sora-jax encode-dataset --config CONFIG --out DIR` writes it for a config whose
`autoencoder` is a VAE (`vae`, or Wan's `wan`), from the config's data source (the
world, `data.media_dir` or `data.tfds`, clips fitted to the `world` size); training
reads it when `data.latents_dir` is set. Each record:
  latent     float32 `[T', H', W', Z]` normalised posterior mean (what
             `VAEAutoencoder.encode` gives the transformer)
  caption    the source clip's caption
  index      the source record's index in its split (to trace a latent to its clip)
  text       float32 `[L, D]` text-encoder states of the caption, and `text_mask` bool
             `[L]` (only with `data.cache_text`: the encoder of `train.init_from`, which
             `optim.frozen` must keep fixed; L = `data.text_length`)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from sora_jax.data.pipeline import as_text, normalise_video
from sora_jax.data.resize import fit_clip


TextFn = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def encode_source(autoencoder, source: Sequence[dict[str, Any]], batch_size: int, *,
                  size: Sequence[int] | None = None, text_fn: TextFn | None = None
                  ) -> Iterator[dict[str, Any]]:
  """Yields a record (`index`, `latent [T', H', W', Z]`, `caption`, and `text [L, D]`,
  `text_mask [L]` with `text_fn`) for every record of `source`, encoding `batch_size`
  clips at a time with one compiled function.

  size: `(frames, height, width)` clips are fitted to (`fit_clip`), when given.
  text_fn: captions -> (states `[n, L, D]`, mask `[n, L]`), called on a batch at a time.
  """
  encode = jax.jit(autoencoder.encode)
  for start in range(0, len(source), batch_size):
    indices = list(range(start, min(start + batch_size, len(source))))
    records = [source[i] for i in indices]
    videos = np.stack([normalise_video(fit_clip(np.asarray(r["video"]), size) if size
                                       else r["video"]) for r in records])
    pad = batch_size - len(videos)
    if pad:
      videos = np.concatenate([videos, np.repeat(videos[-1:], pad, 0)])
    latents = np.asarray(jax.device_get(encode(videos)), np.float32)
    captions = [as_text(r["caption"]) for r in records]
    texts = text_fn(captions + [""] * pad) if text_fn is not None else None
    for k, (i, latent, caption) in enumerate(zip(indices, latents, captions)):
      out = {"index": i, "latent": latent, "caption": caption}
      if texts is not None:
        out["text"], out["text_mask"] = texts[0][k], texts[1][k]
      yield out


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
                 autoencoder=None, batch_size: int = 16, size=None, text_fn=None,
                 with_text: bool = False, **kwargs):
      self.splits, self.autoencoder, self.batch_size = splits or {}, autoencoder, batch_size
      self.size, self.text_fn, self.with_text = size, text_fn, with_text
      config = tfds.core.BuilderConfig(name=fingerprint, description=description)
      super().__init__(config=config, **kwargs)

    def _info(self):
      f = tfds.features
      # Shapes are stored per record (as for the world's videos), so a reader needs no
      # knowledge of the autoencoder to describe the features.
      features = {
          "latent": f.Tensor(shape=(None, None, None, None), dtype=np.float32, encoding="zlib"),
          "caption": f.Text(),
          "index": f.Scalar(dtype=np.int64),
      }
      if self.with_text:
        features["text"] = f.Tensor(shape=(None, None), dtype=np.float32, encoding="zlib")
        features["text_mask"] = f.Tensor(shape=(None,), dtype=np.bool_)
      return self.dataset_info_from_configs(features=f.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {name: self._generate_examples(source) for name, source in self.splits.items()}

    def _generate_examples(self, source):
      for record in encode_source(self.autoencoder, source, self.batch_size, size=self.size,
                                  text_fn=self.text_fn):
        yield record["index"], record

  return EncodedLatents


def latents_fingerprint(description: dict[str, Any]) -> str:
  blob = json.dumps(description, sort_keys=True).encode()
  return "latents_" + hashlib.sha256(blob).hexdigest()[:12]


def write_latent_dataset(out_dir: str, splits: dict[str, Sequence[dict[str, Any]]],
                         autoencoder, description: dict[str, Any], batch_size: int = 16, *,
                         size: Sequence[int] | None = None, text_fn: TextFn | None = None):
  """Encodes every split of `splits` and writes them under `out_dir` (once: an existing
  dataset with the same `description` is reused). Returns the TFDS builder."""
  builder = _builder_class()(
      fingerprint=latents_fingerprint(description), description=json.dumps(description),
      splits=splits, autoencoder=autoencoder, batch_size=batch_size, size=size,
      text_fn=text_fn, with_text=text_fn is not None, data_dir=out_dir,
      file_format="array_record")
  builder.download_and_prepare()
  return builder


def load_latent_source(out_dir: str, description: dict[str, Any], split: str):
  """A random-access source over one split of the latent dataset `write_latent_dataset`
  wrote for `description`; FileNotFoundError naming the command when it is missing."""
  builder = _builder_class()(fingerprint=latents_fingerprint(description),
                             description=json.dumps(description), data_dir=out_dir,
                             file_format="array_record", with_text="text" in description)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"data.latents_dir={out_dir!r} holds no latents of this world and autoencoder; "
        "write them with `sora-jax encode-dataset --config <this config> --out <dir>`.")
  return builder.as_data_source(split=split)


def latents_description(config) -> dict[str, Any]:
  """What a latent dataset depends on: the data source (the world, a prepared folder or a
  TFDS dataset), the clip size, the autoencoder (a VAE run and its step, or a Wan VAE
  directory) and, with `data.cache_text`, the text encoder's run and text length."""
  from sora_jax.train import workdir as wd  # pylint: disable=g-import-not-at-top
  from sora_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  d = config.data
  world = {k: v for k, v in config.world.to_dict().items() if k != "data_dir"}
  description: dict[str, Any] = {"world": world}
  if d.get("media_dir"):
    with open(os.path.join(d.media_dir, "dataset.json"), encoding="utf-8") as f:
      description["media"] = {"dir": os.path.abspath(d.media_dir),
                              "dataset": json.load(f)["dataset_dir"]}
  elif d.get("tfds") is not None and d.tfds.get("name"):
    description["tfds"] = d.tfds.to_dict()
  if config.autoencoder.name == "wan":
    description["wan_vae"] = os.path.abspath(config.autoencoder.path)
  else:
    vae_dir = os.path.abspath(config.autoencoder.workdir)
    checkpointer = Checkpointer(wd.checkpoint_dir(vae_dir), keep=1, every=1, async_save=False)
    description.update(vae_workdir=vae_dir, vae_step=checkpointer.latest_step())
    checkpointer.close()
  if d.get("cache_text"):
    description["text"] = {"init_from": os.path.abspath(config.train.init_from),
                           "text_length": int(d.text_length)}
  return json.loads(json.dumps(description))


def frozen_text_states(config) -> TextFn:
  """`captions -> (states [n, L, D], mask [n, L])` of the text encoder of
  `train.init_from` (tokenised by its tokenizer to `data.text_length`), for
  `data.cache_text`; ValueError unless `optim.frozen` keeps that encoder fixed."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.train.restore import restore_params  # pylint: disable=g-import-not-at-top
  init_from = config.train.get("init_from", "")
  if not init_from or "text_encoder" not in tuple(config.optim.get("frozen", ())):
    raise ValueError("data.cache_text: cached text states need a pretrained text encoder kept "
                     "fixed: set train.init_from and optim.frozen=('text_encoder',).")
  _, tokenizer, graphdef, params, _ = restore_params(init_from)
  model = nnx.merge(graphdef, params)
  encode = jax.jit(lambda ids, mask: model.text_encoder(ids, mask))
  length = int(config.data.text_length)

  def text_fn(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = tokenizer.encode(captions, length)
    return np.asarray(jax.device_get(encode(ids, mask)), np.float32), mask
  return text_fn


def encode_dataset(config, out_dir: str, batch_size: int = 16):
  """Encodes the train and test splits of `config`'s data source with its VAE (and, with
  `data.cache_text`, the captions with its frozen text encoder) into `out_dir` (see
  `write_latent_dataset`); returns the TFDS builder. A source without a test split
  (a prepared folder with `media.test_fraction` 0) gives the train split only."""
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  from sora_jax.data.sources import training_source  # pylint: disable=g-import-not-at-top
  from sora_jax.models.autoencoder import make_autoencoder  # pylint: disable=g-import-not-at-top
  if config.autoencoder.name not in ("vae", "wan"):
    raise ValueError(f"autoencoder.name={config.autoencoder.name!r}: encode-dataset needs a "
                     "VAE (autoencoder.name='vae' with autoencoder.workdir=<train-vae "
                     "workdir>, or 'wan' with autoencoder.path=<AutoencoderKLWan dir>).")
  world = configs.world_config(config)
  if world.sizes or world.image_ratio:
    raise ValueError("world.sizes/image_ratio: latent datasets of mixed sizes are not supported "
                     "yet; encode a fixed-size world.")
  text_fn = frozen_text_states(config) if config.data.get("cache_text") else None
  pixels = ml_collections.ConfigDict(config.to_dict())
  pixels.data.latents_dir = ""                     # read the pixels the latents come from
  splits = {}
  for split in ("train", "test"):
    try:
      splits[split] = training_source(pixels, split)
    except ValueError:
      if split == "train":
        raise
  return write_latent_dataset(out_dir, splits, make_autoencoder(config.autoencoder),
                              latents_description(config), batch_size,
                              size=(world.frames, world.height, world.width), text_fn=text_fn)
