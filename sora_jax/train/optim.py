"""The optimiser: AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sora_jax import configs


SCHEDULE_KEYS = ("peak", "warmup", "decay", "end")   # `warmup_cosine`'s arguments


def schedule_values(optim: ml_collections.ConfigDict, total_steps: int) -> dict[str, float]:
  """The learning-rate schedule of `optim` over `total_steps` (`warmup_cosine`'s arguments):
  `{"peak": optim.lr, "warmup": warmup steps (fewer than total_steps), "decay": the step
  the cosine ends at, "end": optim.lr * optim.min_lr_ratio}`."""
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  return {"peak": float(optim.lr), "warmup": float(warmup),
          "decay": float(max(total_steps, warmup + 1)),
          "end": float(optim.lr * optim.min_lr_ratio)}


def hyperparameters(optim: ml_collections.ConfigDict, total_steps: int) -> dict[str, Any]:
  """Every number of `optim` a train step computes with: the schedule's
  (`schedule_values`), AdamW's `b1`, `b2`, `weight_decay`, the clip `grad_clip`, the EMA's
  `ema_decay`, and `lr_scales` (`{group: factor}`). Python floats: passed to a jitted step
  they are weakly typed inputs (a bfloat16 moment times one stays bfloat16), so the
  compiled step holds none of them as constants (`hyperparameter_inputs`)."""
  o = configs.as_section("optim", optim)
  return {**schedule_values(o, total_steps), "b1": float(o.b1), "b2": float(o.b2),
          "weight_decay": float(o.weight_decay), "grad_clip": float(o.grad_clip),
          "ema_decay": float(o.ema_decay),
          "lr_scales": {group: float(factor) for group, factor in o.lr_scales}}


def warmup_cosine(count: jax.Array | int, peak: Any, warmup: Any, decay: Any, end: Any
                  ) -> jax.Array:
  """The learning rate at step `count`: linear from 0 to `peak` over the first `warmup`
  steps, then cosine from `peak` to `end` by step `decay`, `end` after (optax's
  `warmup_cosine_decay_schedule` from 0). Every argument may be traced."""
  count = jnp.asarray(count, jnp.float32)
  rise = peak * count / jnp.maximum(warmup, 1.0)
  progress = jnp.clip((count - warmup) / jnp.maximum(decay - warmup, 1.0), 0.0, 1.0)
  fall = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(count < warmup, rise, fall)


# By name, the values the optimisers made under that name read instead of their own while
# a train step is traced (`hyperparameter_inputs`).
_INPUTS: contextvars.ContextVar[dict[str, dict[str, Any]]] = contextvars.ContextVar(
    "sora_jax_optimizer_inputs", default={})


@contextlib.contextmanager
def hyperparameter_inputs(by_name: dict[str, dict[str, Any]]) -> Iterator[None]:
  """Within it, the schedules and optimisers made under each name of `by_name`
  (`learning_rate_schedule`, `base_optimizer`, `make_optimizer`) compute from that name's
  values (`hyperparameters`' keys; a schedule reads `SCHEDULE_KEYS` only: the traced
  inputs of a jitted train step) instead of the numbers they were made with. A compiled
  step then holds no learning rate, warmup, number of steps, Adam betas, weight decay,
  clip, EMA decay or group factor: runs that differ only in those run one program (a
  sweep of them reads it from the compilation cache after its first run). The names tell
  a step's optimisers apart (the VAE's step: `optim` and `disc_optim`)."""
  token = _INPUTS.set({**_INPUTS.get(), **by_name})
  try:
    yield
  finally:
    _INPUTS.reset(token)


def _in_effect(name: str, own: dict[str, Any]) -> dict[str, Any]:
  """The values an optimiser made under `name` computes with now: the step's inputs inside
  `hyperparameter_inputs`, else its own."""
  return _INPUTS.get().get(name, own)


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int,
                           name: str = "optim") -> optax.Schedule:
  """Linear warmup to `optim.lr`, then cosine decay to `optim.lr * optim.min_lr_ratio`
  (`warmup_cosine` of `schedule_values`); inside `hyperparameter_inputs({name: values})`,
  of those values."""
  own = schedule_values(optim, total_steps)

  def schedule(count):
    values = _in_effect(name, own)
    return warmup_cosine(count, **{k: values[k] for k in SCHEDULE_KEYS})
  return schedule


def _deferred(build: Callable[[], optax.GradientTransformation]
              ) -> optax.GradientTransformation:
  """The transformation `build()` returns at each `init` and `update`: built when it runs,
  so inside a traced step it is made of the step's inputs (`hyperparameter_inputs`). Its
  state's structure must not depend on them."""
  return optax.GradientTransformation(lambda params: build().init(params),
                                      lambda updates, state, params=None:
                                      build().update(updates, state, params))


def _decay_mask(params):
  """Weight decay on matrices only (not norms, biases or tables of vectors)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def base_optimizer(optim: ml_collections.ConfigDict, total_steps: int, name: str = "optim"
                   ) -> optax.GradientTransformation:
  """AdamW of `optim` with global-norm clipping, over every parameter it is given; on a
  float32 master copy of them with `optim.master_copy` (`with_master_copy`). Its numbers:
  `hyperparameters(optim, total_steps)`, or the step's under `name`
  (`hyperparameter_inputs`); its learning rate `learning_rate_schedule(optim, total_steps,
  name)`."""
  own = hyperparameters(optim, total_steps)
  schedule = learning_rate_schedule(optim, total_steps, name)

  def build():
    values = _in_effect(name, own)
    return optax.chain(
        optax.clip_by_global_norm(values["grad_clip"]),
        optax.adamw(schedule, b1=values["b1"], b2=values["b2"],
                    weight_decay=values["weight_decay"], mask=_decay_mask))
  tx = _deferred(build)
  return with_master_copy(tx) if configs.as_section("optim", optim).master_copy else tx


class MasterCopyState(NamedTuple):
  """`with_master_copy`'s state: the float32 copy of the parameters, and the state of the
  transformation it runs (its moments float32 too)."""
  master: Any
  inner: Any


def with_master_copy(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` run in float32 on a float32 copy of the parameters that it keeps in its state
  (mixed precision: the parameters themselves may be stored in bfloat16, `optim.
  param_dtype`). Each update moves the copy by `tx`'s float32 update and returns what
  takes the stored parameters to the copy rounded to their dtype, so updates smaller than
  their resolution accumulate in the copy instead of being lost. The copy starts as the
  parameters given to `init`."""

  def init(params):
    master = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    return MasterCopyState(master, tx.init(master))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("with_master_copy: update needs the parameters.")
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
    steps, inner = tx.update(grads, state.inner, state.master)
    master = optax.apply_updates(state.master, steps)
    # optax.apply_updates(params, these) is `master` rounded to the parameters' dtype.
    to_master = jax.tree.map(
        lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32),
        master, params)
    return to_master, MasterCopyState(master, inner)

  return optax.GradientTransformation(init, update)


def trainable(tree: dict, frozen: Sequence[str]) -> dict:
  """The top-level groups of a parameter tree that are not `frozen`."""
  return {k: v for k, v in tree.items() if k not in frozen}


def frozen_groups(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The top-level groups of the train state's parameters kept fixed: `optim.frozen` and
  `expert_fixed`'s, or none in a LoRA run (`lora.rank`), whose state holds only the
  adapters, all trained (the base they adapt is fixed and outside the state)."""
  t = configs.typed(config)
  return () if t.lora.rank else tuple(t.optim.frozen) + tuple(
      g for g in expert_fixed(config) if g not in t.optim.frozen)


EXPERTS = ("dit", "low_noise_dit")   # two experts (model.boundary): high noise, low noise
_ONE_EXPERT = {"high": EXPERTS[:1], "low": EXPERTS[1:]}   # train.expert -> what it trains


def trained_experts(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The transformers a train step runs and trains (`train.expert`): `dit` for one
  transformer or the high-noise expert alone, `low_noise_dit` for the low-noise one, both
  (`EXPERTS`, each clip's velocity from the expert of its time) for two trained together."""
  t = configs.typed(config)
  if not t.model.boundary:
    return EXPERTS[:1]
  return _ONE_EXPERT.get(t.train.expert, EXPERTS)


def expert_fixed(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The groups a run training one of two experts keeps fixed (`train.expert`): the other
  expert, and the text encoder both read (training it for one would change the other's
  input)."""
  trained = _ONE_EXPERT.get(configs.typed(config).train.expert)
  return tuple(g for g in EXPERTS if g not in trained) + ("text_encoder",) if trained else ()


def with_lr_scales(tx: optax.GradientTransformation, scales: dict[str, float]
                   ) -> optax.GradientTransformation:
  """`tx` with the updates of the top-level parameter groups in `scales` multiplied by their
  factor (`optim.lr_scales`: for AdamW, that group's learning rate and decay times it);
  `tx` itself without any."""
  if not scales:
    return tx

  def init(params):
    # (optax.tree_map_params inits with a placeholder for the whole tree: nothing to check.)
    unknown = sorted(set(scales) - set(params)) if isinstance(params, dict) else []
    if unknown:
      raise ValueError(f"optim.lr_scales: no parameter groups {unknown} (the model has "
                       f"{sorted(params)}).")
    return tx.init(params)

  def update(updates, state, params=None):
    new, state = tx.update(updates, state, params)
    return {k: jax.tree.map(lambda u: u * scales[k], v) if k in scales else v
            for k, v in new.items()}, state
  return optax.GradientTransformation(init, update)


def for_run(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimiser of a run: `make_optimizer` of `optim` over `train.steps`, freezing
  `frozen_groups`."""
  return make_optimizer(config.optim, config.train.steps, frozen=frozen_groups(config))


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, *,
                   frozen: Sequence[str] | None = None, name: str = "optim"
                   ) -> optax.GradientTransformation:
  """`base_optimizer` with `optim.lr_scales` (`with_lr_scales`); the top-level parameter
  groups named in `frozen` (default `optim.frozen`; e.g. `("text_encoder",)` to fine-tune
  a pretrained transformer with its text encoder fixed) get zero updates and no optimiser
  state (the state covers `trainable(params)` only). Its numbers are read under `name`
  inside `hyperparameter_inputs` (`base_optimizer`)."""
  base = base_optimizer(optim, total_steps, name)
  own = hyperparameters(optim, total_steps)
  tx = (_deferred(lambda: with_lr_scales(base, _in_effect(name, own)["lr_scales"]))
        if own["lr_scales"] else base)
  frozen = configs.as_section("optim", optim).frozen if frozen is None else tuple(frozen)
  if not frozen:
    return tx

  def check(tree: dict) -> None:
    unknown = sorted(set(frozen) - set(tree))
    if unknown:
      raise ValueError(f"optim.frozen={frozen}: no parameter groups {unknown} (the model has "
                       f"{sorted(tree)}).")

  def init(params):
    check(params)
    return tx.init(trainable(params, frozen))

  def update(updates, state, params=None):
    new, state = tx.update(trainable(updates, frozen), state,
                           None if params is None else trainable(params, frozen))
    return {k: new[k] if k in new else jax.tree.map(jax.numpy.zeros_like, v)
            for k, v in updates.items()}, state
  return optax.GradientTransformation(init, update)


def ema_params(params: dict, config: ml_collections.ConfigDict) -> dict:
  """The parameter groups of the train state the EMA averages: the trainable ones (a
  frozen group's average is the group itself, see `frozen_groups`), none when
  `optim.ema_decay` is 0 (sampling then uses the parameters). The EMA in the train state
  starts as these."""
  t = configs.typed(config)
  return trainable(params, frozen_groups(config)) if t.optim.ema_decay > 0 else {}


def ema_update(ema, params, step: jax.Array, decay: float):
  """`ema <- d * ema + (1 - d) * params` with d warmed up as min(decay, (1 + s) / (10 + s))."""
  d = jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
