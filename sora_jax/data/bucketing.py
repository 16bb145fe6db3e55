"""Native sizes through bucketing: batches of one (frames, height, width) bucket each.

Every example goes to the bucket nearest its aspect ratio (then its length), is cropped
and resized to that bucket's size, and batches are made within a bucket with a batch
size that gives every bucket about the same number of tokens per batch
(`batch_size(bucket) = floor(tokens_per_batch / tokens(bucket))`, rounded down to a
multiple of the data-parallel shards). Batches of different buckets have different
static shapes: the train step compiles once per bucket.

The batch plan is a pure function of (seed, epoch): record indices are shuffled within
each bucket, cut into batches, and the batches of all buckets shuffled together. Batch i
of the stream is looked up by index, so the iterator's state is one integer and a
resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import grain
import jax
import numpy as np

from sora_jax.data.pipeline import DecodeAndTokenize, to_iter_dataset
from sora_jax.data.resize import fit_clip
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.tokenizer import Tokenizer

Size = tuple[int, int, int]


def nearest_bucket(size: Sequence[int], buckets: Sequence[Size]) -> int:
  """Index of the bucket for a `(frames, height, width)` clip.

  Nearest aspect ratio (in log space) first; among those, the longest bucket not longer
  than the clip (else the shortest), then the largest area.
  """
  frames, height, width = size
  ratio = math.log(height / width)
  dist = [abs(math.log(h / w) - ratio) for _, h, w in buckets]
  best = min(dist)
  same_ratio = [i for i, d in enumerate(dist) if d - best < 1e-6]
  fitting = [i for i in same_ratio if buckets[i][0] <= frames]
  if fitting:
    return max(fitting, key=lambda i: (buckets[i][0], buckets[i][1] * buckets[i][2]))
  return min(same_ratio, key=lambda i: (buckets[i][0], -buckets[i][1] * buckets[i][2]))


@dataclasses.dataclass(frozen=True)
class BucketSpec:
  """Buckets and their batch sizes (global, across processes)."""
  buckets: tuple[Size, ...]
  batch_sizes: tuple[int, ...]
  tokens_per_batch: int

  @classmethod
  def make(cls, buckets: Sequence[Size], patch: Sequence[int], tokens_per_batch: int,
           multiple_of: int = 1) -> "BucketSpec":
    """Batch sizes for equal token counts, rounded down to a multiple of `multiple_of`."""
    buckets = tuple(tuple(int(v) for v in b) for b in buckets)
    sizes = []
    for bucket in buckets:
      tokens = num_tokens(bucket, patch)
      size = (tokens_per_batch // tokens) // multiple_of * multiple_of
      if size < 1:
        raise ValueError(f"data.tokens_per_batch={tokens_per_batch} is too small for bucket "
                         f"{bucket} ({tokens} tokens) with batches a multiple of {multiple_of}.")
      sizes.append(size)
    return cls(buckets, tuple(sizes), tokens_per_batch)

  def padding(self, patch: Sequence[int]) -> dict[Size, float]:
    """Per bucket, the share of the token budget its batches leave unused."""
    return {b: 1 - s * num_tokens(b, patch) / self.tokens_per_batch
            for b, s in zip(self.buckets, self.batch_sizes)}


def clip_size(record: dict[str, Any]) -> tuple[int, int, int]:
  """A record's `(frames, height, width)`: its size fields when it has them (prepared
  media), else its video's shape."""
  if {"num_frames", "height", "width"} <= set(record):
    return int(record["num_frames"]), int(record["height"]), int(record["width"])
  return tuple(np.asarray(record["video"]).shape[:3])


class BucketBatchPlan:
  """Random-access source of batches: item i -> (bucket index, record indices)."""

  def __init__(self, record_buckets: Sequence[int], batch_sizes: Sequence[int], seed: int,
               epochs: int = 10_000):
    self.record_buckets = np.asarray(record_buckets)
    self.batch_sizes = tuple(batch_sizes)
    self.seed, self.epochs = seed, epochs
    self.per_epoch = sum(int((self.record_buckets == b).sum()) // s
                         for b, s in enumerate(self.batch_sizes))
    if self.per_epoch == 0:
      raise ValueError("bucketing: no bucket holds enough examples for one batch.")

  @functools.lru_cache(maxsize=4)
  def _epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng([self.seed, epoch])
    batches = []
    for bucket, size in enumerate(self.batch_sizes):
      members = rng.permutation(np.flatnonzero(self.record_buckets == bucket))
      for start in range(0, len(members) - size + 1, size):
        batches.append((bucket, members[start:start + size]))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]

  def __len__(self) -> int:
    return self.per_epoch * self.epochs

  def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
    epoch, position = divmod(int(index), self.per_epoch)
    return self._epoch(epoch)[position]


class LoadBucketBatch(grain.transforms.Map):
  """(bucket, record indices) -> a batch `{video [b, T, H, W, 3], text_ids, text_mask}`."""

  def __init__(self, source, buckets: Sequence[Size], tokenizer: Tokenizer, text_length: int):
    self.source, self.buckets = source, buckets
    self.decode = DecodeAndTokenize(tokenizer, text_length)

  def map(self, item: tuple[int, np.ndarray]) -> dict[str, np.ndarray]:
    bucket, indices = item
    examples = []
    for i in indices:
      record = dict(self.source[int(i)])
      record["video"] = fit_clip(record["video"], self.buckets[bucket])
      examples.append(self.decode.map(record))
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def make_bucketed_dataset(source: Sequence[dict[str, Any]], *, tokenizer: Tokenizer,
                          text_length: int, spec: BucketSpec, seed: int,
                          process_index: int | None = None, process_count: int | None = None,
                          num_threads: int = 2, prefetch: int = 4,
                          num_workers: int = 0) -> grain.IterDataset:
  """An endless dataset of per-bucket batches over this process's shard of `source`."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  for bucket, size in zip(spec.buckets, spec.batch_sizes):
    if size % process_count:
      raise ValueError(f"bucket {bucket}: batch size {size} does not divide by "
                       f"{process_count} processes.")
  shard = grain.MapDataset.source(source)[process_index::process_count]
  record_buckets = [nearest_bucket(clip_size(shard[i]), spec.buckets) for i in range(len(shard))]
  plan = BucketBatchPlan(record_buckets, [s // process_count for s in spec.batch_sizes], seed)
  ds = grain.MapDataset.source(plan).map(LoadBucketBatch(shard, spec.buckets, tokenizer,
                                                         text_length))
  return to_iter_dataset(ds, num_threads, prefetch, num_workers)
