"""The rectified-flow loss and the jitted, donated train step."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from sora_jax import configs
from sora_jax.diffusion import flow
from sora_jax.models.autoencoder import Autoencoder
from sora_jax.parallel.sharding import activation_sharding, batch_sharding, replicated
from sora_jax.train import optim
from sora_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def cast_floats(tree: Any, dtype: jnp.dtype) -> Any:
  """Casts floating-point leaves of `tree` to `dtype` (mixed-precision compute)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def flow_loss(params: Any, graphdef: nnx.GraphDef, batch: Batch, key: jax.Array, *,
              config: ml_collections.ConfigDict, autoencoder: Autoencoder,
              null_ids: jax.Array, null_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over examples of the velocity MSE, with captions dropped for guidance.

  Args:
    params: model parameters (float32; cast to `train.compute_dtype` here).
    batch: `video [B, T, H, W, C]`, `text_ids [B, L]`, `text_mask [B, L]`.
    key: randomness for caption dropout, times and noise.
    null_ids, null_mask: `[L]` tokens of the empty caption (the unconditional input).
  """
  dtype = jnp.dtype(config.train.compute_dtype)
  model = nnx.merge(graphdef, cast_floats(params, dtype))
  k_drop, k_time, k_noise = jax.random.split(key, 3)
  b = batch["video"].shape[0]
  drop = jax.random.bernoulli(k_drop, config.flow.caption_dropout, (b,))
  ids = jnp.where(drop[:, None], null_ids[None], batch["text_ids"])
  mask = jnp.where(drop[:, None], null_mask[None], batch["text_mask"])
  x0 = autoencoder.encode(batch["video"])
  t = flow.sample_time(k_time, b, logit_mean=config.flow.logit_mean,
                       logit_std=config.flow.logit_std, shift=config.flow.shift)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  xt = flow.interpolate(x0.astype(jnp.float32), noise, t)
  velocity = model(xt.astype(dtype), t, ids, mask)
  losses = flow.per_example_mse(velocity, flow.velocity_target(x0, noise))
  return losses.mean(), {"loss": losses.mean()}


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, shardings: TrainState, mesh: Mesh,
                    autoencoder: Autoencoder, null_ids: np.ndarray, null_mask: np.ndarray,
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`step(state, batch) -> (state, metrics)`, jitted with the state donated.

  Metrics (replicated scalars): loss, grad_norm, learning_rate.
  """
  rules = configs.sharding_rules(config)
  schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
  null_ids, null_mask = jnp.asarray(null_ids), jnp.asarray(null_mask)

  def step(state: TrainState, batch: Batch):
    with activation_sharding(mesh, rules):
      key = jax.random.fold_in(state["rng"], state["step"])
      grad_fn = jax.value_and_grad(flow_loss, has_aux=True)
      (_, aux), grads = grad_fn(state["params"], graphdef, batch, key, config=config,
                                autoencoder=autoencoder, null_ids=null_ids, null_mask=null_mask)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = optim.ema_update(state["ema"], params, state["step"], config.optim.ema_decay)
    metrics = {**aux, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"])}
    new_state = {"params": params, "opt_state": opt_state, "ema": ema,
                 "step": state["step"] + 1, "rng": state["rng"]}
    return new_state, metrics

  batch_shardings = {
      "video": batch_sharding(mesh, rules, 5), "text_ids": batch_sharding(mesh, rules, 2),
      "text_mask": batch_sharding(mesh, rules, 2)}
  return jax.jit(step, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
