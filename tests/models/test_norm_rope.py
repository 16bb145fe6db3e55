"""`models.norm_rope.rms_norm_rope` (queries and keys normalised and rotated, with a
hand-written backward) against a float64 numpy reference, values and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models.embeddings import apply_rope
from sora_jax.models.norm_rope import rms_norm_rope, rms_normalised

HEADS, HEAD_DIM, EPS = 3, 8, 1e-6


def reference(x, scale, angles, per_head):
  """float64 numpy: `[B, N, H*D]` -> `[B, N, H, D]`."""
  b, n, _ = x.shape
  y = x.reshape(b, n, HEADS, HEAD_DIM) if per_head else x
  y = y / np.sqrt((y ** 2).mean(-1, keepdims=True) + EPS) * scale
  pairs = y.reshape(b, n, HEADS, HEAD_DIM // 2, 2)
  cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
  out = np.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                  pairs[..., 0] * sin + pairs[..., 1] * cos], -1)
  return out.reshape(b, n, HEADS, HEAD_DIM)


def numeric_gradient(f, value, step=1e-6):
  grad = np.zeros_like(value)
  for index in np.ndindex(value.shape):
    up, down = value.copy(), value.copy()
    up[index] += step
    down[index] -= step
    grad[index] = (f(up) - f(down)) / (2 * step)
  return grad


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("angle_batch", [2, 1])
def test_values_and_gradients_match_float64(per_head, angle_batch):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, HEADS * HEAD_DIM))
  scale = 1 + 0.1 * rng.normal(size=HEAD_DIM if per_head else HEADS * HEAD_DIM)
  angles = rng.uniform(0, 6, size=(angle_batch, 5, HEAD_DIM // 2))
  cotangent = rng.normal(size=(2, 5, HEADS, HEAD_DIM))
  as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

  out, vjp = jax.vjp(lambda *a: rms_norm_rope(*a, HEADS, per_head, EPS),
                     as32(x), as32(scale), as32(angles))
  chex.assert_shape(out, (2, 5, HEADS, HEAD_DIM))
  np.testing.assert_allclose(out, reference(x, scale, angles, per_head), rtol=1e-5, atol=1e-5)
  loss = lambda **kw: float(np.sum(reference(**{"x": x, "scale": scale, "angles": angles,  # noqa: E731
                                                 **kw}, per_head=per_head) * cotangent))
  expected = (numeric_gradient(lambda v: loss(x=v), x),
              numeric_gradient(lambda v: loss(scale=v), scale),
              numeric_gradient(lambda v: loss(angles=v), angles))
  for got, want in zip(vjp(as32(cotangent)), expected):
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_in_bfloat16_out_and_equal_to_autodiff():
  """In bfloat16 the forward is the unfused one's exactly and the gradient within its
  rounding of the autodiff's."""
  key = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key[0], (2, 16, HEADS * HEAD_DIM), jnp.bfloat16)
  scale = 1 + 0.1 * jax.random.normal(key[1], (HEADS * HEAD_DIM,))
  angles = jax.random.uniform(key[2], (2, 16, HEAD_DIM // 2)) * 6
  fused = lambda x, s: rms_norm_rope(x, s, angles, HEADS, False, EPS)  # noqa: E731
  plain = lambda x, s: apply_rope(rms_normalised(x, s, HEADS, False, EPS), angles)  # noqa: E731
  np.testing.assert_array_equal(fused(x, scale), plain(x, scale))
  loss = lambda f: lambda x, s: jnp.sum(f(x, s).astype(jnp.float32) ** 2)  # noqa: E731
  got = jax.grad(loss(fused), argnums=(0, 1))(x, scale)
  want = jax.grad(loss(plain), argnums=(0, 1))(x, scale)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == scale.dtype
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=2e-2, atol=2e-2)
