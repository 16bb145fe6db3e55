"""`models.trace_levels.rebuilt_per_call`: modules inside lax loops and branches."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models.trace_levels import rebuilt_per_call

from conftest import make_test_config
from helpers import random_model


def test_a_scanned_transformer_runs_in_a_loop_body_when_made_there(data_dir):
  """A scanned, rematerialised transformer merged at a jitted function's level: called in
  a `lax.fori_loop` body as it is, NNX refuses it (another trace level); made again there
  by `rebuilt_per_call`, it gives the unrolled steps' result."""
  config = make_test_config(data_dir, **{"model.depth": 2, "model.scan_layers": True,
                                         "model.remat": "full"})
  graphdef, params = random_model(config, 24)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 4, 16, 16, 3)), jnp.float32)
  t = jnp.array([0.3, 0.7], jnp.float32)
  text = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
  mask = jnp.ones((2, 5), bool)

  def steps(p, made_in_the_loop):
    dit = nnx.merge(graphdef, p).dit
    here = rebuilt_per_call(dit) if made_in_the_loop else (lambda: dit)
    looped = jax.lax.fori_loop(0, 2, lambda i, y: y - 0.1 * here()(y, t, text, mask), x)
    unrolled = x
    for _ in range(2):
      unrolled = unrolled - 0.1 * dit(unrolled, t, text, mask)
    return looped, unrolled

  looped, unrolled = jax.jit(lambda p: steps(p, True))(params)
  np.testing.assert_allclose(looped, unrolled, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(looped - x).max()) > 1e-3
  with pytest.raises(ValueError, match="different trace level"):
    jax.jit(lambda p: steps(p, False))(params)
