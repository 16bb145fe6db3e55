"""The deterministic colour analysis, validated on ground-truth videos of the world."""

import numpy as np

from sora_jax import configs
from sora_jax.data import world as world_lib
from sora_jax.evaluation.colour import colour_score, dominant_colour, single_object_prompts


def test_dominant_colour_of_ground_truth_one_object_videos(config):
  config.world.update(min_objects=1, max_objects=1)
  world = configs.world_config(config)
  examples = [world_lib.render_example(world, seed) for seed in range(40)]
  videos = np.stack([e["video"] for e in examples])
  expected = [world.colours[e["colour"][0]] for e in examples]
  score, found = colour_score(videos, expected, world)
  assert score == 1.0, list(zip(found, expected))
  # A wrong expectation is caught.
  shifted = expected[1:] + expected[:1]
  assert colour_score(videos, shifted, world)[0] < 0.5


def test_background_only_and_noisy_videos(config):
  world = configs.world_config(config)
  palette = {n: world_lib.PALETTE[n] for n in world.colours}
  blank = np.full((2, 8, 8, 3), world.background, np.uint8)
  assert dominant_colour(blank, palette, world.background) is None
  noisy = blank.copy()
  noisy[:, :3, :3] = (200, 60, 50)   # near red, not exactly
  assert dominant_colour(noisy, palette, world.background) == "red"


def test_single_object_prompts_are_balanced_and_deterministic(config):
  world = configs.world_config(config)
  prompts = single_object_prompts(world, 40, seed=3)
  assert prompts == single_object_prompts(world, 40, seed=3)
  counts = {c: sum(p.colour == c for p in prompts) for c in world.colours}
  assert set(counts.values()) == {10}
  for p in prompts:
    assert p.text.startswith(f"a {p.colour} {p.shape} moves {p.direction}")
