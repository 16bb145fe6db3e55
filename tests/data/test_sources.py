"""Data sources: TFDS video datasets through a field mapping, and bad records skipped and counted."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sora_jax.data import sources
from sora_jax.data.pipeline import make_train_dataset
from sora_jax.train import loop as train_loop
from sora_jax.train import sources as train_sources

# The real feature specs of these datasets (tfds.testing.mock_data draws random
# records from them, so nothing is downloaded).
DATASETS = {
    "ucf101": dict(name="ucf101", split="train", video_key="video", label_key="label",
                   caption_template="a video of {label}"),
    "moving_mnist": dict(name="moving_mnist", split="test", video_key="image_sequence",
                         caption_template="digits move"),
    "bair_robot_pushing_small": dict(name="bair_robot_pushing_small", split="train",
                                     video_key="image_main", caption_template=""),
}


# TFDS's catalog builders, made without their data (mock_data), each leave an empty
# temporary directory (the look-up of their info on TFDS's bucket): under the test's.
pytestmark = pytest.mark.usefixtures("system_tmp")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_tfds_video_datasets_map_to_records(name):
  spec = sources.TfdsVideoSpec.from_dict(DATASETS[name])
  with tfds.testing.mock_data(num_examples=3):
    source = sources.load_tfds_video_source(spec)
    record = source[0]
  video = record["video"]
  assert video.ndim == 4 and video.shape[-1] == 3 and video.dtype == np.uint8
  assert sources.record_problem(record, 4096) is None
  if name == "ucf101":
    names = tfds.builder("ucf101").info.features["label"].names
    assert record["caption"].startswith("a video of ")
    assert record["caption"][len("a video of "):] in [n.replace("_", " ") for n in names]
    assert len(source.captions()) == 101         # class names, no video decoded
  elif name == "moving_mnist":                   # greyscale [20, 64, 64, 1] -> 3 channels
    assert video.shape == (20, 64, 64, 3) and record["caption"] == "digits move"
  else:
    assert video.shape == (30, 64, 64, 3) and record["caption"] == ""


def test_unknown_fields_are_named():
  with pytest.raises(ValueError, match="unknown keys"):
    sources.TfdsVideoSpec.from_dict({"name": "ucf101", "video": "video"})
  spec = sources.TfdsVideoSpec(name="ucf101", video_key="frames")
  with tfds.testing.mock_data(num_examples=1):
    with pytest.raises(KeyError, match="no feature 'frames'"):
      sources.load_tfds_video_source(spec)[0]


def test_training_on_a_tfds_video_dataset(config, tmp_path):
  """ucf101's real features (256x256 videos, 101 labels) through the training loop."""
  config.data.tfds.update(DATASETS["ucf101"])
  config.train.update(steps=2, checkpoint_every=2, log_every=1)
  with tfds.testing.mock_data(num_examples=8):
    summary = train_loop.train(config, str(tmp_path / "run"), progress=False)
  assert summary["step"] == 2 and np.isfinite(summary["loss"])
  assert "0 bad records skipped" in summary["data"]


class Broken:
  """A source whose records 1 and 2 are bad (no frames; unreadable) among good ones."""

  def __init__(self, n=8):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i == 1:
      return {"video": np.zeros((0, 16, 16, 3), np.uint8), "caption": "x"}
    if i == 2:
      raise OSError("image file is truncated")
    if i == 3:
      return {"video": np.zeros((4, 16, 16, 1), np.uint8), "caption": "x"}
    if i == 4:
      return {"video": np.zeros((4, 16, 9000, 3), np.uint8), "caption": "x"}
    return {"video": np.full((4, 16, 16, 3), i, np.uint8), "caption": "x" * (i % 2)}


def test_bad_records_are_replaced_and_counted(tokenizer):
  checked = sources.CheckedSource(Broken(), max_side=4096)
  assert int(checked[0]["skipped_records"]) == 0
  for bad in (1, 2, 3, 4):       # each bad record gives the next good one (5), counted
    record = checked[bad]
    assert record["video"][0, 0, 0, 0] == 5 and int(record["skipped_records"]) == 5 - bad
  dataset = make_train_dataset(checked, tokenizer=tokenizer, text_length=16, global_batch_size=8,
                               seed=0, process_index=0, process_count=1)
  batch = next(iter(dataset))
  assert batch["video"].shape == (8, 4, 16, 16, 3)
  assert int(batch["skipped_records"].sum()) == 4 + 3 + 2 + 1
  assert int(batch["caption_empty"].sum()) == 2    # records 0 and 6 (1-4 became record 5)
  stats = sources.DataStats(max_skipped_fraction=0.6)
  stats.pop(batch)
  assert not set(batch) & {"skipped_records", "caption_empty", "caption_truncated"}
  metrics = stats.check()
  assert metrics["data/skipped_records"] == 10
  assert metrics["data/skipped_fraction"] == pytest.approx(10 / 18)
  stats.max_skipped_fraction = 0.5
  with pytest.raises(sources.DataError, match="10 of 18 records read were bad"):
    stats.check()


def test_a_broken_dataset_is_a_clear_error():
  class AllBad:
    def __len__(self):
      return 100

    def __getitem__(self, i):
      return {"video": np.zeros((0, 1, 1, 3), np.uint8)}

  with pytest.raises(sources.DataError, match="consecutive records"):
    sources.CheckedSource(AllBad())[0]


def test_training_stops_when_too_many_records_are_bad(config, tmp_path, monkeypatch,
                                                      train_source):
  class SomeBad:
    def __len__(self):
      return len(train_source)

    def __getitem__(self, i):
      record = dict(train_source[i])
      if i % 4 == 0:
        record["video"] = record["video"][:0]     # zero frames
      return record

    def captions(self):
      return sources.source_captions(train_source)

  monkeypatch.setattr(train_sources, "training_source", lambda *a, **k: SomeBad())
  config.data.max_skipped_fraction = 0.1
  config.train.update(steps=4, log_every=2)
  with pytest.raises(sources.DataError, match="data.max_skipped_fraction=10.0%"):
    train_loop.train(config, str(tmp_path / "run"), progress=False)
