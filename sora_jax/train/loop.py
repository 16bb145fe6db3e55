"""One flat training loop: mesh -> data -> abstract init -> sharded init -> jitted step -> resume -> loop."""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from sora_jax import configs
from sora_jax.data.pipeline import to_global_batch
from sora_jax.data.sources import DataStats, source_captions
from sora_jax.parallel.distributed import sync
from sora_jax.parallel.sharding import make_mesh
from sora_jax.train import optim, workdir as wd
from sora_jax.train.autoencoders import make_autoencoder
from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.faults import FaultMonitor
from sora_jax.train.metrics import MetricWriter, StepRate
from sora_jax.train.restore import initial_params
from sora_jax.train.sources import make_dataset, training_source
from sora_jax.train.state import (abstract_model, abstract_train_state, create_train_state,
                                  train_state_shardings)
from sora_jax.train.step import make_train_step


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
  """
  # Config and workdir.
  configs.validate(config)
  config = configs.filled(config)   # missing keys (an older run's) at the schema's defaults
  t = configs.typed(config)
  wd.save_config(workdir, config)

  # Mesh.
  mesh = make_mesh(configs.mesh_shape(config))
  rules = configs.sharding_rules(config)

  # Data (process 0 writes the dataset and the tokenizer; the others then read them).
  init_from = t.train.init_from
  if jax.process_index() == 0:
    if init_from and not os.path.exists(wd.tokenizer_path(workdir)):   # a pretrained model's
      os.makedirs(workdir, exist_ok=True)
      shutil.copyfile(wd.tokenizer_path(init_from), wd.tokenizer_path(workdir))
    wd.ensure_tokenizer(workdir, config, source_captions(training_source(config)))
  sync("sora_jax_data_ready")
  source = training_source(config)
  tokenizer = wd.ensure_tokenizer(workdir, config, [])
  null_ids, null_mask = tokenizer.encode([""], config.data.text_length)
  dataset, batch_padding = make_dataset(config, source, tokenizer)
  iterator = iter(dataset)

  # Model, optimiser and state (initialised sharded, or restored).
  tx = optim.make_optimizer(config.optim, config.train.steps)
  checkpointer = Checkpointer(wd.checkpoint_dir(workdir), keep=config.train.keep_checkpoints,
                              every=config.train.checkpoint_every,
                              async_save=config.train.async_checkpoints)
  restored = None
  if checkpointer.latest_step() is not None:
    shardings = train_state_shardings(config, tokenizer.vocab_size, mesh, tx)
    target = abstract_train_state(shardings, config, tokenizer.vocab_size, tx)
    restored = checkpointer.restore_latest(target, iterator)   # falls back past bad ones
  if restored is None:
    params = initial_params(init_from, config, tokenizer.vocab_size, mesh) if init_from else None
    graphdef, state, shardings = create_train_state(config, tokenizer.vocab_size, mesh, tx,
                                                    params)
  else:
    graphdef, _ = abstract_model(config, tokenizer.vocab_size)
    state = restored[1]
    logging.info("Resumed from step %d of %s.", restored[0], workdir)
  start = int(state["step"])
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  step_fn = make_train_step(config, graphdef, tx, shardings, mesh,
                            make_autoencoder(config.autoencoder), null_ids[0], null_mask[0])

  # Loop.
  writer = MetricWriter(workdir)
  history: list[tuple[int, float]] = []
  bar = tqdm(total=config.train.steps, initial=start, disable=not progress or jax.process_index(),
             desc=f"train ({num_params / 1e6:.2f}M params)", dynamic_ncols=True)
  rate, loss = StepRate(start), math.nan
  end = config.train.steps if stop_at is None else min(stop_at, config.train.steps)
  padding: list[float] = []   # batches' padding since the last log
  preempted = False
  monitor = FaultMonitor(checkpointer, t.train.max_nonfinite_steps)
  data_stats = DataStats(t.data.max_skipped_fraction)
  try:
    with monitor:
      for step in range(start, end):
        local_batch = data_stats.pop(next(iterator))
        if batch_padding is not None:
          padding.append(batch_padding(local_batch))
        state, metrics = step_fn(state, to_global_batch(local_batch, mesh, rules))
        done = step + 1
        monitor.observe(done, metrics)
        if done % config.train.log_every == 0 or done == end:
          metrics = jax.device_get(metrics)
          loss, steps_per_s = float(metrics["loss"]), rate(done)
          extra = {"steps_per_second": steps_per_s,
                   "skipped_steps_total": float(monitor.guard.total), **data_stats.check()}
          if padding:
            extra["padding_fraction"] = float(np.mean(padding))
            padding.clear()
          writer.write(done, {**metrics, **extra})
          history.append((done, loss))
          bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{steps_per_s:.2f}",
                          **({"padding": f"{extra['padding_fraction']:.1%}"}
                             if "padding_fraction" in extra else {}))
          bar.update(done - bar.n)  # moves when the step has really run (dispatch is async)
        if monitor.end_of_step(done, end, state, iterator):   # preempted: saved, stop
          preempted = True
          break
  finally:
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  logging.info("Data: %s.", data_stats.summary())
  return {"step": int(state["step"]), "loss": loss, "history": history,
          "preempted": preempted, "skipped_steps": monitor.guard.total,
          "data": data_stats.summary()}
