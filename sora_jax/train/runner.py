"""The one training-loop skeleton the trainers share (`train.loop` for the DiT,
`train.vae_loop` for the VAE): open the checkpointer, resume or start, then step with
fault handling, metrics, progress and checkpoints.

A trainer builds its mesh, data, state and jitted step (those differ), then calls
`resume_or_start` and `run_steps`; what differs inside the loop comes in as `Hooks`.
Every step `s` -> `s + 1`:
  local batch -> hooks.on_batch -> global batch -> jitted step -> FaultMonitor.observe
  at a log step: metrics (+ hooks.log_extra) to metrics.jsonl / TensorBoard, progress bar
  hooks.after_step (may replace the state, e.g. the VAE's final latent statistics)
  checkpoint on the interval and at the end; on a preemption notice a forced one, then stop
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sora_jax.configs import schema
from sora_jax.data.pipeline import to_global_batch
from sora_jax.data.sources import DataStats
from sora_jax.parallel.sharding import Rules
from sora_jax.train import workdir as wd
from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.faults import FaultMonitor
from sora_jax.train.metrics import MetricWriter, StepRate

State = Any
Batch = dict[str, np.ndarray]
StepFn = Callable[[State, Any], tuple[State, dict[str, Any]]]


def open_checkpointer(workdir: str, train: schema.TrainSection) -> Checkpointer:
  """The run's checkpointer, as `train.keep_checkpoints/checkpoint_every/async_checkpoints` say."""
  return Checkpointer(wd.checkpoint_dir(workdir), keep=train.keep_checkpoints,
                      every=train.checkpoint_every, async_save=train.async_checkpoints)


def resume_or_start(checkpointer: Checkpointer, iterator: Iterator[Batch], *,
                    target: Callable[[], State], start: Callable[[], State],
                    what: str) -> tuple[State, bool]:
  """`(state, resumed)`: the newest readable checkpoint restored into `target()` (abstract
  arrays with shardings; the data iterator's position is restored too), else `start()`."""
  restored = None
  if checkpointer.latest_step() is not None:
    restored = checkpointer.restore_latest(target(), iterator)   # falls back past bad ones
  if restored is None:
    return start(), False
  logging.info("Resumed %s from step %d of %s.", what, restored[0], checkpointer.directory)
  return restored[1], True


@dataclasses.dataclass
class Hooks:
  """What differs between trainers inside the loop (all optional).

  on_batch: sees each local batch before it is sharded (e.g. padding accounting).
  log_extra: extra metrics at a log step.
  postfix: progress-bar fields from the logged metrics.
  after_step: `(step done, state) -> state`, run before the step's checkpoint.
  """
  on_batch: Callable[[Batch], None] | None = None
  log_extra: Callable[[], dict[str, float]] | None = None
  postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None
  after_step: Callable[[int, State], State] | None = None


@dataclasses.dataclass
class RunResult:
  """What `run_steps` did: the final state, the last logged loss, `(step, loss)` per log
  step, whether a preemption notice stopped it before `total`, and non-finite steps skipped."""
  state: State
  loss: float
  history: list[tuple[int, float]]
  preempted: bool
  skipped_steps: int


def run_steps(state: State, iterator: Iterator[Batch], step_fn: StepFn, *, mesh: Mesh,
              rules: Rules, checkpointer: Checkpointer, workdir: str,
              train: schema.TrainSection, data_stats: DataStats, end: int, desc: str,
              progress: bool = True, hooks: Hooks | None = None) -> RunResult:
  """Steps from `state["step"]` to `end` (<= `train.steps`, the schedule's length).

  Raises `faults.NumericFault` after `train.max_nonfinite_steps` consecutive non-finite
  steps and `data.sources.DataError` when too many records were bad (`data_stats`); the
  checkpointer is waited for and closed either way.
  """
  hooks = hooks or Hooks()
  start = int(state["step"])
  writer = MetricWriter(workdir)
  history: list[tuple[int, float]] = []
  bar = tqdm(total=train.steps, initial=start, disable=not progress or jax.process_index(),
             desc=desc, dynamic_ncols=True)
  rate, loss, preempted = StepRate(start), math.nan, False
  monitor = FaultMonitor(checkpointer, train.max_nonfinite_steps)
  try:
    with monitor:
      for step in range(start, end):
        local_batch = data_stats.pop(next(iterator))
        if hooks.on_batch:
          hooks.on_batch(local_batch)
        state, metrics = step_fn(state, to_global_batch(local_batch, mesh, rules))
        done = step + 1
        monitor.observe(done, metrics)
        if done % train.log_every == 0 or done == end:
          metrics = jax.device_get(metrics)
          loss, steps_per_s = float(metrics["loss"]), rate(done)
          logged = {**metrics, "steps_per_second": steps_per_s,
                    "skipped_steps_total": float(monitor.guard.total), **data_stats.check(),
                    **(hooks.log_extra() if hooks.log_extra else {})}
          writer.write(done, logged)
          history.append((done, loss))
          bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{steps_per_s:.2f}",
                          **(hooks.postfix(logged) if hooks.postfix else {}))
          bar.update(done - bar.n)  # moves when the step has really run (dispatch is async)
        if hooks.after_step:
          state = hooks.after_step(done, state)
        if monitor.end_of_step(done, end, state, iterator):   # preempted: saved, stop
          preempted = done < train.steps
          break
  finally:
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  logging.info("Data: %s.", data_stats.summary())
  return RunResult(state, loss, history, preempted, monitor.guard.total)
