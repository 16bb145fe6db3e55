"""The analytic FLOP count agrees with XLA's count of the compiled forward pass."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sora_jax.models.dit import DiffusionTransformer, DiTConfig
from sora_jax.models.flops import (dit_forward_flops, text_encoder_forward_flops,
                                    train_step_flops)
from sora_jax.models.text import TextEncoderConfig


@pytest.mark.parametrize("modulation,output_head,pooled_text,self_condition,overlap", [
    ("per_block", "linear", False, False, 0), ("shared", "linear", True, True, 0),
    ("per_block", "field", False, False, 0), ("per_block", "mlp", False, False, 0),
    ("per_block", "linear", False, False, 2)])
def test_dit_forward_flops_match_xla_cost_analysis(modulation, output_head, pooled_text,
                                                   self_condition, overlap):
  cfg = DiTConfig(width=128, depth=2, heads=4, patch=(1, 4, 4), in_channels=3, text_width=64,
                  modulation=modulation, output_head=output_head, pooled_text=pooled_text,
                  self_condition=self_condition, head_overlap=overlap)
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
  # A train step: forward and backward (3 forwards), and a self-conditioning model's first
  # pass at its rate.
  text_cfg = TextEncoderConfig(vocab_size=64, width=64, depth=1, heads=2, mlp_width=128)
  text_fwd = text_encoder_forward_flops(text_cfg, 16)
  step = train_step_flops(cfg, text_cfg, 2 * 8 * 8, 16, 4, self_condition_rate=0.5)
  assert step == pytest.approx(4 * (3 * (analytic + text_fwd) + 0.5 * analytic * self_condition))
  both = train_step_flops(cfg, text_cfg, 2 * 8 * 8, 16, 4, self_condition_rate=0.5, experts=2)
  assert both == pytest.approx(4 * (3 * (2 * analytic + text_fwd)
                                    + 0.5 * 2 * analytic * self_condition))
