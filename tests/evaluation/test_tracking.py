"""The deterministic trackers agree with the world's ground truth."""

import numpy as np

from sora_jax.data.world import WorldConfig, render_example
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
