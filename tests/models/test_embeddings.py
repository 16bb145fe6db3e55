import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import embeddings


@pytest.mark.parametrize("patch", [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 2, 8), (3, 1, 2)])
def test_patchify_round_trip(patch):
  video = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 16, 24, 3))
  tokens = embeddings.patchify(video, patch)
  grid = (12 // patch[0], 16 // patch[1], 24 // patch[2])
  chex.assert_shape(tokens, (2, int(np.prod(grid)), int(np.prod(patch)) * 3))
  np.testing.assert_array_equal(embeddings.unpatchify(tokens, grid, patch, 3), video)


def test_patchify_token_order_is_raster_over_grid():
  video = np.arange(4 * 4 * 4).reshape(1, 4, 4, 4, 1).astype(np.float32)
  tokens = np.asarray(embeddings.patchify(video, (2, 2, 2)))
  positions = embeddings.grid_positions((2, 2, 2))
  for n, (t, h, w) in enumerate(positions):
    expected = video[0, 2 * t:2 * t + 2, 2 * h:2 * h + 2, 2 * w:2 * w + 2, 0].ravel()
    np.testing.assert_array_equal(tokens[0, n], expected)


def _rope_reference(x, positions, theta=10000.0):
  """float64 numpy 3D RoPE with Wan 2.1's split of the head dimension."""
  d = x.shape[-1]
  pairs = d // 2
  sizes = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
  angles = np.concatenate([
      positions[..., a:a + 1] / theta ** (np.arange(0, 2 * s, 2) / (2 * s))
      for a, s in enumerate(sizes)], -1)                                  # [B, N, D/2]
  z = x[..., 0::2] + 1j * x[..., 1::2]
  z = z * np.exp(1j * angles)[:, :, None, :]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


@pytest.mark.parametrize("head_dim", [12, 16, 64])
def test_rope_matches_float64_reference(head_dim):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 10, 3, head_dim))
  positions = rng.integers(0, 20, size=(2, 10, 3)).astype(np.float64)
  angles = embeddings.rope_angles(jnp.asarray(positions), head_dim)
  out = embeddings.apply_rope(jnp.asarray(x, jnp.float32), angles)
  np.testing.assert_allclose(out, _rope_reference(x, positions), atol=2e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 24)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 24)), jnp.float32)

  def score(pq, pk):
    rq = embeddings.apply_rope(q, embeddings.rope_angles(jnp.asarray([[pq]]), 24))
    rk = embeddings.apply_rope(k, embeddings.rope_angles(jnp.asarray([[pk]]), 24))
    return float(jnp.sum(rq * rk))

  base = score((1, 2, 3), (4, 0, 5))
  assert score((3, 7, 1), (6, 5, 3)) == pytest.approx(base, abs=1e-4)
  assert score((1, 2, 3), (4, 1, 5)) != pytest.approx(base, abs=1e-3)


def test_timestep_embedding_shape_and_values():
  emb = embeddings.timestep_embedding(jnp.array([0.0, 500.0]), 8)
  chex.assert_shape(emb, (2, 8))
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-6)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(500 * freqs), np.sin(500 * freqs)]),
                             atol=1e-4)
