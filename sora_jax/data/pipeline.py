"""The Grain input pipeline: shard per process, shuffle, decode, normalise, tokenise, batch.

Batches are dicts of numpy arrays, local to this process:
  video      float32 `[b, T, H, W, 3]` in [-1, 1]
  text_ids   int32   `[b, L]`
  text_mask  bool    `[b, L]`
  camera    float32 `[b, T, 21]` with camera control: each clip's intrinsics and extrinsics
  skipped_records, caption_empty, caption_truncated   int32 `[b]` data accounting
                     (`sora_jax.data.sources.DataStats`; popped before the train step)
where b = global batch size / process count. Global batch i holds the same records
whatever the number of processes (process p gets its rows [p b, (p + 1) b) and reads
only those records), so a run on one host and on several sees the same data. The
iterator's state (`get_state`) is saved with every checkpoint, so a resumed run sees
exactly the batches it would have.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
from absl import flags
import jax
import numpy as np
from jax.sharding import Mesh

from sora_jax.data.camera import pack_camera
from sora_jax.data.resize import fit_clip
from sora_jax.models.tokenizer import Tokenizer
from sora_jax.parallel.sharding import Rules, batch_sharding

# Per-example counts that batches carry for the training loop's data report.
DATA_STATS = ("skipped_records", "caption_empty", "caption_truncated")


def normalise_video(video: np.ndarray) -> np.ndarray:
  """uint8 `[..., 3]` in [0, 255] -> float32 in [-1, 1]."""
  return video.astype(np.float32) / 127.5 - 1.0


def pad_with_last(batch: np.ndarray, size: int) -> np.ndarray:
  """`batch [n, ...]` (n <= size) padded to `[size, ...]` by repeating its last example, so
  that one compiled program serves every chunk of a loop, the last short one too
  (callers drop the padded outputs); unchanged when full."""
  pad = size - len(batch)
  return np.concatenate([batch, np.repeat(batch[-1:], pad, 0)]) if pad else batch


def to_uint8(video: np.ndarray) -> np.ndarray:
  """float in [-1, 1] -> uint8 in [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def as_text(value: Any) -> str:
  """A TFDS text feature (bytes) or any value as a str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class DecodeAndTokenize(grain.transforms.Map):
  """One record -> `{video, text_ids, text_mask}` and the data counts (see module
  docstring); no text when `tokenizer` is None (autoencoder training); `latent
  [T', H', W', Z]` instead of `video` for records of a latent dataset, with the text
  encoder's cached `text_states [L, D]` when it holds them.

  `size = (frames, height, width)`, when given, fits every clip to it (`fit_clip`: the
  first frames, scaled to cover and centre-cropped), for datasets of other sizes.
  Captions longer than `text_length - 1` pieces are truncated and counted, empty ones
  (unconditional examples) counted.
  """

  def __init__(self, tokenizer: Tokenizer | None, text_length: int,
               size: tuple[int, int, int] | None = None, camera: bool = False):
    self.tokenizer, self.text_length, self.size = tokenizer, text_length, size
    self.camera = camera      # add the record's camera, packed `[T, 21]` (camera control)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    if "latent" in element:     # a latent dataset (sora_jax.data.latents)
      out = {"latent": np.asarray(element["latent"], np.float32)}
    else:
      video = np.asarray(element["video"])
      out = {"video": normalise_video(fit_clip(video, self.size) if self.size else video)}
    if self.camera:
      if "intrinsics" not in element:
        raise ValueError("camera control: a record without a camera (train on a camera "
                         "world: world.camera).")
      out["camera"] = pack_camera(np.asarray(element["intrinsics"]),
                                  np.asarray(element["extrinsics"]))
    out["skipped_records"] = np.int32(element.get("skipped_records", 0))
    if self.tokenizer is None:
      return out
    caption = as_text(element["caption"])
    ids, mask, pieces = self.tokenizer.encode_counted([caption], self.text_length)
    out.update(text_ids=ids[0], text_mask=mask[0], caption_empty=np.int32(not caption.strip()),
               caption_truncated=np.int32(pieces[0] >= self.text_length))
    if "text" in element:       # cached text-encoder states (data.cache_text)
      out.update(text_states=np.asarray(element["text"], np.float32),
                 text_mask=np.asarray(element["text_mask"], bool))
    return out


class LoadRows(grain.transforms.Map):
  """Global batch of record indices `[G]` -> this process's rows `[start, start + rows)`,
  loaded and decoded."""

  def __init__(self, source: Sequence[dict[str, Any]], decode: DecodeAndTokenize,
               start: int, rows: int):
    self.source, self.decode = source, decode
    self.start, self.rows = start, rows

  def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    examples = [self.decode.map(self.source[int(i)])
                for i in indices[self.start:self.start + self.rows]]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def to_iter_dataset(ds: grain.MapDataset, num_threads: int, prefetch: int,
                    num_workers: int = 0) -> grain.IterDataset:
  """Reads `ds` with `num_threads` threads, in `num_workers` processes when > 0 (decoding
  off the training process; the iterator state still checkpoints exactly)."""
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=prefetch))
  if num_workers > 0:
    # Grain's worker processes read absl flags; a program that did not parse them (the
    # argparse CLI, a notebook, a test) gets their defaults instead of an error.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def make_train_dataset(source: Sequence[dict[str, Any]], *, tokenizer: Tokenizer | None,
                       text_length: int, global_batch_size: int, seed: int,
                       process_index: int | None = None, process_count: int | None = None,
                       num_threads: int = 2, prefetch: int = 4, num_workers: int = 0,
                       size: tuple[int, int, int] | None = None,
                       camera: bool = False,
                       rows: tuple[int, int] | None = None) -> grain.IterDataset:
  """An endless, shuffled dataset of this process's rows of each global batch.

  Records are reshuffled every epoch with `seed` and cut into global batches of
  `global_batch_size`; P processes each take `global_batch_size / P` rows of every
  global batch, or the rows `(start, count)` given as `rows` (the ones its devices hold,
  `parallel.sharding.process_batch_rows`: hosts that split one sample load it alike).
  The same arguments give the same batches. `size` fits clips to
  `(frames, height, width)`; `num_workers` decodes in that many processes; `camera` adds
  each clip's packed camera (`DecodeAndTokenize`).
  """
  if rows is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
      raise ValueError(f"data.batch_size={global_batch_size} does not divide by "
                       f"{process_count} processes.")
    rows = (process_index * (global_batch_size // process_count),
            global_batch_size // process_count)
  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
  ds = ds.batch(global_batch_size, drop_remainder=True)
  ds = ds.map(LoadRows(source, DecodeAndTokenize(tokenizer, text_length, size, camera), *rows))
  return to_iter_dataset(ds, num_threads, prefetch, num_workers)


def to_global_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """Assembles the process-local batches of all processes into global sharded arrays."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
          for k, v in batch.items()}
