"""Every attention backend agrees with the XLA reference (forward and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models.attention import (cudnn_attention, dot_product_attention, resolve_backend,
                                       segment_mask, splash_attention)


def _inputs(n=200):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 2, 16)), jnp.float32) for _ in range(3))
  seg = np.zeros((2, n), np.int32)
  seg[0, :50], seg[0, 50:110] = 1, 2
  seg[1, :n // 2] = 3
  return q, k, v, jnp.asarray(seg)


def test_reference_matches_jax_attention_with_mask_and_bias():
  """The query-blocked reference (what `cudnn_attention` runs off GPUs) against
  `jax.nn.dot_product_attention`'s own XLA form."""
  q, k, v, seg = _inputs()
  bias = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 200, 200)), jnp.float32)
  mask = segment_mask(seg)
  np.testing.assert_allclose(cudnn_attention(q, k, v, mask=mask, bias=bias),
                             jax.nn.dot_product_attention(q, k, v, mask=mask, bias=bias,
                                                          implementation="xla"), atol=1e-5)


def test_cudnn_path_asks_for_the_kernel_on_gpu_with_whole_query_key_masks(monkeypatch):
  """For a GPU program in bfloat16, cuDNN's kernel is asked for by name (jax's default is
  XLA's whole-matrix form) with masks and biases spread over whole query and key axes (the
  kernel's bias layout); where the kernel is missing, the XLA reference answers."""
  import sora_jax.models.attention as attention  # pylint: disable=import-outside-toplevel
  q, k, v = (t.astype(jnp.bfloat16) for t in _inputs()[:3])
  key_mask = jnp.arange(200)[None, None, None, :] < jnp.asarray([150, 200])[:, None, None, None]
  bias = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 1, 200)), jnp.bfloat16)
  expected = dot_product_attention(q, k, v, mask=key_mask, bias=bias)
  monkeypatch.setattr(attention, "compile_platform", lambda: "gpu")
  calls, xla = [], jax.nn.dot_product_attention

  def kernel(q, k, v, *, bias, mask, scale, implementation):
    calls.append((implementation, bias.shape, mask.shape))
    return xla(q, k, v, bias=bias, mask=mask, scale=scale)

  monkeypatch.setattr(attention.jax.nn, "dot_product_attention", kernel)
  out = cudnn_attention(q, k, v, mask=key_mask, bias=bias)
  assert calls == [("cudnn", (1, 2, 200, 200), (2, 1, 200, 200))]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                             atol=2e-2)
  monkeypatch.undo()
  monkeypatch.setattr(attention, "compile_platform", lambda: "gpu")    # no cuDNN on CPU
  np.testing.assert_allclose(np.asarray(cudnn_attention(q, k, v, mask=key_mask), np.float32),
                             np.asarray(dot_product_attention(q, k, v, mask=key_mask),
                                        np.float32), atol=1e-6)


@pytest.mark.parametrize("segments", [False, True])
def test_splash_attention_matches_reference(segments):
  q, k, v, seg = _inputs()
  seg = seg if segments else None
  mask = None if seg is None else segment_mask(seg)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  # 200 tokens: padded to two blocks of 128 inside, cut back after.
  splash = lambda q, k, v: splash_attention(q, k, v, segment_ids=seg, block=128)  # noqa: E731
  reference = lambda q, k, v: dot_product_attention(q, k, v, mask=mask)         # noqa: E731
  np.testing.assert_allclose(splash(q, k, v), reference(q, k, v), atol=2e-5)
  for got, want in zip(jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=5e-5)


def test_splash_cross_attention_with_a_key_mask_matches_reference():
  """Queries and keys of different lengths (200 and 70: both padded inside), masked keys."""
  q, _, _, _ = _inputs()
  _, k, v, _ = _inputs(70)
  keys = np.ones((2, 70), bool)
  keys[0, 40:], keys[1, 5:9] = False, False
  keys = jnp.asarray(keys)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  splash = lambda q, k, v: splash_attention(q, k, v, key_mask=keys, block=128)   # noqa: E731
  reference = lambda q, k, v: dot_product_attention(q, k, v, mask=keys[:, None, None])  # noqa: E731
  np.testing.assert_allclose(splash(q, k, v), reference(q, k, v), atol=2e-5)
  for got, want in zip(jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=5e-5)


def test_auto_backend_follows_the_platform():
  assert resolve_backend("auto", "tpu") == "splash"
  assert resolve_backend("auto", "gpu") == "dot_product"
  assert resolve_backend("auto", "cpu") == "xla"
  assert resolve_backend("ring", "tpu") == "ring"


def test_the_configured_splash_block_reaches_the_kernel(monkeypatch, devices):
  """`model.splash_block` (the sharding context's `splash_block`) is the block splash
  attention runs in: 128 splits 200 tokens into two blocks where the default 512 makes one
  of 256; the layer's output is the reference's either way."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.configs.schema import DIT_RULES  # pylint: disable=g-import-not-at-top
  from sora_jax.models import layers  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel.sharding import activation_sharding, make_mesh, splash_block  # pylint: disable=g-import-not-at-top
  blocks = []
  real = layers.splash_attention
  monkeypatch.setattr(layers, "splash_attention",
                      lambda *a, **k: blocks.append(k["block"]) or real(*a, **k))
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  with nnx.use_eager_sharding(False):
    attention = layers.Attention(32, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 200, 32))
  with activation_sharding(mesh, DIT_RULES, "xla"):
    want = attention(x)
  assert splash_block() == 512 and not blocks
  for size in (128, 512):
    with activation_sharding(mesh, DIT_RULES, "splash", splash_block=size):
      np.testing.assert_allclose(attention(x), want, atol=2e-5)
  assert blocks == [128, 512]
