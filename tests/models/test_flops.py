"""The analytic FLOP count agrees with XLA's count of the compiled forward pass."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sora_jax.models.dit import DiffusionTransformer, DiTConfig
from sora_jax.models.flops import dit_forward_flops


@pytest.mark.parametrize("modulation,output_head,pooled_text", [
    ("per_block", "linear", False), ("shared", "linear", True), ("per_block", "field", False)])
def test_dit_forward_flops_match_xla_cost_analysis(modulation, output_head, pooled_text):
  cfg = DiTConfig(width=128, depth=2, heads=4, patch=(1, 4, 4), in_channels=3, text_width=64,
                  modulation=modulation, output_head=output_head, pooled_text=pooled_text)
  with nnx.use_eager_sharding(False):
    model = DiffusionTransformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  # 128 tokens: one query block of the XLA attention (XLA counts a loop's body once).
  x = jnp.zeros((1, 2, 32, 32, 3))
  text, mask = jnp.zeros((1, 16, 64)), jnp.ones((1, 16), bool)

  def forward(params, x):
    return nnx.merge(graphdef, params)(x, jnp.zeros((1,)), text, mask)

  cost = jax.jit(forward).lower(params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = dit_forward_flops(cfg, tokens=2 * 8 * 8, text_tokens=16)
  # XLA also counts elementwise work (norms, softmax, activations), which we leave out.
  assert analytic <= cost["flops"] <= 1.15 * analytic
