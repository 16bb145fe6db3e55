"""The train state and its sharded initialisation.

The state is a pytree of pure dicts (what Orbax saves and what the jitted step takes):
  params     model parameters (pure dict of `nnx.Param` values); the groups of
             `optim.frozen` in `optim.frozen_dtype`, the others in `optim.param_dtype`,
             when set (`stored_params`). A LoRA run (`lora.rank`) holds its adapters
             only (`state_params`); the base they adapt is fixed, outside the state
             (`base_part`, `train.restore.base_params`)
  opt_state  Optax state
  ema        float32 moving average of the trainable params (`optim.ema_params`:
             those not in `optim.frozen`, none when `optim.ema_decay` is 0; sampling
             takes the groups it lacks from `params`)
  step       int32 scalar
  rng        uint32 `[2]` base key; step s uses `fold_in(rng, s)`
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from sora_jax import configs
from sora_jax.models.abstract import abstract_module
from sora_jax.models.dit import DiTConfig
from sora_jax.models.text import TextEncoderConfig
from sora_jax.models.vision import VisionConfig
from sora_jax.models.lora import add_adapters, split_adapters
from sora_jax.models.model import SoraModel
from sora_jax.parallel.sharding import array_shapes, replicated, state_shardings
from sora_jax.train import optim

TrainState = dict[str, Any]

__all__ = ["ModelSpec", "TrainState", "abstract_model", "abstract_train_state",
           "array_shapes", "base_part", "base_shardings", "build_from_spec", "build_model",
           "cast_floats", "create_train_state", "host_groups", "initial_model_params",
           "model_shardings", "model_spec", "optimizer_shardings", "state_params",
           "stored_base", "stored_params", "train_state_shardings", "trained_whole",
           "with_shardings"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything `build_model` makes a model from, hashable: two configs with equal specs
  (e.g. the same architecture trained for other steps, from other data or with another
  loss) make the same model, and share one abstract trace (`abstract_model`)."""
  text: TextEncoderConfig
  dit: DiTConfig
  text_frozen: bool
  image: VisionConfig | None
  boundary: float
  critic: DiTConfig | None
  lora: tuple[tuple[str, ...], int, float, float] | None   # targets, rank, alpha, dropout


def model_spec(config: ml_collections.ConfigDict, vocab_size: int,
               in_channels: int | None = None) -> ModelSpec:
  """The `ModelSpec` of `config` for a tokenizer of `vocab_size` pieces; `in_channels`
  defaults to the channels of what `config.autoencoder` makes of a video (3 for pixels,
  the VAE's latent channels, read from its workdir's files)."""
  if in_channels is None:
    in_channels = configs.latent_channels(config.autoencoder)
  text_cfg = configs.text_encoder_config(config, vocab_size)
  dit_cfg = configs.dit_config(config, text_width=text_cfg.width, in_channels=in_channels)
  t = configs.typed(config)
  text_adapted = t.lora.rank and any(p.startswith("text_encoder") for p in t.lora.targets)
  fixed = t.optim.frozen + optim.expert_fixed(config)
  return ModelSpec(
      text=text_cfg, dit=dit_cfg,
      text_frozen="text_encoder" in fixed or bool(t.lora.rank and not text_adapted),
      image=configs.vision_config(t), boundary=t.model.boundary,
      critic=critic_config(config, dit_cfg) if t.model.critic else None,
      lora=((tuple(t.lora.targets), t.lora.rank, t.lora.alpha or t.lora.rank, t.lora.dropout)
            if t.lora.rank else None))


def build_model(config: ml_collections.ConfigDict, vocab_size: int, rngs: nnx.Rngs,
                in_channels: int | None = None) -> SoraModel:
  """Builds the model of `config` (its `model_spec`) with unsharded parameters.

  Parameters carry logical axis names; sharding is applied by the caller
  (`create_train_state`), so eager sharding is off here.
  """
  return build_from_spec(model_spec(config, vocab_size, in_channels), rngs)


def build_from_spec(spec: ModelSpec, rngs: nnx.Rngs) -> SoraModel:
  """The model a `ModelSpec` describes, with unsharded parameters (`build_model`)."""
  with nnx.use_eager_sharding(False):
    model = SoraModel(spec.text, spec.dit, rngs=rngs, text_frozen=spec.text_frozen,
                      image_cfg=spec.image, boundary=spec.boundary, critic_cfg=spec.critic)
    if spec.lora is not None:   # after the base, so that its initialisation is the plain model's
      targets, rank, alpha, dropout = spec.lora
      add_adapters(model, targets, rank, alpha, rngs=rngs, dropout=dropout)
  return model


def critic_config(config: ml_collections.ConfigDict, dit_cfg: DiTConfig) -> DiTConfig:
  """The DMD critic's transformer (`model.critic`): the teacher's architecture, i.e. the
  student's `dit_cfg` without its step or guidance input, and bidirectional where the
  student's blocks are its own (`distill.causal_frames`: a bidirectional teacher)."""
  causal = 0 if configs.typed(config).distill.causal_frames else dit_cfg.causal_frames
  return dataclasses.replace(dit_cfg, step_embedding=False, guidance_embedding=False,
                             causal_frames=causal)


def trained_whole(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Modules a LoRA run trains whole beside its adapters: the camera input
  (`model.camera_control`), which a base imported or trained without it lacks."""
  return ("camera_proj",) if configs.typed(config).model.camera_control else ()


def state_params(config: ml_collections.ConfigDict, params: Any) -> Any:
  """The part of a model's parameters (or of a tree shaped like them) the train state
  holds: all of them, or a LoRA run's adapters (and `trained_whole`)."""
  if not configs.typed(config).lora.rank:
    return params
  return split_adapters(params, trained_whole(config))[0]


def base_part(config: ml_collections.ConfigDict, params: Any) -> Any:
  """The fixed rest of a LoRA run's parameters (everything the state does not hold);
  empty for other runs."""
  if not configs.typed(config).lora.rank:
    return {}
  return split_adapters(params, trained_whole(config))[1]


def abstract_model(config: ml_collections.ConfigDict, vocab_size: int) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph definition and abstract parameters (no memory allocated), traced
  once per `model_spec` in a process (`models.abstract.abstract_module`); the parameters
  are the caller's own copy."""
  spec = model_spec(config, vocab_size)
  return abstract_module(("sora_model", spec), lambda: build_from_spec(spec, nnx.Rngs(0)),
                         nnx.Param)


def create_train_state(config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh,
                       tx: optax.GradientTransformation, params: Any | None = None, *,
                       model: tuple[nnx.GraphDef, nnx.State] | None = None,
                       shardings: TrainState | None = None,
                       ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """Initialises the train state directly in its sharded layout.

  `params`: start from these parameters (a pure dict laid out like `state_params`, e.g.
  pretrained weights, see `restore.initial_params`) instead of a random initialisation
  (a LoRA run's adapters start as `models.lora` initialises them).
  `model` (`abstract_model`'s result) and `shardings` (`train_state_shardings`'s), when
  the caller has them, save tracing the model again.

  Returns:
    `(graphdef, state, shardings)`; `shardings` mirrors `state` with `NamedSharding`s.
  """
  graphdef, abstract = model or abstract_model(config, vocab_size)
  if shardings is None:
    shardings = train_state_shardings(config, vocab_size, mesh, tx, abstract=abstract)

  def init(seed_key: jax.Array, params: Any | None) -> TrainState:
    if params is None:
      params = state_params(config, initial_model_params(config, vocab_size, seed_key))
    params = stored_params(config, params)
    return {"params": params, "opt_state": tx.init(params),
            "ema": cast_floats(optim.ema_params(params, config), jnp.float32),
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.fold_in(seed_key, 1)}

  state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(config.seed), params)
  return graphdef, state, shardings


def initial_model_params(config: ml_collections.ConfigDict, vocab_size: int,
                         seed_key: jax.Array) -> Any:
  """The model's random initialisation from `seed_key` (`PRNGKey(config.seed)`), as a
  pure dict: the same base weights with or without adapters."""
  model = build_model(config, vocab_size, nnx.Rngs(jax.random.fold_in(seed_key, 0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def cast_floats(tree: Any, dtype: Any) -> Any:
  """Floating leaves of `tree` (arrays or `ShapeDtypeStruct`s) in `dtype` (mixed-precision
  compute, and how the train state stores parameter groups)."""
  dtype = jnp.dtype(dtype)

  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)
  return jax.tree.map(cast, tree)


def stored_params(config: ml_collections.ConfigDict, params: Any) -> Any:
  """`params` (arrays or `ShapeDtypeStruct`s) as the train state keeps them: the floating
  leaves of the `optim.frozen` groups in `optim.frozen_dtype` and those of the trainable
  groups in `optim.param_dtype`, where set (bfloat16 halves their bytes; with
  `train.compute_dtype` bfloat16 the step reads them in that dtype anyway); as given
  otherwise."""
  o, frozen = configs.typed(config).optim, optim.frozen_groups(config)
  dtypes = {k: o.frozen_dtype if k in frozen else o.param_dtype for k in params}
  return {k: cast_floats(v, dtypes[k]) if dtypes[k] else v for k, v in params.items()}


def optimizer_shardings(tx: optax.GradientTransformation, param_shapes: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of `tx`'s state: moments like their parameters, everything else replicated."""
  abstract_opt = jax.eval_shape(tx.init, param_shapes)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                               transform_non_params=lambda _: replicated(mesh))


def with_shardings(shapes: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct`s of `shapes` carrying `shardings` (a restore target)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


def host_groups(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Frozen parameter groups the train step never reads, which the train state keeps in
  host memory ("pinned_host") instead of the accelerator's: the text encoder when the step
  reads cached text states (`data.latents_dir` with `data.cache_text`; the empty caption's
  states are computed once, `train.step.null_text_states`)."""
  t = configs.typed(config)
  cached_text = t.data.latents_dir and t.data.cache_text and t.data.grouping != "pack"
  return ("text_encoder",) if cached_text and "text_encoder" in t.optim.frozen else ()


def train_state_shardings(config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh,
                          tx: optax.GradientTransformation, *,
                          abstract: nnx.State | None = None,
                          host_memory: bool = True) -> TrainState:
  """Shardings of the train state: params, EMA (trainable groups) and optimiser moments
  alike; scalars replicated; the `host_groups` in host memory unless `host_memory` is
  False (what reading a checkpoint for sampling wants). `abstract`: the model's abstract
  parameters, when the caller has them."""
  if abstract is None:
    _, abstract = abstract_model(config, vocab_size)
  params = state_params(config, model_shardings(config, mesh, abstract, host_memory))
  shapes = state_params(config, array_shapes(abstract))
  frozen = optim.frozen_groups(config)
  if frozen:   # the state covers the trainable groups only (see optim.make_optimizer)
    opt = optimizer_shardings(optim.base_optimizer(config.optim, config.train.steps),
                              optim.trainable(shapes, frozen),
                              optim.trainable(params, frozen), mesh)
  else:
    opt = optimizer_shardings(tx, shapes, params, mesh)
  return {"params": params, "opt_state": opt, "ema": optim.ema_params(params, config),
          "step": replicated(mesh), "rng": replicated(mesh)}


def model_shardings(config: ml_collections.ConfigDict, mesh: Mesh, abstract: nnx.State,
                    host_memory: bool = True) -> Any:
  """Shardings of all the model's parameters by the run's rules, the `host_groups` in
  host memory unless `host_memory` is False."""
  params = state_shardings(abstract, mesh, configs.sharding_rules(config))
  for group in host_groups(config) if host_memory else ():
    params[group] = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), params[group])
  return params


def base_shardings(config: ml_collections.ConfigDict, mesh: Mesh, abstract: nnx.State,
                   host_memory: bool = True) -> Any:
  """Shardings of a LoRA run's fixed base (`base_part` of `model_shardings`)."""
  return base_part(config, model_shardings(config, mesh, abstract, host_memory))


def stored_base(config: ml_collections.ConfigDict, base: Any) -> Any:
  """A LoRA run's base (arrays or `ShapeDtypeStruct`s) as the run keeps it: its floating
  leaves in `optim.frozen_dtype` when set, as given otherwise."""
  dtype = configs.typed(config).optim.frozen_dtype
  return cast_floats(base, dtype) if dtype else base


def abstract_train_state(shardings: TrainState, config: ml_collections.ConfigDict,
                         vocab_size: int, tx: optax.GradientTransformation, *,
                         abstract: nnx.State | None = None) -> TrainState:
  """`ShapeDtypeStruct`s with shardings of the train state: the target of a restore.
  `abstract`: the model's abstract parameters, when the caller has them."""
  if abstract is None:
    _, abstract = abstract_model(config, vocab_size)
  params = stored_params(config, state_params(config, array_shapes(abstract)))
  shapes = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
            "ema": cast_floats(optim.ema_params(params, config), jnp.float32),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  return with_shardings(shapes, shardings)
