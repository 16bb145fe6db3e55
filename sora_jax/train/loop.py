"""Training the text-to-video model, flat: config -> mesh -> data -> abstract model ->
sharded init or resume -> jitted step -> the shared loop (`sora_jax.train.runner`)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from sora_jax import configs
from sora_jax.data.sources import DataStats
from sora_jax.parallel.sharding import make_mesh
from sora_jax.train import optim, workdir as wd
from sora_jax.train.autoencoders import make_autoencoder
from sora_jax.models.lora import merge_trees
from sora_jax.train.restore import base_params, initial_params
from sora_jax.train.runner import Hooks, open_checkpointer, resume_or_start, run_steps
from sora_jax.train.sources import run_data
from sora_jax.train.state import (abstract_model, abstract_train_state, create_train_state,
                                  train_state_shardings)
from sora_jax.train.step import make_train_step, null_text_states


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          stop_at: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` up to `config.train.steps`.

  Args:
    config: a training config (see `configs/`).
    workdir: where checkpoints, logs and the tokenizer live; an existing run resumes.
    progress: show a progress bar.
    stop_at: stop after this step (with a checkpoint), e.g. to fit a time slice; the
      learning-rate schedule still runs to `config.train.steps`.

  Returns:
    `{"step": final step, "loss": last logged loss, "history": [(step, loss), ...],
    "preempted": stopped by a preemption notice, "skipped_steps": non-finite steps,
    "data": a summary of skipped records and captions}` for the steps run in this call.

  Raises:
    sora_jax.train.faults.NumericFault: after `train.max_nonfinite_steps` consecutive
      non-finite steps (the newest checkpoint predates them).
    sora_jax.data.sources.DataError: more than `data.max_skipped_fraction` of the
      records read were bad.

  One flat function on purpose (big_vision's train loop): its sections read top down in
  the order a run starts; the loop itself is `runner.run_steps`.
  """
  # Config and workdir.
  configs.validate(config)
  config = configs.filled(config)   # missing keys (an older run's) at the schema's defaults
  t = configs.typed(config)
  if t.model.guidance_embedding:
    raise ValueError("model.guidance_embedding: the guidance-scale input of a student that "
                     "`sora-jax distill --config.distill.method=guidance` trains; the "
                     "diffusion loss of `sora-jax train` has no scale to give it.")
  wd.save_config(workdir, config)

  # Mesh.
  mesh = make_mesh(configs.mesh_shape(config))
  rules = configs.sharding_rules(config)

  # Data.
  init_from = t.train.init_from
  tokenizer, dataset, batch_padding = run_data(config, workdir, init_from, mesh)
  null_ids, null_mask = tokenizer.encode([""], t.data.text_length)
  iterator = iter(dataset)

  # Model, optimiser and state (initialised sharded, or restored): the model is traced
  # once, and its abstract parameters serve the shardings, the restore target and init.
  tx = optim.for_run(config)
  vocab = tokenizer.vocab_size
  graphdef, abstract = abstract_model(config, vocab)
  shardings = train_state_shardings(config, vocab, mesh, tx, abstract=abstract)
  # A LoRA run's fixed base (from init_from, or the seed's initialisation), outside the state.
  base = base_params(config, vocab, mesh, abstract=abstract)

  def start_fresh():
    params = (initial_params(init_from, config, vocab, mesh, abstract=abstract)
              if init_from and not t.lora.rank else None)
    return create_train_state(config, vocab, mesh, tx, params, model=(graphdef, abstract),
                              shardings=shardings)[1]

  checkpointer = open_checkpointer(workdir, t.train)
  state, _ = resume_or_start(
      checkpointer, iterator, what="the run", start=start_fresh,
      target=lambda: abstract_train_state(shardings, config, vocab, tx, abstract=abstract))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  # Cached text: the frozen encoder's states of the empty caption, computed once.
  null_text = (null_text_states(config, graphdef, merge_trees(base, state["params"]),
                                null_ids[0], null_mask[0])
               if t.data.latents_dir and t.data.cache_text else None)
  step_fn = make_train_step(config, graphdef, tx, shardings, mesh,
                            make_autoencoder(config.autoencoder), null_ids[0], null_mask[0],
                            null_text=null_text, base=base)

  # Loop.
  padding: list[float] = []   # batches' padding since the last log

  def padding_since_last_log() -> dict[str, float]:
    if not padding:
      return {}
    fraction = float(np.mean(padding))
    padding.clear()
    return {"padding_fraction": fraction}

  hooks = Hooks(
      on_batch=(lambda b: padding.append(batch_padding(b))) if batch_padding else None,
      log_extra=padding_since_last_log,
      postfix=lambda m: ({"padding": f"{m['padding_fraction']:.1%}"}
                         if "padding_fraction" in m else {}))
  data_stats = DataStats(t.data.max_skipped_fraction)
  result = run_steps(state, iterator, step_fn, mesh=mesh, rules=rules,
                     checkpointer=checkpointer, workdir=workdir, train=t.train,
                     data_stats=data_stats,
                     end=t.train.steps if stop_at is None else min(stop_at, t.train.steps),
                     desc=f"train ({num_params / 1e6:.2f}M {'adapter ' if t.lora.rank else ''}"
                          "params)", progress=progress,
                     hooks=hooks)
  return {"step": int(result.state["step"]), "loss": result.loss, "history": result.history,
          "preempted": result.preempted, "skipped_steps": result.skipped_steps,
          "data": data_stats.summary()}
