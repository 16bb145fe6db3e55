"""The procedural world: ground truth consistent with the pixels and the caption."""

import numpy as np
import pytest

from sora_jax import configs
from sora_jax.data import world as world_lib


def test_records_hold_video_caption_and_ground_truth(train_source, config):
  world = configs.world_config(config)
  assert len(train_source) == world.num_train
  for i in range(10):
    ex = train_source[i]
    k = int(ex["num_objects"])
    assert ex["video"].shape == (world.frames, world.height, world.width, 3)
    assert ex["positions"].shape == (k, world.frames, 2)
    caption = ex["caption"].decode()
    for c, s in zip(ex["colour"], ex["shape"]):
      assert f"{world.colours[c]} {world.shapes[s]}" in caption
    # Object centres stay inside the frame.
    r = ex["size"][:, None, None]
    assert (ex["positions"] >= r - 1e-4).all()
    assert (ex["positions"][..., 0] <= world.width - ex["size"][:, None] + 1e-4).all()


def test_the_topmost_object_is_drawn_at_its_centre(config):
  world = configs.world_config(config)
  ex = world_lib.render_example(world, 5)
  top = int(ex["num_objects"]) - 1
  for f in range(world.frames):
    x, y = ex["positions"][top, f]
    colour = world_lib.PALETTE[world.colours[ex["colour"][top]]]
    np.testing.assert_array_equal(ex["video"][f, int(y), int(x)], colour)


def test_motion_is_constant_velocity_with_elastic_bounces():
  positions = world_lib.simulate(np.array([5.0, 5.0]), np.array([3.0, 0.0]), 2.0, 8, 16, 12)
  xs = positions[:, 0]
  np.testing.assert_allclose(xs[:2], [5.0, 8.0])
  assert xs.max() <= 10.0 and xs.min() >= 2.0
  assert np.all(np.abs(np.diff(xs)) <= 3.0 + 1e-5)
  assert (np.diff(xs) < 0).any()          # bounced off the right wall
  np.testing.assert_allclose(positions[:, 1], 5.0)


def test_splits_are_deterministic_and_distinct(config):
  world = configs.world_config(config)
  a = world_lib.render_example(world, world_lib.SPLIT_SEEDS["test"])
  b = world_lib.render_example(world, world_lib.SPLIT_SEEDS["test"])
  np.testing.assert_array_equal(a["video"], b["video"])
  c = world_lib.render_example(world, world_lib.SPLIT_SEEDS["train"])
  assert not np.array_equal(a["video"], c["video"])


def test_bad_world_values_are_named():
  with pytest.raises(ValueError, match="world.colours"):
    world_lib.WorldConfig.from_dict({"colours": ["mauve"]})
  with pytest.raises(ValueError, match="unknown keys"):
    world_lib.WorldConfig.from_dict({"colour": ["red"]})


def test_held_out_combinations_never_reach_the_train_split(tmp_path):
  from sora_jax.data.world import WorldConfig, held_out, load_world_source, object_attributes  # pylint: disable=g-import-not-at-top
  world = WorldConfig(frames=4, height=16, width=16, num_train=64, num_test=48,
                      holdout=("red circle", "blue square left"))
  counts = {}
  for split in ("train", "test"):
    source = load_world_source(world, split, str(tmp_path))
    counts[split] = sum(held_out(world, a) is not None
                        for i in range(len(source)) for a in object_attributes(source[i], world))
  assert counts["train"] == 0 and counts["test"] > 0
  # A world without held-out combinations draws exactly as before they existed.
  assert WorldConfig().fingerprint() == "9477edf0fe"
  with pytest.raises(ValueError, match="name no colour"):
    WorldConfig(holdout=("purple circle",)).validate()
  with pytest.raises(ValueError, match="at least two"):
    WorldConfig(holdout=("red",)).validate()


def test_a_world_another_process_prepared_first_is_used(tmp_path, monkeypatch):
  """Two runs started together both prepare a new world; the one whose rename loses the
  race reads the dataset the other wrote instead of failing."""
  world = world_lib.WorldConfig(frames=2, height=8, width=8, num_train=2, num_test=2)
  world_lib.prepare_world(world, str(tmp_path))          # the other process, first

  def lost_race(self, *args, **kwargs):
    raise OSError("Cannot rename ...: Destination ... already exists.")

  monkeypatch.setattr(world_lib._builder_class(), "download_and_prepare", lost_race)  # pylint: disable=protected-access
  assert len(world_lib.load_world_source(world, "train", str(tmp_path))) == 2
  with pytest.raises(OSError, match="Cannot rename"):      # nothing there: the error stands
    world_lib.load_world_source(world, "train", str(tmp_path / "empty"))


def test_preparing_a_world_leaves_no_temporary_directory(tmp_path, system_tmp):
  """TFDS's look-up of a new builder's info on its GCS bucket makes a temporary directory
  and leaves it; the project's builders skip the look-up (`data.tfds_builders`), so
  preparing (and re-opening) a world leaves the system's temporary directory as it was."""
  world = world_lib.WorldConfig(frames=2, height=8, width=8, num_train=2, num_test=2)
  assert len(world_lib.load_world_source(world, "test", str(tmp_path / "data"))) == 2
  assert len(world_lib.load_world_source(world, "train", str(tmp_path / "data"))) == 2
  assert not list(system_tmp.iterdir())
