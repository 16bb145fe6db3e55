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
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from sora_jax.data.pipeline import as_text, normalise_video, pad_with_last
from sora_jax.data.resize import fit_clip
from sora_jax.data.tfds_builders import made_here


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
    latents = np.asarray(jax.device_get(encode(pad_with_last(videos, batch_size))), np.float32)
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
      return made_here(self.dataset_info_from_configs(features=f.FeaturesDict(features)))

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
