"""The training dataset a config asks for: fixed size, packed native sizes, or buckets."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from sora_jax import configs
from sora_jax.data.bucketing import make_bucketed_dataset
from sora_jax.data.packing import make_packed_dataset, padding_fraction
from sora_jax.data.pipeline import make_train_dataset
from sora_jax.data.sources import CheckedSource
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.tokenizer import Tokenizer

PaddingFn = Callable[[dict[str, np.ndarray]], float]


def make_dataset(config: ml_collections.ConfigDict, source: Sequence[dict[str, Any]],
                 tokenizer: Tokenizer) -> tuple[grain.IterDataset, PaddingFn | None]:
  """The training dataset of `config.data.grouping`, and how much of a batch is padding.

  Records pass `CheckedSource` (bad ones replaced by good ones and counted); with
  `grouping="none"` clips are fitted to the config's `world` size (a no-op for
  records of that size).

  Returns:
    `(dataset, padding)`: `padding(local_batch)` is the share of the batch's token budget
    that is padding (packing: padding tokens; bucketing: unused budget), or None for
    fixed-size batches, which have none.
  """
  d = config.data
  patch = configs.decode_variant(config.model.variant)["patch"]
  source = CheckedSource(source, max_side=int(d.get("max_side", 4096)))
  common = dict(tokenizer=tokenizer, text_length=d.text_length, seed=d.shuffle_seed,
                num_threads=d.num_threads, prefetch=d.prefetch,
                num_workers=int(d.get("num_workers", 0)))
  if d.grouping == "pack":
    dataset = make_packed_dataset(
        source, patch=patch, tokens_per_row=d.tokens_per_row,
        text_tokens_per_row=d.text_tokens_per_row, max_examples_per_row=d.max_examples_per_row,
        global_batch_size=d.batch_size, packing_bins=d.packing_bins or None, **common)
    return dataset, padding_fraction
  if d.grouping == "bucket":
    spec = configs.bucket_spec(config, jax.process_count())
    if jax.process_index() == 0:
      for (bucket, waste), size in zip(spec.padding(patch).items(), spec.batch_sizes):
        logging.warning("bucket %s: batch %d, %.1f%% of the token budget unused.", bucket, size,
                        100 * waste)

    def unused_budget(batch: dict[str, np.ndarray]) -> float:
      video = batch["video"]
      tokens = num_tokens(video.shape[1:4], patch) * len(video) * jax.process_count()
      return 1 - tokens / spec.tokens_per_batch

    return make_bucketed_dataset(source, spec=spec, **common), unused_budget
  size = (config.world.frames, config.world.height, config.world.width)
  return make_train_dataset(source, global_batch_size=d.batch_size, size=size, **common), None
