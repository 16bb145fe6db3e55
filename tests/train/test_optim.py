"""The optimiser's float32 master copy (`optim.master_copy`, `optim.with_master_copy`)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sora_jax import configs
from sora_jax.train import optim


def test_a_master_copy_keeps_updates_that_bfloat16_weights_lose():
  """Weights of about 1 stored in bfloat16 (resolution 2**-7) moved by updates of 1e-4:
  without a copy nothing moves; with one the float32 copy moves exactly as a float32 run
  of the same optimiser, and the stored weights are its rounding."""
  params = {"w": jnp.ones((3, 4), jnp.bfloat16), "b": jnp.full((4,), 1.5, jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, jnp.bfloat16), params)
  tx = optax.adam(1e-4)
  plain = params
  copied, copied_state = params, optim.with_master_copy(tx).init(params)
  reference = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  plain_state, reference_state = tx.init(plain), tx.init(reference)
  master_tx = optim.with_master_copy(tx)
  for _ in range(50):
    u, plain_state = tx.update(grads, plain_state, plain)
    plain = optax.apply_updates(plain, u)
    u, copied_state = master_tx.update(grads, copied_state, copied)
    copied = optax.apply_updates(copied, u)
    u, reference_state = tx.update(jax.tree.map(lambda g: g.astype(jnp.float32), grads),
                                   reference_state, reference)
    reference = optax.apply_updates(reference, u)
  jax.tree.map(np.testing.assert_array_equal, plain, params)          # every update lost
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7),
               copied_state.master, reference)                         # 50 steps of 1e-4
  assert float(params["w"][0, 0]) - float(reference["w"][0, 0]) == pytest.approx(5e-3, rel=1e-3)
  jax.tree.map(lambda p, m: np.testing.assert_array_equal(p, m.astype(jnp.bfloat16)),
               copied, copied_state.master)
  assert {x.dtype for x in jax.tree.leaves(copied)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(copied_state)
          if x.dtype != jnp.int32} == {jnp.dtype(jnp.float32)}


def test_master_copy_follows_the_config_and_needs_a_lower_precision(config):
  section = ml_collections.ConfigDict(configs.defaults("optim", param_dtype="bfloat16",
                                                       master_copy=True))
  params = {"dit": {"w": jnp.ones((2, 2), jnp.bfloat16)}}
  state = optim.make_optimizer(section, 10).init(params)
  assert isinstance(state, optim.MasterCopyState)
  assert state.master["dit"]["w"].dtype == jnp.float32
  config.optim.master_copy = True                      # float32 weights: nothing to copy
  with pytest.raises(ValueError, match="optim.master_copy keeps a float32 copy"):
    configs.validate(config)
  config.optim.param_dtype = "bfloat16"
  configs.validate(config)
