"""The rectified-flow loss and the jitted, donated train step."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from sora_jax import configs
from sora_jax.data.camera import camera_input
from sora_jax.diffusion import conditioning
from sora_jax.diffusion import flow
from sora_jax.models.autoencoder import Autoencoder
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.lora import dropout_randomness, merge_trees
from sora_jax.models.tokenizer import EOS_ID
from sora_jax.models.trace_levels import rebuilt_per_call
from sora_jax.parallel.sharding import activation_sharding
from sora_jax.parallel.sharding import batch_sharding
from sora_jax.parallel.sharding import replicated
from sora_jax.train import faults
from sora_jax.train import optim
from sora_jax.train.state import TrainState, cast_floats, host_groups

Batch = dict[str, jax.Array]
PACKED_BATCH_NDIMS = {"patches": 3, "positions": 3, "segment_ids": 2, "text_ids": 2,
                      "text_segment_ids": 2, "text_positions": 2}


def _training_shifts(key: jax.Array, shape: tuple[int, ...], config) -> float | jax.Array:
  """The time shift of each example (`shape`) before its clip-size scaling: `flow.shift`,
  or per example `flow.second_shift` with probability `flow.second_shift_share`
  (`flow.mixed_shift`; `flow.shift` itself when the share is 0)."""
  return flow.mixed_shift(key, shape, config.flow.shift, config.flow.second_shift,
                          config.flow.second_shift_share)


def flow_loss(params: Any, graphdef: nnx.GraphDef, batch: Batch, key: jax.Array, *,
              config: configs.Config | ml_collections.ConfigDict, autoencoder: Autoencoder,
              null_ids: jax.Array, null_mask: jax.Array, null_text: jax.Array | None = None,
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over examples of the velocity MSE (weighted by `flow.loss_space`), with
  captions dropped for guidance.

  Args:
    params: model parameters (float32; cast to `train.compute_dtype` here).
    batch: `video [B, T, H, W, C]` (or `latent [B, T', H', W', C']`, already encoded),
      `text_ids [B, L]`, `text_mask [B, L]`, and with cached text (`data.cache_text`)
      `text_states [B, L, D]`, which replace the text encoder.
    key: randomness for caption dropout, times and noise.
    null_ids, null_mask: `[L]` tokens of the empty caption (the unconditional input).
    null_text: `[1, L, D]` the empty caption's text states (`null_text_states`), with
      cached text; computed here from `null_ids` when not given.
    config: the typed config (`sora_jax.configs.typed`; a ConfigDict is typed here): reads
      train.compute_dtype, flow.*, model.variant and conditioning.*.
  """
  config = configs.typed(config)
  dtype = jnp.dtype(config.train.compute_dtype)
  model = nnx.merge(graphdef, cast_floats(params, dtype))
  k_drop, k_time, k_noise = jax.random.split(key, 3)
  b = batch["text_ids"].shape[0]
  drop = jax.random.bernoulli(k_drop, config.flow.caption_dropout, (b,))
  ids = jnp.where(drop[:, None], null_ids[None], batch["text_ids"])
  mask = jnp.where(drop[:, None], null_mask[None], batch["text_mask"])
  camera = None
  if "camera" in batch:        # camera control: rays of each clip's camera, dropped for some
    video_size = batch["video"].shape[2:4]
    keep = ~jax.random.bernoulli(jax.random.fold_in(key, 2), config.model.camera_dropout, (b,))
    camera = (camera_input(batch["camera"], *video_size, autoencoder.temporal_factor,
                           autoencoder.spatial_factor)
              * keep[:, None, None, None, None]).astype(dtype)
  if "text_states" in batch:   # cached states of a frozen text encoder (data.cache_text)
    if null_text is None:
      null_text = model.encode_text(null_ids[None], null_mask[None])         # [1, L, D]
    text = jnp.where(drop[:, None, None], null_text.astype(dtype),
                     batch["text_states"].astype(dtype))
  else:
    text = model.encode_text(ids, mask)

  def predict_with(of: nnx.Module):
    experts = [getattr(of, name) for name in optim.trained_experts(config)]

    def predict(x, t, conditioning=None, **kwargs):
      outs = [module(x, t, text, mask, conditioning=conditioning, camera=camera, **kwargs)
              for module in experts]
      if len(outs) == 1:
        return outs[0]
      high = (t >= of.boundary).reshape(t.shape + (1,) * (x.ndim - t.ndim))
      return jnp.where(high, outs[0], outs[1])
    return predict
  if model.dit.cfg.self_condition:
    predict = self_conditioned(predict_with, model, jax.random.fold_in(key, 3),
                               config.flow.self_condition_rate)
  else:
    predict = predict_with(model)
  # Cached latents (data.latents_dir), or pixels encoded here.
  x0 = batch["latent"] if "latent" in batch else autoencoder.encode(batch["video"])
  patch = configs.decode_variant(config.model.variant)["patch"]
  shift = flow.token_shift(num_tokens(x0.shape[1:4], patch),
                           _training_shifts(jax.random.fold_in(k_time, 1), (b,), config),
                           config.flow.shift_base_tokens)
  kinds = dict(config.flow.frame_times)
  if not flow.frame_times_shared(kinds):
    return _per_frame_loss(predict, x0, key, k_time, k_noise, config, kinds, shift, patch)
  t = flow.sample_time(k_time, b, logit_mean=config.flow.logit_mean,
                       logit_std=config.flow.logit_std, shift=shift,
                       within=expert_times(config))
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  xt = flow.interpolate(x0.astype(jnp.float32), noise, t)
  target = flow.velocity_target(x0, noise)
  weights = flow.loss_weights(t, config.flow.loss_space)                     # [B]
  gradient = gradient_weights(t[:, None], config)                           # [B, 1]
  if not conditioning.enabled(config):
    losses = flow.per_example_mse(predict(xt.astype(dtype), t), target, gradient) * weights
    return losses.mean(), {"loss": losses.mean()}
  # Frame conditioning: some frames given (clean, or at conditioning.noise), no loss on them.
  given, cond = _given_frames(key, config, x0)
  velocity = predict(xt.astype(dtype), t, conditioning=cond.astype(dtype))
  losses = conditioning.masked_mse(velocity, target, given, gradient_weights=gradient) * weights
  return losses.mean(), {"loss": losses.mean(),
                         "given_frames": given.astype(jnp.float32).mean()}


def gradient_weights(t: jax.Array, config: configs.Config) -> jax.Array | None:
  """The gradient-difference term's weights (`flow.gradient_loss_weight`, at times from
  `flow.gradient_loss_min_time` to `gradient_loss_max_time`) for times `t [B, 1]` or
  `[B, T]`; None without the term."""
  if not config.flow.gradient_loss_weight:
    return None
  return flow.gradient_loss_weights(t, config.flow.gradient_loss_weight,
                                    config.flow.gradient_loss_min_time,
                                    config.flow.gradient_loss_max_time)


def expert_times(config: configs.Config) -> tuple[float, float]:
  """The flow times `[lo, hi)` a train step draws (`train.expert`): the whole range, or
  one expert's side of `model.boundary`."""
  boundary = config.model.boundary
  return {"high": (boundary, 1.0), "low": (0.0, boundary)}.get(config.train.expert, (0.0, 1.0))


def self_conditioned(predict_with, model: nnx.Module, key: jax.Array, rate: float):
  """`predict(x, t, conditioning)` of a self-conditioning transformer in training
  (`model.self_condition`): with probability `rate` (one draw per step) a first pass
  without gradient estimates the clean video from zeros, and the model is called again
  with that estimate; otherwise it is called with zeros (Chen et al. 2022).

  `predict_with(model)`: the model's velocity `predict(x, t, conditioning,
  self_condition=...)`, t `[B]`. The first pass runs inside a `lax.cond` branch, on the
  model made again there (`models.trace_levels`).
  """
  predict, model_here = predict_with(model), rebuilt_per_call(model)

  def predict_once(x, t, conditioning=None):
    if t.ndim != 1:
      raise ValueError("model.self_condition trains with one flow time per clip "
                       "(flow.frame_times shared).")
    zeros = jnp.zeros_like(x)

    def estimate():
      velocity = predict_with(model_here())(x, t, conditioning, self_condition=zeros)
      return jax.lax.stop_gradient(flow.clean_estimate(x, velocity, t))

    first = jax.lax.cond(jax.random.bernoulli(key, rate), estimate, lambda: zeros)
    return predict(x, t, conditioning, self_condition=first)
  return predict_once


def _given_frames(key: jax.Array, config: configs.Config, x0: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """`(given [B, T'] bool, conditioning input)` of frame conditioning for clips `x0`:
  the masks drawn from `conditioning.probs`, the given frames clean or at
  `conditioning.noise`."""
  c = config.conditioning
  k_mask, k_given = jax.random.split(jax.random.fold_in(key, 1))
  given = conditioning.sample_frame_masks(k_mask, x0.shape[0], x0.shape[1], dict(c.probs),
                                          c.max_frames)
  return given, conditioning.conditioning_input(x0, given, noise_level=c.noise, key=k_given)


def _per_frame_loss(predict, x0: jax.Array, key: jax.Array, k_time: jax.Array,
                    k_noise: jax.Array, config: configs.Config, kinds: dict[str, float],
                    shift: jax.Array, patch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`flow_loss` with a flow time per temporal chunk (`flow.sample_frame_times`: diffusion
  forcing): each frame noised to its chunk's time, the transformer modulated per token,
  the (weighted) velocity MSE per frame over the frames that are neither given
  (frame conditioning) nor clean (t = 0), averaged per clip.

  x0: `[B, T', H', W', C]` what is diffused; predict(x, t [B, N], conditioning).
  """
  b, frames = x0.shape[:2]
  pt = patch[0]
  if frames % pt:
    raise ValueError(f"{frames} diffused frames do not split into temporal patches of {pt}.")
  chunks = frames // pt
  t_chunks = flow.sample_frame_times(k_time, b, chunks, kinds,
                                     logit_mean=config.flow.logit_mean,
                                     logit_std=config.flow.logit_std, shift=shift)   # [B, C]
  t_frames = jnp.repeat(t_chunks, pt, axis=1)                                      # [B, T']
  t_tokens = flow.times_per_token(t_chunks, x0.shape[1:4], patch)                   # [B, N]
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  xt = flow.interpolate(x0.astype(jnp.float32), noise, t_frames)
  target = flow.velocity_target(x0, noise)
  dtype = jnp.dtype(config.train.compute_dtype)
  clean = t_frames == 0.0
  metrics = {"clean_frames": clean.astype(jnp.float32).mean()}
  if conditioning.enabled(config):
    given, cond = _given_frames(key, config, x0)
    velocity = predict(xt.astype(dtype), t_tokens, conditioning=cond.astype(dtype))
    clean = clean | given
    metrics["given_frames"] = given.astype(jnp.float32).mean()
  else:
    velocity = predict(xt.astype(dtype), t_tokens)
  losses = conditioning.masked_mse(velocity, target, clean,
                                   flow.loss_weights(t_frames, config.flow.loss_space),
                                   gradient_weights(t_frames, config))              # [B]
  metrics["loss"] = losses.mean()
  return losses.mean(), metrics


def packed_flow_loss(params: Any, graphdef: nnx.GraphDef, batch: Batch, key: jax.Array, *,
                     config: configs.Config | ml_collections.ConfigDict,
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The flow loss of packed rows (`sora_jax.data.packing`), averaged per example.

  Each example of a row gets its own time (shifted by its own token count), its own
  caption dropout (its caption becomes the empty one: EOS alone), and the same weight
  in the mean whatever its size; padding tokens count nowhere. `config`: as `flow_loss`'s
  (reads train.compute_dtype, data.max_examples_per_row and flow.*).
  """
  config = configs.typed(config)
  dtype = jnp.dtype(config.train.compute_dtype)
  model = nnx.merge(graphdef, cast_floats(params, dtype))
  k_drop, k_time, k_noise = jax.random.split(key, 3)
  segment_ids = batch["segment_ids"]                                        # [B, N]
  b, k = segment_ids.shape[0], config.data.max_examples_per_row
  members = (segment_ids[:, :, None] == jnp.arange(1, k + 1)).astype(jnp.float32)  # [B, N, K]
  counts = members.sum(1)                                                   # [B, K]
  token_example = jnp.maximum(segment_ids - 1, 0)

  drop = jax.random.bernoulli(k_drop, config.flow.caption_dropout, (b, k))
  text_segment_ids = batch["text_segment_ids"]
  dropped = (jnp.take_along_axis(drop, jnp.maximum(text_segment_ids - 1, 0), axis=1)
             & (text_segment_ids > 0))
  text_ids = jnp.where(dropped, EOS_ID, batch["text_ids"])
  text_segment_ids = jnp.where(dropped & (batch["text_positions"] > 0), 0, text_segment_ids)

  shift = flow.token_shift(jnp.maximum(counts, 1),
                           _training_shifts(jax.random.fold_in(k_time, 1), (b, k), config),
                           config.flow.shift_base_tokens)
  t = flow.sample_time(k_time, (b, k), logit_mean=config.flow.logit_mean,
                       logit_std=config.flow.logit_std, shift=shift)        # [B, K]
  x0 = batch["patches"].astype(jnp.float32)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  xt = flow.interpolate(x0, noise, jnp.take_along_axis(t, token_example, axis=1))
  velocity = model.forward_packed(xt.astype(dtype), batch["positions"], segment_ids, t,
                                  text_ids, text_segment_ids, batch["text_positions"])
  err = jnp.square(velocity.astype(jnp.float32) - flow.velocity_target(x0, noise)).mean(-1)
  per_example = jnp.einsum("bn,bnk->bk", err, members) / jnp.maximum(counts, 1)
  per_example = per_example * flow.loss_weights(t, config.flow.loss_space)   # [B, K]
  valid = (counts > 0).astype(jnp.float32)
  loss = (per_example * valid).sum() / jnp.maximum(valid.sum(), 1)
  return loss, {"loss": loss, "examples_per_row": valid.sum(1).mean()}


def null_text_states(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: Any,
                     null_ids: np.ndarray, null_mask: np.ndarray) -> jax.Array:
  """`[1, L, D]` the empty caption's text states, as `flow_loss` computes them (the text
  encoder in `train.compute_dtype`). With cached text (`data.cache_text`) the encoder is
  frozen, so they are computed once for the run rather than in every step."""
  dtype = jnp.dtype(configs.typed(config).train.compute_dtype)

  @jax.jit
  def encode(params, ids, mask):
    return nnx.merge(graphdef, cast_floats(params, dtype)).encode_text(ids[None], mask[None])
  # Groups kept in host memory (`state.host_groups`) come to the devices for this once.
  on_device = jax.tree.map(
      lambda x: jax.device_put(x, x.sharding.with_memory_kind("device"))
      if getattr(x.sharding, "memory_kind", "device") == "pinned_host" else x, params)
  return encode(on_device, jnp.asarray(null_ids), jnp.asarray(null_mask))


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """`step(state, batch) -> (state, metrics)`: the jitted step (state donated) with the
  fixed arrays it reads besides the state, `fixed` (a LoRA run's base, see
  `train.restore.base_params`; a distillation's teacher; empty otherwise). `lower(state,
  batch)` lowers it for ahead-of-time compilation (abstract arrays with shardings
  welcome); `compile(state, batch)` gives the compiled `step(state, batch)`.

  The parameter groups named in `passed_by` (the host-memory groups the step never reads,
  `train.state.host_groups`) go to the jitted function as a separate input, neither
  donated nor returned, and back into the state unchanged: so the compiled step holds no
  output copy of them (in host memory, such a copy takes device memory on its way).

  `hyperparameters`: the optimiser's numbers (`optim.hyperparameters`: the learning-rate
  schedule, Adam's betas, weight decay, clip, EMA decay, group factors), an input of the
  jitted step rather than constants of its program, so that runs differing only in those
  (`optim.lr`, `optim.warmup_steps`, `optim.min_lr_ratio`, `train.steps`, `optim.b1`,
  `optim.b2`, `optim.weight_decay`, `optim.grad_clip`, a non-zero `optim.ema_decay`, the
  factors of `optim.lr_scales`) share it."""
  jitted: Any
  fixed: Any
  passed_by: tuple[str, ...] = ()
  hyperparameters: dict[str, Any] = dataclasses.field(kw_only=True)

  def _split(self, state: Any) -> tuple[Any, Any]:
    params = state["params"]
    inner = {k: v for k, v in params.items() if k not in self.passed_by}
    return {**state, "params": inner}, {k: params[k] for k in self.passed_by if k in params}

  def _run(self, fn: Callable[..., Any], state: TrainState, batch: Batch
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    """`fn` (the jitted or the compiled step) on the state without the passed-by groups,
    which go back into the new state."""
    inner, passed = self._split(state)
    new, metrics = fn(inner, batch, self.fixed, passed, self.hyperparameters)
    return {**new, "params": {**new["params"], **passed}}, metrics

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    return self._run(self.jitted, state, batch)

  def lower(self, state: Any, batch: Any) -> Any:
    inner, passed = self._split(state)
    return self.jitted.lower(inner, batch, self.fixed, passed, self.hyperparameters)

  def compile(self, state: Any, batch: Any) -> Callable[[TrainState, Batch], Any]:
    """Compiled ahead of time for these (abstract) arguments: `step(state, batch)`."""
    return functools.partial(self._run, self.lower(state, batch).compile())


# loss(params, batch, key, fixed) -> (loss, metrics): the parameters of the state (the
# frozen groups included), the global batch, the step's key and the step's fixed arrays.
LossFn = Callable[[Any, Batch, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


def batch_shardings(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, Any]:
  """Shardings of the batch `make_dataset` gives for `config`: packed rows, or clips
  (`video`, or `latent` with `data.latents_dir`) with their tokens (and cached text
  states)."""
  t = configs.typed(config)
  rules = configs.sharding_rules(t)
  clips = "latent" if t.data.latents_dir else "video"
  ndims = (dict(PACKED_BATCH_NDIMS) if t.data.grouping == "pack" else
           {clips: 5, "text_ids": 2, "text_mask": 2})
  if t.data.latents_dir and t.data.cache_text:
    ndims["text_states"] = 3
  if t.model.camera_control:
    ndims["camera"] = 3
  return {k: batch_sharding(mesh, rules, n) for k, n in ndims.items()}


def microbatch(batch: Batch, count: int, index: jax.Array | int) -> Batch:
  """Microbatch `index` of `count` of `batch` (each array `[B, ...]` -> `[B / count, ...]`):
  rows index, index + count, index + 2 count, ... Strided, so that every microbatch
  spreads over the batch's shards as the batch does (a shard holds B / shards consecutive
  rows; when `count` divides them, B / (shards count) of each microbatch), and sliced in
  place (a free reshape, then one index): no copy of the whole batch."""
  def take(x):
    if x.shape[0] % count:
      raise ValueError(f"a batch of {x.shape[0]} does not split into {count} microbatches.")
    rows = x.reshape(x.shape[0] // count, count, *x.shape[1:])
    return jax.lax.dynamic_index_in_dim(rows, index, axis=1, keepdims=False)
  return jax.tree.map(take, batch)


def accumulated_gradients(gradients: Callable[[Batch, jax.Array], tuple[Any, dict]],
                          batch: Batch, key: jax.Array, count: int, batch_shardings: Any,
                          grad_shardings: Any) -> tuple[Any, dict[str, jax.Array]]:
  """Gradient accumulation (`train.microbatches`): `gradients(microbatch, key) -> (grads,
  metrics)` over `count` microbatches of `batch` (`microbatch`), one after another in a
  scan, so that only one microbatch's activations are alive at a time; returns the mean
  gradient (summed in float32, then in the parameters' dtypes) and the mean metrics.
  Microbatch i draws from `fold_in(key, i)`. With a per-example mean loss over equal
  microbatches the mean gradient is the whole batch's (packed rows weigh each microbatch's
  examples by its own count). `batch_shardings` / `grad_shardings`: the shardings each
  microbatch and the float32 sums are kept in."""
  grads_shape, metrics_shape = jax.eval_shape(gradients, microbatch(batch, count, 0), key)
  zeros = lambda tree: jax.tree.map(  # noqa: E731
      lambda s: jnp.zeros(s.shape, jnp.float32), tree)
  sums = (jax.lax.with_sharding_constraint(zeros(grads_shape), grad_shardings),
          zeros(metrics_shape))

  def body(carry, index):
    part = jax.lax.with_sharding_constraint(microbatch(batch, count, index), batch_shardings)
    grads, metrics = gradients(part, jax.random.fold_in(key, index))
    add = lambda a, b: a + b.astype(jnp.float32)  # noqa: E731
    return (jax.tree.map(add, carry[0], grads), jax.tree.map(add, carry[1], metrics)), None

  (grad_sum, metric_sum), _ = jax.lax.scan(body, sums, jnp.arange(count))
  grads = jax.tree.map(lambda g, s: (g / count).astype(s.dtype), grad_sum, grads_shape)
  return grads, jax.tree.map(lambda m, s: (m / count).astype(s.dtype), metric_sum,
                             metrics_shape)


def optimizer_step(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                   shardings: TrainState, mesh: Mesh, loss_fn: LossFn, *,
                   fixed: Any = None) -> TrainStep:
  """The jitted, donated step of any loss of the train state's parameters (`LossFn`): the
  gradient of the trainable groups (`optim.frozen_groups` pass through unchanged), the
  optimiser update, the EMA (`optim.ema_params`) and the fault guard. `fixed`: arrays the
  loss reads besides the state (or `ShapeDtypeStruct`s with shardings, to lower it),
  read in their own shardings and never updated.

  With `train.microbatches` > 1 the batch's gradient is accumulated over that many
  microbatches (`accumulated_gradients`) before the one update.

  Metrics (replicated scalars): the loss's, grad_norm, learning_rate, skipped (1 when the
  loss or gradient was not finite and the update was skipped, see `sora_jax.train.faults`).

  The optimiser's numbers are inputs of the jitted step (`TrainStep.hyperparameters`, the
  config's `optim.hyperparameters`): `tx` made by `optim.make_optimizer` reads them
  (`optim.hyperparameter_inputs`), so `tx` is built from the same config
  (`optim.for_run`).
  """
  t = configs.typed(config)
  rules = configs.sharding_rules(t)
  schedule = optim.learning_rate_schedule(t.optim, t.train.steps)
  hyperparameters = optim.hyperparameters(t.optim, t.train.steps)
  frozen = optim.frozen_groups(t)
  fixed = {} if fixed is None else fixed
  passed_by = tuple(g for g in host_groups(t) if g in frozen and g in shardings["params"])
  batch_in = batch_shardings(t, mesh)

  def step(state: TrainState, batch: Batch, fixed: Any, passed: Any, hyper: Any):
    kept_fixed = {k: v for k, v in state["params"].items() if k in frozen}
    read_only = {**kept_fixed, **passed}      # the loss reads them; the step returns kept_fixed
    before = {"params": optim.trainable(state["params"], frozen),
              "opt_state": state["opt_state"], "ema": state["ema"]}
    key = jax.random.fold_in(state["rng"], state["step"])

    def gradients(batch: Batch, key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
      # LoRA dropout (lora.dropout) draws from its own stream of the key.
      dropout_key = jax.random.fold_in(key, 2) if t.lora.dropout else None
      with (activation_sharding(mesh, rules, t.model.attention, t.model.splash_block),
            dropout_randomness(dropout_key)):
        grad_fn = jax.value_and_grad(
            lambda p: loss_fn({**read_only, **p}, batch, key, fixed), has_aux=True)
        (_, aux), grads = grad_fn(before["params"])
      return grads, aux

    if t.train.microbatches == 1:
      grads, aux = gradients(batch, key)
    else:
      grads, aux = accumulated_gradients(gradients, batch, key, t.train.microbatches,
                                         batch_in, optim.trainable(shardings["params"], frozen))
    with optim.hyperparameter_inputs({"optim": hyper}):
      updates, opt_state = tx.update(grads, state["opt_state"], before["params"])
      learning_rate = schedule(state["step"])
    trained = optax.apply_updates(before["params"], updates)
    ema = optim.ema_update(state["ema"], {k: trained[k] for k in state["ema"]}, state["step"],
                           hyper["ema_decay"])
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient leaves parameters, optimiser state and EMA unchanged.
    finite = faults.is_finite(aux["loss"], grad_norm)
    kept = faults.keep_if_finite(
        finite, {"params": trained, "opt_state": opt_state, "ema": ema}, before)
    metrics = {**aux, "grad_norm": grad_norm, "learning_rate": learning_rate,
               "skipped": 1.0 - finite.astype(jnp.float32)}
    return {**kept, "params": {**kept_fixed, **kept["params"]}, "step": state["step"] + 1,
            "rng": state["rng"]}, metrics

  fixed_shardings = jax.tree.map(lambda x: x.sharding, fixed)
  params = shardings["params"]
  inner = {**shardings, "params": {k: v for k, v in params.items() if k not in passed_by}}
  passed_shardings = {k: params[k] for k in passed_by}
  jitted = jax.jit(step, in_shardings=(inner, batch_in, fixed_shardings,
                                       passed_shardings, replicated(mesh)),
                   out_shardings=(inner, replicated(mesh)), donate_argnums=(0,))
  return TrainStep(jitted, fixed, passed_by, hyperparameters=hyperparameters)


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, shardings: TrainState, mesh: Mesh,
                    autoencoder: Autoencoder, null_ids: np.ndarray, null_mask: np.ndarray,
                    null_text: jax.Array | None = None, *, base: Any = None) -> TrainStep:
  """The rectified-flow train step `step(state, batch) -> (state, metrics)` (a `TrainStep`,
  `optimizer_step` of `flow_loss`, or `packed_flow_loss` for packed rows), jitted with the
  state donated. `null_text`: the empty caption's text states (`null_text_states`), for
  cached text; without them the step encodes the empty caption itself. `base`: a LoRA
  run's fixed base (`train.restore.base_params`, or `ShapeDtypeStruct`s with shardings to
  lower it), read in its own shardings; the state holds the adapters."""
  t = configs.typed(config)   # the loss and the step read the typed config
  if t.data.grouping == "pack":
    loss = functools.partial(packed_flow_loss, config=t)
  else:
    loss = functools.partial(flow_loss, config=t, autoencoder=autoencoder,
                             null_ids=jnp.asarray(null_ids), null_mask=jnp.asarray(null_mask),
                             null_text=null_text)
  return optimizer_step(
      t, tx, shardings, mesh,
      lambda params, batch, key, base: loss(merge_trees(base, params), graphdef, batch, key),
      fixed={} if base is None else base)
