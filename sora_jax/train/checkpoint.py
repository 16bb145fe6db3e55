"""Orbax checkpoints of the train state and the Grain iterator.

Layout: `<workdir>/checkpoints/<step>/{state, data}`; `state` is the train-state pytree
(restored straight into the current mesh's shardings, so a run may resume on another
mesh), `data` holds one JSON file of iterator state per process. Saves are atomic
(Orbax writes to a temporary directory and renames it when complete), and
`restore_latest` falls back past unreadable checkpoints, moving them to
`<workdir>/checkpoints_invalid/` (never deleting anything).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from sora_jax.parallel.distributed import sync


class CheckpointError(RuntimeError):
  """No checkpoint of a run could be restored."""


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's handler of the train-state pytree. In a single-process run every replica of a
  replicated array lives in this process, so Orbax's replica-parallel writing (each
  replica writes a slice, for multi-host runs) gains nothing and costs an eager slice per
  device and array (measured: 1.1 s of each save of the tiny test run on 8 simulated
  devices); the first replica writes the whole array instead."""
  scalars, th = ocp.type_handlers.ScalarHandler(), ocp.type_handlers
  registry = th.create_type_handler_registry(
      (int, scalars), (float, scalars), (bytes, scalars), (np.number, scalars),
      (np.ndarray, th.NumpyHandler()), (str, th.StringHandler()),
      (jax.Array, th.ArrayHandler(use_replica_parallel=jax.process_count() > 1)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
  """Saves every `every` steps (asynchronously by default), keeps the last `keep`."""

  def __init__(self, directory: str, *, keep: int, every: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = _state_handler()
    handlers.add("state", ocp.args.PyTreeSave, state_handler)
    handlers.add("state", ocp.args.PyTreeRestore, state_handler)
    handlers.add("data", grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointHandler)
    handlers.add("data", grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler)
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every,
            enable_async_checkpointing=async_save, create=True),
        handler_registry=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would write (the interval, or a preemption)."""
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True at JAX's preemption sync point of a multi-host run (Orbax)."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state: Any, iterator: grain.DatasetIterator | None = None,
           *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved."""
    items = {"state": ocp.args.PyTreeSave(state)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any,
              iterator: grain.DatasetIterator | None = None) -> Any:
    """Restores the state into `abstract_state`'s shapes, dtypes and shardings (and the
    iterator). Arrays the checkpoint has and `abstract_state` lacks are left unread
    (checkpoints written before the EMA left out frozen groups keep working); an array
    `abstract_state` needs and the checkpoint lacks is an error."""
    items = {"state": ocp.args.PyTreeRestore(
        abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        partial_restore=True)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_latest(self, abstract_state: Any, iterator: grain.DatasetIterator | None = None
                     ) -> tuple[int, Any] | None:
    """`(step, state)` of the newest checkpoint that restores into `abstract_state`, or None
    when there is none.

    A checkpoint that cannot be restored (truncated or missing files, another model size
    or config) is reported by name and moved to `<directory>_invalid/<step>`; the next
    older one is tried. Raises `CheckpointError` listing every failure when none restores.
    """
    failures = []
    for step in sorted(self.manager.all_steps(read=True), reverse=True):
      try:
        return step, self.restore(step, abstract_state, iterator)
      except Exception as e:  # Orbax/TensorStore raise many types for bad checkpoints
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        failures.append(f"step {step} ({reason})")
        logging.warning("Checkpoint %s/%d cannot be restored (%s); trying an older one.",
                        self.directory, step, reason)
        self._set_aside(step)
    if failures:
      raise CheckpointError(f"no checkpoint in {self.directory} could be restored into this "
                            f"config's state: {'; '.join(failures)}. They were moved to "
                            f"{self.directory}_invalid/.")
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      target = os.path.join(f"{self.directory}_invalid", str(step))
      suffix = 0
      while os.path.exists(target + (f".{suffix}" if suffix else "")):
        suffix += 1
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)),
                  target + (f".{suffix}" if suffix else ""))
    sync(f"sora_jax_checkpoint_set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def checkpoint_to_read(directory: str, step: int | None = None, *,
                       advice: str = "train first") -> tuple[Checkpointer, int]:
  """A checkpointer for reading a finished or running run's checkpoints in `directory`
  and the step to read: `step`, or the latest. Raises FileNotFoundError naming the
  directory (and `advice`) when it holds none; close the checkpointer after reading."""
  checkpointer = Checkpointer(directory, keep=1, every=1, async_save=False)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    checkpointer.close()
    raise FileNotFoundError(f"no checkpoint in {directory}: {advice}.")
  return checkpointer, step
