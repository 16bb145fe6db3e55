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


def _overlap_reference(tokens, grid, patch, channels, margin):
  """float64 overlap-add of the window-weighted extended patches, divided by the summed
  weights, cropped to the video."""
  (gt, gh, gw), (pt, ph, pw) = grid, patch
  kh, kw = ph + 2 * margin, pw + 2 * margin
  b = tokens.shape[0]
  p = np.asarray(tokens, np.float64).reshape(b, gt, gh, gw, pt, kh, kw, channels)
  window = np.outer(embeddings.overlap_window(ph, margin), embeddings.overlap_window(pw, margin))
  total = np.zeros((b, gt * pt, gh * ph + 2 * margin, gw * pw + 2 * margin, channels))
  weight = np.zeros_like(total)
  for t in range(gt):
    for i in range(gh):
      for j in range(gw):
        where = (slice(None), slice(t * pt, t * pt + pt), slice(i * ph, i * ph + kh),
                 slice(j * pw, j * pw + kw))
        total[where] += p[:, t, i, j] * window[None, None, :, :, None]
        weight[where] += window[None, None, :, :, None]
  return (total / weight)[:, :, margin:-margin, margin:-margin]


@pytest.mark.parametrize("patch,margin", [((2, 4, 6), 2), ((1, 8, 8), 2), ((1, 4, 4), 1),
                                          ((1, 2, 2), 1)])
def test_unpatchify_overlapping_matches_float64_overlap_add(patch, margin):
  """Overlapping patches cross-fade into the video (against a float64 loop); patches cut
  from the video itself, margins included, give it back exactly; margin 0 is `unpatchify`;
  two neighbours' windows sum to 1 on the pixels they share."""
  grid, c = (2, 3, 2), 3
  pt, ph, pw = patch
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(2, int(np.prod(grid)), pt * (ph + 2 * margin) * (pw + 2 * margin) * c))
  video = embeddings.unpatchify_overlapping(jnp.asarray(tokens, jnp.float32), grid, patch, c,
                                            margin)
  chex.assert_shape(video, (2, grid[0] * pt, grid[1] * ph, grid[2] * pw, c))
  np.testing.assert_allclose(video, _overlap_reference(tokens, grid, patch, c, margin),
                             rtol=1e-5, atol=1e-5)
  clip = rng.normal(size=(2, grid[0] * pt, grid[1] * ph, grid[2] * pw, c))
  padded = np.pad(clip, ((0, 0), (0, 0), (margin, margin), (margin, margin), (0, 0)))
  cut = np.stack([padded[:, t * pt:t * pt + pt, i * ph:i * ph + ph + 2 * margin,
                         j * pw:j * pw + pw + 2 * margin]
                  for t in range(grid[0]) for i in range(grid[1]) for j in range(grid[2])], 1)
  np.testing.assert_allclose(embeddings.unpatchify_overlapping(
      jnp.asarray(cut.reshape(2, cut.shape[1], -1), jnp.float32), grid, patch, c, margin),
      clip, rtol=1e-5, atol=1e-5)
  plain = jnp.asarray(rng.normal(size=(2, int(np.prod(grid)), int(np.prod(patch)) * c)))
  np.testing.assert_array_equal(embeddings.unpatchify_overlapping(plain, grid, patch, c, 0),
                                embeddings.unpatchify(plain, grid, patch, c))
  window = embeddings.overlap_window(ph, margin)
  np.testing.assert_allclose(window[:2 * margin] + window[ph:], 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="needs patches of at least"):
    embeddings.unpatchify_overlapping(jnp.asarray(tokens), grid, patch, c, ph)


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
