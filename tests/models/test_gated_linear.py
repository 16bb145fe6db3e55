"""`models.gated_linear.gated_linear` (a linear layer times adaLN's gate, with a backward
that does not keep the layer's output) against float64 numpy, and what a DiT block keeps
for its backward under the `dots` remat policy with it."""

import contextlib
import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import layers
from sora_jax.models.gated_linear import gated_linear

B, N, K, D = 2, 5, 6, 4


def reference(a, kernel, bias, gate, cotangent):
  """float64 numpy: the output and the gradients of sum(out * cotangent)."""
  y = a @ kernel + bias                                                   # [B, N, D]
  scaled = cotangent * gate                                               # d y
  d_gate = (cotangent * y).sum(1, keepdims=True)
  if gate.shape[0] == 1:
    d_gate = d_gate.sum(0, keepdims=True)
  return (y * gate, scaled @ kernel.T, np.einsum("bnk,bnd->kd", a, scaled),
          scaled.sum((0, 1)), d_gate)


@pytest.mark.parametrize("gate_batch", [B, 1])
def test_values_and_gradients_match_float64(gate_batch):
  rng = np.random.default_rng(0)
  a, kernel, bias = rng.normal(size=(B, N, K)), rng.normal(size=(K, D)), rng.normal(size=D)
  gate = rng.normal(size=(gate_batch, 1, D))
  cotangent = rng.normal(size=(B, N, D))
  as32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

  out, vjp = jax.vjp(lambda *args: gated_linear(*args, jnp.float32),
                     as32(a), as32(kernel), as32(bias), as32(gate))
  want = reference(a, kernel, bias, gate, cotangent)
  chex.assert_shape(out, (B, N, D))
  np.testing.assert_allclose(out, want[0], rtol=1e-5, atol=1e-5)
  for got, expected in zip(vjp(as32(cotangent)), want[1:]):
    chex.assert_shape(got, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_without_bias_and_rejects_per_token_gates():
  rng = np.random.default_rng(1)
  a, kernel, gate = (jnp.asarray(rng.normal(size=s), jnp.float32)
                     for s in ((B, N, K), (K, D), (B, 1, D)))
  grads = jax.grad(lambda k, g: gated_linear(a, k, None, g, jnp.float32).sum(), (0, 1))(
      kernel, gate)
  ref = jax.grad(lambda k, g: ((a @ k) * g).sum(), (0, 1))(kernel, gate)
  for got, want in zip(grads, ref):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"gate \[B, 1, D\]"):
    gated_linear(a, kernel, None, jnp.ones((B, N, D)), jnp.float32)


def test_gated_dense_matches_the_plain_product():
  """`layers.gated_dense` equals `linear(x) * gate` (per example and per token) in values
  and gradients."""
  linear = nnx.Linear(K, D, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(B, N, K)), jnp.float32)
  for gate in (rng.normal(size=(B, 1, D)), rng.normal(size=(B, N, D))):
    gate = jnp.asarray(gate, jnp.float32)
    got = jax.value_and_grad(lambda x, g: jnp.sum(layers.gated_dense(linear, x, g) ** 2),
                             (0, 1))(x, gate)
    want = jax.value_and_grad(lambda x, g: jnp.sum((linear(x) * g) ** 2), (0, 1))(x, gate)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_gated_dense_on_a_lora_layer_takes_the_plain_product():
  from sora_jax.models import lora  # pylint: disable=g-import-not-at-top
  adapted = lora.LoRALinear(nnx.Linear(K, D, rngs=nnx.Rngs(0)), 2, 4.0, rngs=nnx.Rngs(1))
  adapted.lora_b[...] = jnp.full((2, D), 0.3)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(B, N, K)), jnp.float32)
  gate = jnp.asarray(rng.normal(size=(B, 1, D)), jnp.float32)
  np.testing.assert_allclose(layers.gated_dense(adapted, x, gate), adapted(x) * gate,
                             rtol=1e-6, atol=1e-6)


def test_a_block_keeps_no_gated_output_under_dots_remat():
  """Under `remat=dots` a block's backward keeps its matmul outputs; the MLP's second
  layer's, gated and the block's last, is no longer among them (the plain product kept 8
  token-sized arrays)."""
  from sora_jax.models import dit  # pylint: disable=g-import-not-at-top
  cfg = dit.DiTConfig(in_channels=4, width=32, depth=1, heads=2, mlp_hidden=48, text_width=8,
                      patch=(1, 2, 2), remat="dots", scan_layers=False)
  with nnx.use_eager_sharding(False):
    block = dit.DiTBlock(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 16, 32)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(1, 1, 32)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(1, 3, 32)), jnp.float32)
  rope = jnp.zeros((1, 16, 8), jnp.float32)
  graph, params = nnx.split(block)

  def loss(params, x):
    model = nnx.merge(graph, params)
    return jnp.sum(model(x, cond, text, rope, segment_ids=None,
                         cross_mask=jnp.ones((1, 1, 1, 3), bool), token_example=None))

  policy = dit.REMAT_POLICIES["dots"]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(loss, policy=policy), params, x)
  saved = printed.getvalue().splitlines()
  token_sized = [line for line in saved if line.startswith("f32[1,16,32]")]
  # Kept: x; the self-attention's q, k, v and gated output projection (the residual
  # stream after it is rebuilt from it for the norms that follow); the cross-attention's
  # queries and output. (The MLP's first layer's output is [1, 16, 48].)
  assert len(token_sized) == 7, saved
