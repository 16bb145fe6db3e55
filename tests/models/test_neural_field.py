"""The per-patch neural-field output head (`sora_jax.models.neural_field`); the sample
command with it and with the other non-linear-patch head, `model.head_overlap`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_params, run_cli, write_export
from sora_jax.models.dit import DiffusionTransformer, DiTConfig
from sora_jax.models.neural_field import NeuralFieldHead, dct_encoding


def test_dct_encoding_is_the_dct_ii_basis_in_patchify_order():
  patch = (2, 4, 6)
  encoding = dct_encoding(patch, max_frequencies=(2, 3, 4))
  chex.assert_shape(encoding, (2 * 4 * 6, 2 * 3 * 4))
  np.testing.assert_allclose(encoding[:, 0], 1.0)
  # Columns of a DCT-II basis are orthogonal: the Gram matrix is diagonal.
  gram = encoding.T.astype(np.float64) @ encoding
  np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
  # Pixel (t, y, x) sits at row (t * 4 + y) * 6 + x (patchify's (pt ph pw) order); column
  # (a, b, c) is cos(pi a (2t+1)/4) cos(pi b (2y+1)/8) cos(pi c (2x+1)/12).
  t, y, x, a, b, c = 1, 2, 5, 1, 2, 3
  expected = (np.cos(np.pi * a * (2 * t + 1) / 4) * np.cos(np.pi * b * (2 * y + 1) / 8)
              * np.cos(np.pi * c * (2 * x + 1) / 12))
  np.testing.assert_allclose(encoding[(t * 4 + y) * 6 + x, (a * 3 + b) * 4 + c], expected,
                             rtol=1e-6, atol=1e-6)


def _head(seed=0, **kw):
  args = dict(width=8, patch=(1, 2, 2), in_channels=4, out_channels=3, hidden=5)
  args.update(kw)
  with nnx.use_eager_sharding(False):
    head = NeuralFieldHead(**args, rngs=nnx.Rngs(seed))
  nnx.update(head, random_params(nnx.state(head, nnx.Param), seed + 1))
  return head


def test_head_matches_float64_reference():
  head = _head()
  rng = np.random.default_rng(0)
  h = rng.normal(size=(2, 3, 8))
  values = rng.normal(size=(2, 3, 4 * 4))                   # 4 pixels x 4 input channels
  out = np.asarray(head(jnp.asarray(h, jnp.float32), jnp.asarray(values, jnp.float32)))
  chex.assert_shape(out, (2, 3, 4 * 3))

  def dense(layer, x):
    return x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)

  encoding = dct_encoding((1, 2, 2)).astype(np.float64)       # [4, E]
  expected = np.zeros((2, 3, 4, 3))
  for i in range(2):
    for n in range(3):
      w1 = dense(head.first, h[i, n]).reshape(-1, 5)           # [E + 4, 5]
      w1 = w1 / np.sqrt(np.sum(w1 ** 2, axis=0, keepdims=True) + 1e-6)
      w2 = dense(head.second, h[i, n]).reshape(5, 3)
      u = np.concatenate([encoding, values[i, n].reshape(4, 4)], axis=-1)
      pre = u @ w1
      expected[i, n] = (pre / (1 + np.exp(-pre))) @ w2
  np.testing.assert_allclose(out, expected.reshape(2, 3, 12), rtol=1e-4, atol=1e-5)


def test_head_reads_each_pixels_own_values():
  # Changing one pixel's input changes that pixel's output only (the field is per pixel).
  head = _head()
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=(1, 2, 8)), jnp.float32)
  values = rng.normal(size=(1, 2, 16))
  changed = values.copy()
  changed[0, 1, 4:8] += 1.0                                    # token 1, pixel 1
  a = np.asarray(head(h, jnp.asarray(values, jnp.float32))).reshape(2, 4, 3)
  b = np.asarray(head(h, jnp.asarray(changed, jnp.float32))).reshape(2, 4, 3)
  moved = np.abs(a - b).max(-1) > 1e-6
  np.testing.assert_array_equal(moved, [[False] * 4, [False, True, False, False]])


def test_transformer_with_a_field_head():
  cfg = DiTConfig(width=32, depth=2, heads=2, patch=(1, 2, 2), in_channels=3, text_width=16,
                  cond_channels=4, prediction="data", output_head="field", field_hidden=8)
  with nnx.use_eager_sharding(False):
    model = DiffusionTransformer(cfg, rngs=nnx.Rngs(0))
  assert not hasattr(model, "proj_out")
  # The field's last layer starts at zero, as proj_out does: a fresh model predicts x0 = 0.
  np.testing.assert_array_equal(model.field_out.second.kernel[...], 0.0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 6, 3)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(2, 3, 4, 6, 4)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  mask = jnp.ones((2, 5), bool)
  t = jnp.asarray([0.3, 0.9])
  graphdef = nnx.graphdef(model)

  def loss(p):
    return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, t, text, mask, conditioning=cond)
                               - x))
  grad = jax.jit(jax.grad(loss))
  grads = grad(nnx.state(model, nnx.Param))
  # The first step reaches the field's zero-initialised last layer; then every layer.
  assert float(jnp.abs(grads["field_out"]["second"]["kernel"][...]).max()) > 0
  params = random_params(nnx.state(model, nnx.Param), 2)
  chex.assert_shape(jax.jit(lambda p: nnx.merge(graphdef, p)(
      x, t, text, mask, conditioning=cond))(params), x.shape)
  grads = grad(params)
  for path in (("field_out", "first", "kernel"), ("blocks", 0, "mlp", "fc1", "kernel")):
    leaf = grads
    for key in path:
      leaf = leaf[key]
    assert float(jnp.abs(leaf[...]).max()) > 0, path


@pytest.mark.parametrize("head", [{"model.output_head": "field"}, {"model.head_overlap": 1}],
                         ids=["field", "overlap"])
def test_sample_cli_with_a_field_or_overlapping_head_model(data_dir, tokenizer, tmp_path, head):
  """`sora-jax sample` runs a model trained with `model.output_head=field` or
  `model.head_overlap` (its export) and signs what it writes."""
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  from sora_jax.provenance import manifest  # pylint: disable=g-import-not-at-top
  from sora_jax.train.state import build_model  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, **head, **{"model.prediction": "data"})
  model = build_model(config, tokenizer.vocab_size, nnx.Rngs(0))
  if "model.output_head" in head:
    assert not hasattr(model.dit, "proj_out")
  else:   # the head draws each 4x4 patch grown by a pixel on every side
    assert model.dit.proj_out.kernel.shape[-1] == model.dit.cfg.patch[0] * 6 * 6 * 3
  params = random_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), seed=3, scale=0.1)
  export = write_export(str(tmp_path / "field"), config, tokenizer, params)
  out = str(tmp_path / "field.mp4")
  code, printed = run_cli("sample", "--workdir", export, "--prompt", "a red circle moves left",
                          "--out", out, "--steps", "2")
  assert code == 0, printed[-2000:]
  assert manifest.verify(out).generation["sampler"]["steps"] == 2
