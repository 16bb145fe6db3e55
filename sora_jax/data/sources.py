"""Where training records come from, chosen by the config, and the checks every record passes.

  data.latents_dir     cached VAE latents (`sora-jax encode-dataset`)
  data.media_dir       a folder of videos and images prepared by `sora-jax prepare-data`
  data.tfds.name       a TFDS video dataset the user has downloaded (ucf101, moving_mnist,
                       bair_robot_pushing_small, ...), mapped by `data.tfds` to records
  otherwise            the procedural world

Every source is random access (`len`, `[i]`) with records holding `video` uint8
`[T, H, W, 3]` (or `latent`) and `caption`, and `captions()` for the tokenizer.
`CheckedSource` wraps it for training: a record that cannot be read or is malformed
(no frames, not 3 channels, an absurd size) is replaced by the next good one and the
skip is counted in the record (`skipped_records`), so batches keep their shape, the
stream stays deterministic, and the training loop reports (and bounds) the share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from sora_jax.data.captions import caption_text
from sora_jax.data.folder import load_media_source
from sora_jax.data.pipeline import DATA_STATS
from sora_jax.data.world import WorldConfig, load_world_source

MAX_CONSECUTIVE_BAD = 64   # bad records in a row that mean the dataset itself is broken


def _field(default: Any, doc: str) -> Any:
  return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class TfdsVideoSpec:
  """Which features of a TFDS video dataset are the video and the caption (`data.tfds`).

  `video_key` names the video feature (`[T, H, W, C]`, C = 1 or 3; "a/b" for nested
  features). The caption is `caption_key`'s text when given; else `caption_template`
  formatted with `{label}`, the class name of `label_key` (underscores as spaces), or
  the template itself when there is no label ("" for unconditional training).
  """
  name: str = _field("", "a downloaded TFDS video dataset to train on ('': none)")
  split: str = _field("train", "its training split")
  test_split: str = _field("", "its held-out split ('': none)")
  data_dir: str = _field("", "its TFDS data directory ('': the default)")
  video_key: str = _field("video", "the video feature ('a/b' for nested features)")
  caption_key: str = _field("", "the caption's text feature ('': use caption_template)")
  label_key: str = _field("", "the class label feature formatted into caption_template")
  caption_template: str = _field("{label}", "the caption when there is no caption_key")

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "TfdsVideoSpec":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
      raise ValueError(f"data.tfds: unknown keys {sorted(unknown)}; known {sorted(fields)}.")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """The `data` keys of this module (see module docstring): no media folder, no TFDS
  dataset (the world), decoding in the training process, bad records up to 5% of those
  read."""
  media_dir: str = _field("", "a folder prepared by `sora-jax prepare-data` ('': none)")
  tfds: TfdsVideoSpec = _field(TfdsVideoSpec(), "a TFDS video dataset (data.tfds.name)")
  num_workers: int = _field(0, "Grain decoding processes (0: threads of this process)")
  max_side: int = _field(4096, "frames with a larger side are bad records")
  max_skipped_fraction: float = _field(0.05, "share of bad records read that stops the run")
  cache_text: bool = _field(False, "encode-dataset stores the frozen text encoder's states")


def config_defaults() -> dict[str, Any]:
  """The `data` keys of this module (`SourceConfig`), for a config's `data` section."""
  return dataclasses.asdict(SourceConfig())


class DataError(RuntimeError):
  """The data cannot feed training (too many bad records, or a broken dataset)."""


def record_problem(record: dict[str, Any], max_side: int) -> str | None:
  """Why a record cannot be trained on, or None when it can."""
  if "latent" in record:
    latent = np.asarray(record["latent"])
    return None if latent.ndim == 4 and latent.size and np.isfinite(latent).all() else (
        f"malformed latent of shape {latent.shape}")
  if "video" not in record:
    return "no video field"
  video = np.asarray(record["video"])
  if video.ndim != 4:
    return f"video of shape {video.shape} is not [T, H, W, C]"
  if video.shape[0] == 0:
    return "zero frames"
  if video.shape[-1] != 3:
    return f"{video.shape[-1]} channels (expected 3)"
  if min(video.shape[1:3]) < 1 or max(video.shape[1:3]) > max_side:
    return f"absurd frame size {video.shape[1]}x{video.shape[2]} (data.max_side={max_side})"
  if video.dtype != np.uint8:
    return f"video of dtype {video.dtype} (expected uint8)"
  return None


class CheckedSource:
  """`source` with bad records replaced by the next good one (see module docstring).

  Item i is record i when good; else record i + k (cyclically) for the smallest good k,
  with `skipped_records = k` added to it. Picklable when `source` is.
  """

  def __init__(self, source: Sequence[dict[str, Any]], max_side: int = 4096):
    self.source, self.max_side = source, max_side

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    n, reasons = len(self.source), []
    for k in range(min(n, MAX_CONSECUTIVE_BAD)):
      j = (int(index) + k) % n
      try:
        record = dict(self.source[j])
        problem = record_problem(record, self.max_side)
      except Exception as e:  # pylint: disable=broad-except  # decoders raise many types
        problem = f"unreadable ({type(e).__name__}: {e})"
      if problem is None:
        record["skipped_records"] = np.int32(k)
        return record
      logging.log_every_n(logging.WARNING, "Skipping record %d: %s.", 100, j, problem)
      reasons.append(f"{j}: {problem}")
    raise DataError(f"{len(reasons)} consecutive records from {index} are bad "
                    f"({'; '.join(reasons[:3])}...): the dataset looks broken.")

  def captions(self) -> list[str]:
    return source_captions(self.source)


def source_captions(source: Sequence[dict[str, Any]]) -> list[str]:
  """Every caption of a source (for training the tokenizer): from its `captions()` when it
  has one (no video decoded), else read record by record (unreadable records left out)."""
  if hasattr(source, "captions"):
    captions = source.captions()
  else:
    captions = []
    for i in range(len(source)):
      try:
        captions.append(source[i]["caption"])
      except Exception:  # pylint: disable=broad-except  # counted when training reads it
        continue
  return [caption_text(c) for c in captions]


# TFDS video datasets -----------------------------------------------------------------


def _lookup(record: dict[str, Any], key: str) -> Any:
  value = record
  for part in key.split("/"):
    if part not in value:
      raise KeyError(f"data.tfds: the dataset has no feature {key!r} (it has "
                     f"{sorted(value)}).")
    value = value[part]
  return value


class TfdsVideoRecord:
  """A TFDS record -> `{video uint8 [T, H, W, 3], caption}` by a `TfdsVideoSpec`."""

  def __init__(self, spec: TfdsVideoSpec, label_names: Sequence[str] = ()):
    self.spec, self.label_names = spec, tuple(label_names)

  def caption(self, record: dict[str, Any]) -> str:
    s = self.spec
    if s.caption_key:
      text = _lookup(record, s.caption_key)
      return text.decode("utf-8") if isinstance(text, bytes) else str(text)
    if s.label_key:
      label = int(_lookup(record, s.label_key))
      name = self.label_names[label] if label < len(self.label_names) else str(label)
      return s.caption_template.format(label=name.replace("_", " "))
    return s.caption_template.replace("{label}", "").strip()

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    video = np.asarray(_lookup(record, self.spec.video_key))
    if video.ndim == 4 and video.shape[-1] == 1:
      video = np.repeat(video, 3, axis=-1)     # greyscale datasets (moving_mnist)
    return {"video": video, "caption": self.caption(record)}

  def captions(self) -> list[str] | None:
    """All captions when they come from class names alone (no record needed)."""
    s = self.spec
    if s.caption_key:
      return None
    if s.label_key:
      return [s.caption_template.format(label=n.replace("_", " ")) for n in self.label_names]
    return [self.caption({})]


class MappedSource:
  """Random access to `fn(source[i])`; `captions()` from `captions` or by reading."""

  def __init__(self, source: Sequence[Any], fn: Callable[[Any], dict[str, Any]],
               captions: Sequence[str] | None = None):
    self.source, self.fn, self._captions = source, fn, captions

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.fn(self.source[index])

  def captions(self) -> list[str]:
    if self._captions is not None:
      return list(self._captions)
    return [self[i]["caption"] for i in range(len(self))]


def load_tfds_video_source(spec: TfdsVideoSpec, split: str | None = None) -> MappedSource:
  """A split of a downloaded TFDS video dataset as records `{video, caption}`.

  The dataset must be prepared in ArrayRecord format (`tfds.data_source` reads it;
  `tfds build <name> --file_format=array_record`).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split = split or spec.split
  try:
    builder = tfds.builder(spec.name, data_dir=spec.data_dir or None)
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises several types
    raise ValueError(f"data.tfds.name={spec.name!r}: no such TFDS dataset ({e}).") from None
  names: Sequence[str] = ()
  if spec.label_key:
    feature = builder.info.features
    for part in spec.label_key.split("/"):
      feature = feature[part]
    names = getattr(feature, "names", ())
  data = tfds.data_source(spec.name, split=split, data_dir=spec.data_dir or None)
  mapping = TfdsVideoRecord(spec, names)
  return MappedSource(data, mapping, mapping.captions())


# The config's choice ---------------------------------------------------------------


def pixel_source(config: ml_collections.ConfigDict, split: str = "train"):
  """The records of `split` of the pixel source `config.data` names (a prepared folder, a
  TFDS dataset or the procedural world; see module docstring), unchecked. The config's
  whole choice, latent datasets included, is `sora_jax.train.sources.training_source`.
  `config` holds every `data` key (`sora_jax.configs.filled`)."""
  d = config.data
  if d.media_dir:
    return load_media_source(d.media_dir, split)
  if d.tfds.name:
    spec = TfdsVideoSpec.from_dict(d.tfds.to_dict())
    chosen = spec.split if split == "train" else spec.test_split
    if not chosen:
      raise ValueError(f"data.tfds.test_split: none given, so there is no {split!r} split.")
    return load_tfds_video_source(spec, chosen)
  return load_world_source(WorldConfig.from_dict(config.world.to_dict()), split,
                           config.world.data_dir or None)


# Accounting ------------------------------------------------------------------------


class DataStats:
  """Counts what the training loop's batches carry (`pipeline.DATA_STATS`) and stops a run
  whose share of skipped records passes `max_skipped_fraction`.

  Counts are per process; `check` sums them over processes (every process calls it at
  the same steps, so all of them stop together).
  """

  def __init__(self, max_skipped_fraction: float):
    self.max_skipped_fraction = max_skipped_fraction
    self.counts = {"examples": 0, "skipped_records": 0, "caption_empty": 0,
                   "caption_truncated": 0}

  def pop(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes the counts from a local batch (returned without them) and adds them up."""
    rows = None
    for key in DATA_STATS:
      if key in batch:
        values = batch.pop(key)
        self.counts[key] += int(np.sum(values))
        rows = len(values)
    if rows is not None:
      self.counts["examples"] += rows
    return batch

  def totals(self) -> dict[str, int]:
    """The counts summed over processes (a collective: call it on every process)."""
    values = np.array(list(self.counts.values()), np.int64)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      values = np.asarray(multihost_utils.process_allgather(values)).sum(0)
    return dict(zip(self.counts, (int(v) for v in values)))

  def check(self) -> dict[str, float]:
    """Metrics of the counts so far; raises DataError when too many records were skipped."""
    t = self.totals()
    seen = t["examples"] + t["skipped_records"]
    fraction = t["skipped_records"] / seen if seen else 0.0
    metrics = {"data/skipped_records": float(t["skipped_records"]),
               "data/skipped_fraction": fraction,
               "data/captions_empty": float(t["caption_empty"]),
               "data/captions_truncated": float(t["caption_truncated"])}
    if fraction > self.max_skipped_fraction:
      raise DataError(f"{t['skipped_records']} of {seen} records read were bad and skipped "
                      f"({fraction:.1%} > data.max_skipped_fraction="
                      f"{self.max_skipped_fraction:.1%}); the logs name them. Fix or re-prepare "
                      "the dataset, or raise the threshold.")
    return metrics

  def summary(self) -> str:
    t = self.counts
    return (f"{t['examples']} examples; {t['skipped_records']} bad records skipped; "
            f"{t['caption_empty']} empty captions (unconditional); "
            f"{t['caption_truncated']} captions truncated")
