"""The deterministic trackers agree with the world's ground truth."""

import numpy as np
import pytest

from sora_jax.data import camera
from sora_jax.data.world import PALETTE, WorldConfig, render_example
from sora_jax.evaluation import tracking


def test_trackers_follow_ground_truth_of_single_objects():
  world = WorldConfig(frames=8, height=32, width=32, min_objects=1, max_objects=1)
  errors, directions = [], []
  for seed in range(40):
    ex = render_example(world, seed)
    labels = tracking.world_labels(ex["video"], world)
    track = tracking.centroids(labels, int(ex["colour"][0]))
    errors.append(np.abs(track - ex["positions"][0]).max())
    counts = tracking.object_counts(labels, len(world.colours))
    assert counts.sum(-1).tolist() == [1] * 8
    assert tracking.constant_share(counts) == 1.0
    # Over the first 4 frames, as the prompting experiment reads directions.
    directions.append(tracking.direction_of(track, 4) == tracking.direction_of(ex["positions"][0], 4))
  # Centroids of rasterised shapes (triangles are not centred on their centre).
  assert np.median(errors) < 1.5
  assert np.mean(directions) > 0.95


def test_counts_catch_a_vanishing_object():
  world = WorldConfig(frames=6, height=32, width=32, min_objects=2, max_objects=2)
  ex = render_example(world, 3)
  video = ex["video"].copy()
  labels = tracking.world_labels(video, world)
  counts = tracking.object_counts(labels, len(world.colours))
  video[2:4] = np.asarray(world.background, np.uint8)       # everything gone for two frames
  broken = tracking.object_counts(tracking.world_labels(video, world), len(world.colours))
  assert tracking.constant_share(broken, counts[0]) <= 4 / 6
  assert tracking.direction_of(np.full((4, 2), np.nan)) is None


def test_soft_edges_keep_their_objects_colour():
  """A blend of an object's colour with the background (a decoder's or generator's soft
  edge) is labelled with the object's colour at every blend far enough from the
  background; the nearest palette colour read half-yellow as green."""
  world = WorldConfig()
  palette = np.asarray([PALETTE[c] for c in world.colours], np.float64)
  background = np.asarray(world.background, np.float64)
  blends = np.linspace(0.05, 1.0, 96)
  pixels = background + blends[:, None, None] * (palette - background)   # [96, K, 3]
  video = np.round(pixels).astype(np.uint8)[None]                        # [1, 96, K, 3]
  labels = tracking.world_labels(video, world)[0]
  far = np.linalg.norm(video[0].astype(np.float64) - background, axis=-1) > 60
  expected = np.broadcast_to(np.arange(len(world.colours)), far.shape)
  np.testing.assert_array_equal(labels[far], expected[far])
  assert far.sum() > 0.5 * far.size and (labels[~far] == tracking.BACKGROUND).all()
  half_yellow = np.round(background + 0.5 * (palette[world.colours.index("yellow")]
                                             - background))
  nearest = np.argmin(np.linalg.norm(palette - half_yellow, axis=-1))
  assert world.colours[nearest] != "yellow"               # what the old rule said
  # Other pixels: the nearest blend line (float64 reference).
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
  offset = video.astype(np.float64) - background
  lines = palette - background
  blend = np.clip(offset @ lines.T / (lines ** 2).sum(-1), 0, 1)
  residual = np.linalg.norm(offset[..., None, :] - blend[..., None] * lines, axis=-1)
  want = np.where(np.linalg.norm(offset, axis=-1) > 60, residual.argmin(-1), -1)
  np.testing.assert_array_equal(tracking.world_labels(video, world), want)


def test_on_the_camera_worlds_texture_objects_are_read_by_their_colour_not_brightness():
  """The camera world's grey texture, of any brightness, is background; an object's colour
  and its soft edge over bright or dark texture keep the object's label (float64 chroma
  reference), and a colour too near grey is refused for a camera world."""
  world = WorldConfig(camera=(("pan_left", 1.0),), texture_contrast=3.0)
  ys, xs = np.mgrid[0:32, 0:32] + 0.5
  plane = camera.Texture(7, 32, 32, contrast=3.0)(ys, xs)                  # [32, 32, 3]
  assert int(plane.max()) - int(plane.min()) > 120                       # far from faint
  assert (tracking.world_labels(plane[None], world) == tracking.BACKGROUND).all()
  palette = np.asarray([PALETTE[c] for c in world.colours], np.float64)
  blends = np.linspace(0.05, 1.0, 32)
  greys = plane[:, :len(palette)].astype(np.float64)                     # [32, K, 3]
  video = np.round(greys + blends[:, None, None] * (palette - greys)).astype(np.uint8)
  labels = tracking.world_labels(video[None], world)[0]
  pixels = video.astype(np.float64)
  colour_offset = pixels - pixels.mean(-1, keepdims=True)
  far = np.linalg.norm(colour_offset, axis=-1) > 60
  expected = np.broadcast_to(np.arange(len(palette)), far.shape)
  np.testing.assert_array_equal(labels[far], expected[far])
  assert (labels[~far] == tracking.BACKGROUND).all() and far.sum() > 0.4 * far.size
  # A flat world still reads its one background colour (a bright grey is an object there).
  assert tracking.background_of(WorldConfig()) == WorldConfig().background
  with pytest.raises(ValueError, match="too close to grey"):
    WorldConfig(camera=(("static", 1.0),), colours=("red", "white")).validate()
  with pytest.raises(ValueError, match="texture_contrast"):
    WorldConfig(camera=(("static", 1.0),), texture_contrast=4.0).validate()
