"""Native sizes through packing (NaViT's Patch n' Pack) with Grain.

Each example keeps its own (frames, height, width). It is cut into spacetime patches
with their (t, h, w) positions, its caption is tokenised without padding, and Grain's
first-fit packer fills fixed-length rows with several examples, so every batch has one
static shape. A packed batch (per process, `b` rows) holds:
  patches            float32 `[b, N, pt*ph*pw*C]` in [-1, 1]
  positions          int32   `[b, N, 3]`  (t, h, w) of each patch in its own example
  segment_ids        int32   `[b, N]`     k + 1 for the k-th example of a row, 0 padding
  text_ids           int32   `[b, S]`     the examples' captions, packed likewise
  text_segment_ids   int32   `[b, S]`
  text_positions     int32   `[b, S]`     position of each text token in its caption
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import jax
import numpy as np

from sora_jax.data.pipeline import as_text, normalise_video, to_iter_dataset
from sora_jax.models import embeddings
from sora_jax.models.tokenizer import Tokenizer


class ToPatches(grain.transforms.Map):
  """One record -> `{patches [n, P], positions [n, 3], text_ids [l]}` (no padding)."""

  def __init__(self, tokenizer: Tokenizer, text_length: int, patch: Sequence[int]):
    self.tokenizer, self.text_length, self.patch = tokenizer, text_length, tuple(patch)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    video = element["video"]
    for axis, size, p in zip(("frames", "height", "width"), video.shape[:3], self.patch):
      if size % p:
        raise ValueError(f"a clip of {video.shape[:3]} does not divide into patches "
                         f"{self.patch} ({axis}).")
    grid = [s // p for s, p in zip(video.shape[:3], self.patch)]
    patches = embeddings.patchify(normalise_video(video)[None], self.patch)[0]
    ids, mask = self.tokenizer.encode([as_text(element["caption"])], self.text_length)
    return {"patches": np.asarray(patches, np.float32),
            "positions": embeddings.grid_positions(grid),
            "text_ids": ids[0][mask[0]]}


class RenamePacked(grain.transforms.Map):
  """Grain's packed feature names -> the names of the module docstring."""

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"patches": row["patches"], "positions": row["positions"],
            "segment_ids": row["patches_segment_ids"], "text_ids": row["text_ids"],
            "text_segment_ids": row["text_ids_segment_ids"],
            "text_positions": row["text_ids_positions"]}


def make_packed_dataset(source: Sequence[dict[str, Any]], *, tokenizer: Tokenizer,
                        text_length: int, patch: Sequence[int], tokens_per_row: int,
                        text_tokens_per_row: int, max_examples_per_row: int,
                        global_batch_size: int, seed: int, packing_bins: int | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        num_threads: int = 2, prefetch: int = 4,
                        num_workers: int = 0) -> grain.IterDataset:
  """An endless dataset of packed batches over this process's shard of `source`.

  Args:
    global_batch_size: packed rows per global batch.
    tokens_per_row, text_tokens_per_row: N and S of the module docstring.
    max_examples_per_row: K, the most examples one row may hold.
    packing_bins: rows the first-fit packer fills at once (more bins, less padding);
      the per-process batch size by default.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"data.batch_size={global_batch_size} does not divide by "
                     f"{process_count} processes.")
  rows = global_batch_size // process_count
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(None).map(ToPatches(tokenizer, text_length, patch))
  ds = to_iter_dataset(ds, num_threads, prefetch, num_workers)
  ds = grain.experimental.BestFitPackIterDataset(
      ds, length_struct={"patches": tokens_per_row, "positions": tokens_per_row,
                         "text_ids": text_tokens_per_row},
      num_packing_bins=packing_bins or rows, seed=seed, shuffle_bins=True,
      max_sequences_per_bin=max_examples_per_row)
  return ds.map(RenamePacked()).batch(rows, drop_remainder=True)


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
  """Share of a packed batch's spacetime tokens that are padding."""
  return float(np.mean(batch["segment_ids"] == 0))
