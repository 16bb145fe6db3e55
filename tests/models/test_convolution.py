"""`sora_jax.models.convolution`: the 3D convolution as 2D convolutions over frames (XLA:CPU)."""

import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import convolution
from sora_jax.parallel.sharding import activation_sharding

LAYOUT = ("NDHWC", "DHWIO", "NDHWC")


def lax_conv(x, kernel, strides, padding, groups=1):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=LAYOUT,
                                      feature_group_count=groups,
                                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("kernel,strides,padding,groups", [
    ((3, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1)), 1),   # the VAE's causal conv (time pre-padded)
    ((1, 3, 3), (1, 2, 2), ((0, 0), (0, 1), (0, 1)), 1),   # Wan's spatial downsampling
    ((3, 1, 1), (2, 1, 1), "VALID", 1),                     # Wan's temporal downsampling
    ((3, 4, 4), (2, 2, 2), ((1, 1), (1, 1), (1, 1)), 1),   # the discriminator's
    ((3, 3, 3), (1, 2, 2), "SAME", 2),                      # the detector's, grouped
])
def test_frame_taps_equal_the_3d_convolution_and_its_gradients(kernel, strides, padding, groups,
                                                               monkeypatch):
  monkeypatch.setattr(convolution, "MIN_ELEMENTS", 0)     # frame taps at this small size
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (2, 7, 10, 12, 4))
  w = jax.random.normal(keys[1], kernel + (4 // groups, 6)) / 6

  def loss(conv, x, w):
    y = conv(x, w)
    return jnp.sum(y * jax.random.normal(keys[2], y.shape)), y

  def ours(x, w):
    return convolution.conv_general_dilated(x, w, strides, padding, dimension_numbers=LAYOUT,
                                            feature_group_count=groups,
                                            precision=jax.lax.Precision.HIGHEST)

  (_, y), grads = jax.value_and_grad(lambda *a: loss(ours, *a), (0, 1), has_aux=True)(x, w)
  (_, want), want_grads = jax.value_and_grad(
      lambda *a: loss(lambda x, w: lax_conv(x, w, strides, padding, groups), *a), (0, 1),
      has_aux=True)(x, w)
  chex.assert_equal_shape([y, want])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  for g, g_want in zip(grads, want_grads):
    np.testing.assert_allclose(g, g_want, rtol=1e-4, atol=1e-4)


def _conv_ranks(fn, *args) -> set[int]:
  """The input ranks of the convolutions in `fn`'s jaxpr."""
  return {e.invars[0].aval.ndim for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns
          if e.primitive.name == "conv_general_dilated"}


@pytest.mark.xdist_group("libtpu")   # one process at a time may hold libtpu
def test_video_conv_uses_frame_taps_only_when_compiling_for_cpu():
  conv = convolution.video_conv(4, 8, (3, 3, 3), rngs=nnx.Rngs(0))
  assert _conv_ranks(conv, jnp.ones((1, 5, 8, 8, 4))) == {5}    # small: one 3D convolution
  x = jnp.ones((1, 5, 128, 128, 4))
  assert x.size >= convolution.MIN_ELEMENTS
  assert _conv_ranks(conv, x) == {4}                    # three 2D convolutions on this host
  reference = nnx.Conv(4, 8, (3, 3, 3), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(conv(x), reference(x), rtol=1e-5, atol=1e-5)
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu (the test extra) gives a TPU topology's devices")
  from sora_jax.plan.topology import topology_devices  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(topology_devices("v5e:2x2")).reshape(4), ("data",))
  with activation_sharding(mesh, ()):
    assert _conv_ranks(lambda x: conv(x), x) == {5}     # the compiler's own 3D convolution
