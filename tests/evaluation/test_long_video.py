"""Long-video ShapesBench: the world's own long clips keep their identity; a clip whose object
changes colour halfway loses it from that second on, and its drift says so."""

import dataclasses

import numpy as np
import pytest

from sora_jax.data.world import PALETTE, WorldConfig, render_example
from sora_jax.evaluation import long_video
from sora_jax.evaluation.bench import prompt_objects

WORLD = WorldConfig(frames=8, height=32, width=32, max_objects=1, num_train=1, num_test=1)


@pytest.fixture(scope="module")
def long_clip():
  world = dataclasses.replace(WORLD, frames=12 * 8)
  example = render_example(world, 3)
  return np.asarray(example["video"]), prompt_objects(example, WORLD)


def test_a_long_world_clip_keeps_its_identity_every_second(long_clip):
  video, prompt = long_clip
  rows = long_video.per_second(video, prompt, WORLD, fps=8)
  assert len(rows) == 12
  assert long_video.identity_held(rows) == 1.0
  summary = long_video.summary(rows)
  assert summary["drift"]["count"] == 0.0 and summary["drift"]["colour"] == 0.0
  assert summary["mean"]["physics"] < 1.0      # pixels per frame: the tracker's floor


def test_an_object_changing_colour_loses_identity_and_drifts(long_clip):
  video, prompt = long_clip
  changed = video.copy()
  colour = np.asarray(PALETTE[prompt[0].colour])
  other = next(np.asarray(PALETTE[c]) for c in WORLD.colours if c != prompt[0].colour)
  late = changed[6 * 8:]
  late[np.all(late == colour, axis=-1)] = other           # from second 7 on
  rows = long_video.per_second(changed, prompt, WORLD, fps=8)
  held = [r["colour"] for r in rows]
  assert held[:6] == [1.0] * 6 and held[6:] == [0.0] * 6
  assert long_video.identity_held(rows) == 0.5
  assert long_video.drift(long_video.curves(rows)["colour"], True) == pytest.approx(1.0)


def test_drift_signs_worse_as_positive():
  assert long_video.drift(np.asarray([1.0] * 10 + [0.8]), higher_is_better=True) == \
      pytest.approx(0.2)
  assert long_video.drift(np.asarray([2.0] * 10 + [3.0]), higher_is_better=False) == \
      pytest.approx(0.5)
  assert long_video.drift(np.asarray([np.nan] * 11), higher_is_better=True) is None
  with pytest.raises(ValueError, match="no whole second"):
    long_video.per_second(np.zeros((5, 8, 8, 3), np.uint8), [], WORLD, fps=8)
