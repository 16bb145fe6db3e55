"""`experiments.blur_ceiling`: edge softness of world clips, zero for the world's hard
edges and growing with a Gaussian blur, and its inverse; the shape readings a blur leaves
unchanged."""

import numpy as np
import pytest
from scipy import ndimage

from experiments import blur_ceiling
from sora_jax.data.world import PALETTE, WorldConfig, render_example
from sora_jax.evaluation import bench


def test_edge_softness_is_zero_on_hard_edges_and_grows_with_blur():
  world = WorldConfig(frames=4, height=32, width=32, max_objects=2)
  example = render_example(world, 3)
  video, prompt = example["video"][None], bench.prompt_objects(example, world)
  sigmas = [0.0, 0.5, 1.0, 1.5, 2.0]
  curve = [blur_ceiling.edge_softness(blur_ceiling.blurred(video, s)[0], prompt, world)
           for s in sigmas]
  assert curve[0] == 0.0                          # the world draws without antialiasing
  assert all(a < b for a, b in zip(curve, curve[1:])), curve
  np.testing.assert_array_equal(blur_ceiling.blurred(video, 0.0), video)


def test_edge_softness_counts_transition_pixels_per_object_pixel():
  world = WorldConfig(background=(0, 0, 0))
  video = np.zeros((1, 4, 4, 3), np.uint8)
  red = np.asarray(PALETTE["red"])
  video[0, 0, :2] = red                           # two pixels of the palette's red ...
  video[0, 1, 0] = red // 2                       # ... one at half of it (even values)
  assert not np.any(red % 2)
  red = [bench.PromptObject(colour="red", shape="circle", direction="left")]
  assert blur_ceiling.edge_softness(video, red, world) == pytest.approx(1 / 3)


def test_equivalent_sigma_inverts_the_curve():
  sigmas, curve = [0.0, 1.0, 2.0], [0.0, 0.8, 2.0]
  assert blur_ceiling.equivalent_sigma(0.8, sigmas, curve) == pytest.approx(1.0)
  assert blur_ceiling.equivalent_sigma(1.4, sigmas, curve) == pytest.approx(1.5)
  assert blur_ceiling.equivalent_sigma(2.5, sigmas, curve) is None


def _disc(radius: float, size: int = 41) -> np.ndarray:
  ys, xs = np.mgrid[:size, :size] + 0.5 - size / 2
  return (xs ** 2 + ys ** 2 <= radius ** 2).astype(np.float64)


def test_shape_moments_tell_squares_circles_and_triangles_through_a_blur():
  square = np.zeros((41, 41))
  square[12:29, 10:31] = 1.0              # a 17x21 rectangle: x and y independent
  squareness, skew = blur_ceiling.shape_moments(square)
  assert squareness == pytest.approx(2.0, abs=1e-9) and skew == pytest.approx(0.0, abs=1e-9)
  assert blur_ceiling.shape_moments(_disc(12.0))[0] == pytest.approx(1.0, abs=0.03)
  lower = np.tril(np.ones((41, 41)))                     # right angle at the bottom left
  triangle = np.pad(np.minimum(lower, lower[:, ::-1]), 10)  # isosceles, pointing up
  pointed = blur_ceiling.shape_moments(triangle)[1]
  assert pointed < -0.5                   # its mass sits low: a long tail upwards
  # Blurring the share (a Gaussian's cumulants beyond the second are zero; the mass is
  # kept) leaves both readings as they were, up to the kernel's sampling.
  for shape in (square, _disc(8.0), triangle):
    sharp = blur_ceiling.shape_moments(shape)
    soft = blur_ceiling.shape_moments(ndimage.gaussian_filter(shape, 1.5, mode="constant"))
    np.testing.assert_allclose(soft, sharp, rtol=0.02, atol=0.02)


def test_squares_squarer_is_a_one_sided_rank_test():
  """Squares all squarer than circles: the exact one-sided p of 3 against 3 (1 / C(6, 3));
  drawn alike: not significant; without squares: None."""
  apart = {"square": {"object_squareness": [1.8, 1.9, 2.0]},
           "circle": {"object_squareness": [1.0, 1.1, 1.2]}}
  assert blur_ceiling.squares_squarer(apart) == pytest.approx(1 / 20)
  alike = {"square": {"object_squareness": [1.0, 1.3, 1.2]},
           "circle": {"object_squareness": [1.1, 1.25, 1.35]}}
  assert blur_ceiling.squares_squarer(alike) > 0.3
  assert blur_ceiling.squares_squarer({"circle": apart["circle"]}) is None
