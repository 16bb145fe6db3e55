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


def test_the_optimiser_is_adamw_of_its_numbers_or_of_the_steps_inputs():
  """`make_optimizer` is clipped AdamW with optax's warmup-cosine schedule of the config's
  numbers (decay on matrices only, a group's factor on its updates); inside
  `hyperparameter_inputs` the same optimiser computes with the numbers given instead, and
  given as a jitted function's inputs they keep bfloat16 moments and updates bfloat16."""
  rng = np.random.default_rng(0)
  params = {"dit": {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
                    "b": jnp.asarray(rng.standard_normal(4), jnp.float32)},
            "text_encoder": {"w": jnp.asarray(rng.standard_normal((2, 2)), jnp.float32)}}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                        params) for _ in range(3)]
  mine = dict(lr=2e-3, warmup_steps=1, min_lr_ratio=0.2, b1=0.8, b2=0.9, weight_decay=0.3,
              grad_clip=0.5, lr_scales=(("text_encoder", 3.0),))
  theirs = dict(lr=5e-4, warmup_steps=2, min_lr_ratio=0.5, b1=0.7, b2=0.95, weight_decay=0.05,
                grad_clip=2.0, lr_scales=(("text_encoder", 0.25),))

  def reference(numbers):
    schedule = optax.warmup_cosine_decay_schedule(0.0, numbers["lr"], numbers["warmup_steps"],
                                                  5, numbers["lr"] * numbers["min_lr_ratio"])
    tx = optax.chain(optax.clip_by_global_norm(numbers["grad_clip"]),
                     optax.adamw(schedule, b1=numbers["b1"], b2=numbers["b2"],
                                 weight_decay=numbers["weight_decay"],
                                 mask=jax.tree.map(lambda p: p.ndim >= 2, params)))
    return run(tx, dict(numbers["lr_scales"]))

  def run(tx, scales=None):
    state, p, out = tx.init(params), params, []
    for g in grads:
      u, state = tx.update(g, state, p)
      if scales is not None:
        u = {k: jax.tree.map(lambda x: x * scales.get(k, 1.0), v) for k, v in u.items()}
      p = optax.apply_updates(p, u)
      out.append(p)
    return out

  section = lambda numbers: ml_collections.ConfigDict(configs.defaults("optim", **numbers))
  tx = optim.make_optimizer(section(mine), 5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, run(tx), reference(mine))
  with optim.hyperparameter_inputs({"optim": optim.hyperparameters(section(theirs), 5)}):
    jax.tree.map(close, run(tx), reference(theirs))
  with optim.hyperparameter_inputs({"other": optim.hyperparameters(section(theirs), 5)}):
    jax.tree.map(close, run(tx), reference(mine))               # another name's: not read

  low = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)

  @jax.jit
  def update(numbers, state, g):
    with optim.hyperparameter_inputs({"optim": numbers}):
      return tx.update(g, state, low)

  updates, state = update(optim.hyperparameters(section(theirs), 5), tx.init(low),
                          jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads[0]))
  assert {x.dtype for x in jax.tree.leaves((updates, state)) if x.dtype != jnp.int32} == {
      jnp.dtype(jnp.bfloat16)}
