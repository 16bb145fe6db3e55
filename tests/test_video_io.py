"""`sora_jax.video_io`'s layouts: generated | ground-truth pairs and animated grids."""

import numpy as np
import pytest

from sora_jax import video_io


def test_side_by_side_and_grid_place_every_pixel():
  rng = np.random.default_rng(0)
  left = rng.integers(0, 255, (3, 2, 4, 5, 3), dtype=np.uint8)
  right = rng.integers(0, 255, (3, 2, 4, 5, 3), dtype=np.uint8)
  pairs = video_io.side_by_side(left, right, gap=2)
  assert pairs.shape == (3, 2, 4, 12, 3)
  np.testing.assert_array_equal(pairs[..., :5, :], left)
  np.testing.assert_array_equal(pairs[..., 7:, :], right)
  assert (pairs[..., 5:7, :] == 255).all()
  with pytest.raises(ValueError, match="differ"):
    video_io.side_by_side(left, right[:2])

  grid = video_io.video_grid(pairs, columns=2, gap=1)      # 2 rows; the last cell empty
  assert grid.shape == (2, 2 * 4 + 1, 2 * 12 + 1, 3)
  np.testing.assert_array_equal(grid[:, :4, :12], pairs[0])
  np.testing.assert_array_equal(grid[:, :4, 13:], pairs[1])
  np.testing.assert_array_equal(grid[:, 5:, :12], pairs[2])
  assert (grid[:, 5:, 13:] == 255).all() and (grid[:, 4] == 255).all()
