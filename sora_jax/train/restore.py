"""Model parameters of a run, for sampling and export.

A run's parameters come from its latest (or a given) training checkpoint — the EMA
weights by default — or from an export (`sora-jax export`): `<dir>/params`, an Orbax
checkpoint of the parameters alone, or `<dir>/model.safetensors`.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from sora_jax import configs
from sora_jax.interop import tensors
from sora_jax.models.tokenizer import Tokenizer
from sora_jax.parallel.sharding import make_mesh, state_shardings
from sora_jax.train import optim
from sora_jax.train import workdir as wd
from sora_jax.train.checkpoint import checkpoint_to_read
from sora_jax.models.lora import merge_trees, merged_weights
from sora_jax.train.state import (abstract_model, abstract_train_state, array_shapes, base_part,
                                  base_shardings, initial_model_params, stored_base,
                                  train_state_shardings, with_shardings)


class Restored(NamedTuple):
  """What `restore_params` reads: the run's config and tokenizer, the model's graph
  definition, its parameters (a pure dict, placed on the mesh) and their step."""
  config: ml_collections.ConfigDict
  tokenizer: Tokenizer
  graphdef: nnx.GraphDef
  params: Any
  step: int


def params_dir(workdir: str) -> str:
  """Where a params-only export keeps its Orbax checkpoint."""
  return os.path.join(os.path.abspath(workdir), "params")


def restore_params(workdir: str, step: int | None = None, *, ema: bool = True,
                   mesh: Mesh | None = None) -> Restored:
  """The parameters of a run or a params-only export, with what it takes to use them.

  Args:
    workdir: a training workdir, or a directory written by `export --to orbax-params`.
    step: the checkpoint to read (default: the latest).
    ema: the EMA weights (what sampling uses) rather than the raw parameters; the
      `optim.frozen` groups, which have no EMA, come from the parameters either way.
    mesh: where the parameters go, sharded by the run's rules (default: one device).

  A LoRA run's adapters are folded into the base they adapt (`base_params`): what comes
  back is the plain model, its parameters and its config (`lora.rank` 0). A DMD student's
  critic (`model.critic`) is left out: the student alone, its config without it.
  """
  config = wd.load_config(workdir)
  tokenizer = Tokenizer(wd.tokenizer_path(workdir))
  vocab = tokenizer.vocab_size
  mesh = mesh or make_mesh({"data": 1}, devices=jax.devices()[:1])
  graphdef, abstract = abstract_model(config, vocab)
  safetensors_file = os.path.join(workdir, "model.safetensors")
  if os.path.isdir(params_dir(workdir)) or os.path.isfile(safetensors_file):
    shardings = state_shardings(abstract, mesh, configs.sharding_rules(config))
    target = with_shardings(array_shapes(abstract), shardings)
    if os.path.isdir(params_dir(workdir)):
      with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(params_dir(workdir), target)
    else:
      checkpoint = tensors.SafetensorsCheckpoint(safetensors_file)
      names = tensors.dotted_names(target)
      missing = sorted(set(names) - checkpoint.names())
      if missing:
        raise tensors.CheckpointMismatch(f"{safetensors_file}: missing tensors {missing[:10]}")
      params = jax.tree.unflatten(jax.tree.structure(target), [
          jax.device_put(checkpoint.read(name).astype(a.dtype), a.sharding)
          for name, a in zip(names, jax.tree.leaves(target))])
    with open(os.path.join(workdir, "export.json"), encoding="utf-8") as f:
      return Restored(config, tokenizer, graphdef, params, int(json.load(f)["step"]))
  params, step = _checkpoint_params(workdir, config, vocab, mesh, abstract, step, ema)
  if configs.typed(config).lora.rank:   # adapters: folded into the base, a plain model
    base = base_params(config, vocab, mesh, abstract=abstract, host_memory=False)
    params = merged_weights(merge_trees(base, params), configs.typed(config).lora.scale)
    config = without_adapters(config)
    graphdef, _ = abstract_model(config, vocab)
  if configs.typed(config).model.critic:   # a DMD student: the student alone
    params = {k: v for k, v in params.items() if k != "critic"}
    config = without_critic(config)
    graphdef, _ = abstract_model(config, vocab)
  return Restored(config, tokenizer, graphdef, params, step)


def _checkpoint_params(workdir: str, config: ml_collections.ConfigDict, vocab: int,
                       mesh: Mesh, abstract: nnx.State, step: int | None,
                       ema: bool) -> tuple[Any, int]:
  """(the train state's parameters, EMA or raw, step) of a training checkpoint."""
  checkpointer, step = checkpoint_to_read(wd.checkpoint_dir(workdir), step)
  tx = optim.for_run(config)
  shardings = train_state_shardings(config, vocab, mesh, tx, abstract=abstract,
                                    host_memory=False)
  target = abstract_train_state(shardings, config, vocab, tx, abstract=abstract)
  # Only the weights are read (Orbax leaves the rest unread): not the optimiser's moments,
  # twice the parameters' bytes.
  state = checkpointer.restore(step, {k: target[k] for k in ("params", "ema")})
  checkpointer.close()
  return ({**state["params"], **state["ema"]} if ema else state["params"]), step


def restore_adapters(workdir: str, step: int | None = None, *, ema: bool = True
                     ) -> tuple[ml_collections.ConfigDict, Any, int]:
  """`(config, adapters, step)` of a LoRA run's checkpoint (its EMA by default): the
  `lora_a`/`lora_b` leaves (and the modules it trains whole, `state.trained_whole`), on
  one device. ValueError for a run without adapters."""
  config = wd.load_config(workdir)
  if not configs.typed(config).lora.rank:
    raise ValueError(f"{workdir!r} is no LoRA run (lora.rank is 0): it has no adapters.")
  vocab = Tokenizer(wd.tokenizer_path(workdir)).vocab_size
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  _, abstract = abstract_model(config, vocab)
  params, step = _checkpoint_params(workdir, config, vocab, mesh, abstract, step, ema)
  return config, params, step


def without_adapters(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `lora.rank` 0: the config of a LoRA run's merged weights."""
  config = copy.deepcopy(configs.filled(config))
  with config.unlocked():
    config.lora.rank = 0
  return config


def without_critic(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `model.critic` off: the config of a DMD student without its critic
  (what samples and is exported); `config` itself when it has none."""
  if not configs.typed(config).model.critic:
    return config
  config = copy.deepcopy(configs.filled(config))
  with config.unlocked():
    config.model.critic = False
  return config


def base_params(config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh, *,
                abstract: nnx.State | None = None, host_memory: bool = True) -> Any:
  """The fixed parameters a LoRA run's adapters adapt (`state.base_part`): those of
  `train.init_from` (checked against the model), or without one the model's random
  initialisation from `seed` (the one a run without adapters starts from); in
  `optim.frozen_dtype` when set, sharded by the run's rules (the `state.host_groups` in
  host memory unless `host_memory` is False). Empty for a run without adapters."""
  t = configs.typed(config)
  if not t.lora.rank:
    return {}
  if abstract is None:
    _, abstract = abstract_model(config, vocab_size)
  if t.train.init_from:
    params = initial_params(t.train.init_from, config, vocab_size, mesh, abstract=abstract)
  else:
    params = jax.jit(lambda key: base_part(config, initial_model_params(config, vocab_size, key)))(
        jax.random.PRNGKey(t.seed))
  return jax.device_put(stored_base(config, params),
                        base_shardings(config, mesh, abstract, host_memory))


def initial_params(init_from: str, config: ml_collections.ConfigDict, vocab_size: int,
                   mesh: Mesh, *, abstract: nnx.State | None = None) -> Any:
  """Parameters to start a run from (`train.init_from`): those of a run or an export
  (`restore_params`), checked against `config`'s model (`abstract`: its abstract
  parameters, when the caller has them; a LoRA run's model without its adapters) and
  placed in its shardings.

  A source without the camera input this config adds (`model.camera_control`: an import,
  or a run trained from text alone) gets the input's initialisation, zeros, so that the
  model starts out computing what the source computes. A source of one transformer for a
  config of two experts (`model.boundary`) starts both as that transformer (Wan 2.2's
  experts both began as Wan 2.1).

  Raises ValueError naming the first parameters whose shapes differ.
  """
  params = restore_params(init_from, mesh=mesh).params
  if abstract is None:
    _, abstract = abstract_model(config, vocab_size)
  want = without_adapter_leaves(config, array_shapes(abstract))
  params = with_new_camera_input(params, want)
  params = with_low_noise_expert(params, want)
  params = in_blocks_layout(params, want)
  check_init_from(init_from, params, want, "model")
  shardings = without_adapter_leaves(config, state_shardings(abstract, mesh,
                                                             configs.sharding_rules(config)))
  return jax.tree.map(lambda p, w, s: jax.device_put(p.astype(w.dtype), s), params, want,
                      shardings)


def with_new_camera_input(params: dict, want: dict) -> dict:
  """`params` with the zero-initialised camera input (`DiffusionTransformer.camera_proj`)
  of `want` (this config's parameter shapes) where the transformer of `params` has none;
  unchanged otherwise."""
  new = want.get("dit", {}).get("camera_proj")
  if new is None or "camera_proj" in params.get("dit", {}):
    return params
  zeros = jax.tree.map(lambda w: jax.numpy.zeros(w.shape, w.dtype), new)
  return {**params, "dit": {**params["dit"], "camera_proj": zeros}}


def with_low_noise_expert(params: dict, want: dict) -> dict:
  """`params` with a low-noise expert (`low_noise_dit`) copied from its transformer where
  `want` (this config's parameter shapes) has two experts and `params` one; unchanged
  otherwise."""
  if "low_noise_dit" not in want or "low_noise_dit" in params or "dit" not in params:
    return params
  return {**params, "low_noise_dit": jax.tree.map(jax.numpy.copy, params["dit"])}


def _one_subtree_per_layer(blocks: dict) -> bool:
  """Whether a transformer's `blocks` hold one subtree per layer (keys 0, 1, ...), not the
  scanned layout's stacked leaves (keys: the block's submodules)."""
  return bool(blocks) and all(str(k).isdigit() for k in blocks)


def in_blocks_layout(params: dict, want: dict) -> dict:
  """`params` with each transformer's blocks in the layout of `want` (this config's
  parameter shapes): stacked along a leading layer axis (`model.scan_layers`) or one
  subtree per layer, so that a run of either layout starts from one of the other (the
  same weights); unchanged where the layouts agree."""
  out = dict(params)
  for name, module in params.items():
    have = module.get("blocks") if isinstance(module, dict) else None
    need = want.get(name, {}).get("blocks") if isinstance(want.get(name), dict) else None
    if not have or not need or _one_subtree_per_layer(have) == _one_subtree_per_layer(need):
      continue
    if _one_subtree_per_layer(have):     # per layer -> stacked
      layers = [have[k] for k in sorted(have, key=lambda k: int(k))]
      blocks = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *layers)
    else:                                 # stacked -> per layer, keyed as `want` keys them
      blocks = {k: jax.tree.map(lambda x, i=int(k): x[i], have) for k in need}
    out[name] = {**module, "blocks": blocks}
  return out


def check_init_from(init_from: str, params: Any, want: Any, what: str) -> None:
  """Raises ValueError unless the parameters restored from `init_from` have the names and
  shapes of `want` (this config's, arrays or `ShapeDtypeStruct`s), naming the first
  that differ; `what` names the config's part in the message ("model", "vae.*")."""
  names, have = tensors.dotted_names(want), tensors.dotted_names(params)
  if names != have:
    raise ValueError(f"train.init_from={init_from!r}: its parameters "
                     f"{sorted(set(have) ^ set(names))[:8]} do not match this config's {what}.")
  wrong = [f"{n}: {a.shape} vs {b.shape}" for n, a, b in
           zip(names, jax.tree.leaves(params), jax.tree.leaves(want)) if a.shape != b.shape]
  if wrong:
    raise ValueError(f"train.init_from={init_from!r}: parameter shapes differ from this "
                     f"config's {what}: {wrong[:8]}")


def without_adapter_leaves(config: ml_collections.ConfigDict, tree: Any) -> Any:
  """A tree shaped like the model's parameters without a LoRA run's adapters."""
  return base_part(config, tree) if configs.typed(config).lora.rank else tree
