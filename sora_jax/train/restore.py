"""Model parameters of a run, for sampling and export.

A run's parameters come from its latest (or a given) training checkpoint — the EMA
weights by default — or from an export (`sora-jax export`): `<dir>/params`, an Orbax
checkpoint of the parameters alone, or `<dir>/model.safetensors`.
"""

from __future__ import annotations

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
from sora_jax.train.state import (abstract_model, abstract_train_state, array_shapes,
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
  checkpointer, step = checkpoint_to_read(wd.checkpoint_dir(workdir), step)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  shardings = train_state_shardings(config, vocab, mesh, tx, abstract=abstract,
                                    host_memory=False)
  state = checkpointer.restore(step, abstract_train_state(shardings, config, vocab, tx,
                                                          abstract=abstract))
  checkpointer.close()
  params = {**state["params"], **state["ema"]} if ema else state["params"]
  return Restored(config, tokenizer, graphdef, params, step)


def initial_params(init_from: str, config: ml_collections.ConfigDict, vocab_size: int,
                   mesh: Mesh, *, abstract: nnx.State | None = None) -> Any:
  """Parameters to start a run from (`train.init_from`): those of a run or an export
  (`restore_params`), checked against `config`'s model (`abstract`: its abstract
  parameters, when the caller has them) and placed in its shardings.

  Raises ValueError naming the first parameters whose shapes differ.
  """
  params = restore_params(init_from, mesh=mesh).params
  if abstract is None:
    _, abstract = abstract_model(config, vocab_size)
  want = array_shapes(abstract)
  names, have = tensors.dotted_names(want), tensors.dotted_names(params)
  if names != have:
    raise ValueError(f"train.init_from={init_from!r}: its parameters "
                     f"{sorted(set(have) ^ set(names))[:8]} do not match this config's model.")
  wrong = [f"{n}: {a.shape} vs {b.shape}" for n, a, b in
           zip(names, jax.tree.leaves(params), jax.tree.leaves(want)) if a.shape != b.shape]
  if wrong:
    raise ValueError(f"train.init_from={init_from!r}: parameter shapes differ from this "
                     f"config's model: {wrong[:8]}")
  shardings = state_shardings(abstract, mesh, configs.sharding_rules(config))
  return jax.tree.map(lambda p, w, s: jax.device_put(p.astype(w.dtype), s), params, want,
                      shardings)
