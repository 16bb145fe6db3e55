"""Surviving faults in training: non-finite steps, preemption notices.

* `keep_if_finite` (pure, inside the jitted step): a step whose loss or gradient is not
  finite leaves parameters, optimiser state and EMA as they were; step and RNG advance, so
  the next step sees the next batch.
* `NonFiniteGuard` (host): counts skipped steps from each step's metrics (read one step
  late, so dispatch stays asynchronous) and stops the run with a diagnosis after
  `limit` consecutive ones.
* `PreemptionNotice` (host): a SIGTERM handler (what a TPU VM receives before it is
  preempted) that the loop polls at step boundaries to checkpoint and exit.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging


def is_finite(*values: jax.Array) -> jax.Array:
  """Scalar bool: every value (e.g. the loss and the gradient norm) is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values]))


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite`, else `old`, leaf by leaf (two pytrees of one structure)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class NumericFault(RuntimeError):
  """Too many consecutive non-finite steps."""


class NonFiniteGuard:
  """Tracks skipped (non-finite) steps; raises `NumericFault` after `limit` in a row."""

  def __init__(self, limit: int):
    self.limit = limit
    self.total = 0
    self.streak = 0
    self.first_in_streak: int | None = None
    self.last_finite_loss = math.nan
    self.last_finite_step: int | None = None

  def update(self, step: int, metrics: dict[str, Any]) -> None:
    """Records the metrics of 1-based `step` (`skipped` 0/1 and `loss`)."""
    if float(metrics["skipped"]) > 0:
      self.total += 1
      self.streak += 1
      if self.first_in_streak is None:
        self.first_in_streak = step
      if self.streak >= self.limit:
        raise NumericFault(
            f"{self.streak} consecutive non-finite steps ({self.first_in_streak} to {step}; "
            f"step s trains on batch s of the data iterator); the last finite loss was "
            f"{self.last_finite_loss:.6g} at step {self.last_finite_step}. The parameters were "
            "left as they were before the first of them; the newest checkpoint predates "
            "the fault. Lower the learning rate, check the data of those batches, or raise "
            "train.max_nonfinite_steps.")
    else:
      self.streak, self.first_in_streak = 0, None
      self.last_finite_loss, self.last_finite_step = float(metrics["loss"]), step

  @property
  def in_fault(self) -> bool:
    return self.streak > 0


class PreemptionNotice:
  """Context manager: while active, SIGTERM sets `requested` instead of killing the process.

  Only the main thread can install signal handlers; elsewhere this is inactive (the
  Orbax preemption sync point still works on multi-host runs).
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self) -> "PreemptionNotice":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class FaultMonitor:
  """What both training loops do at each step boundary about faults.

  `observe(step, metrics)` after dispatching a step: the previous step's `skipped` and
  `loss` are read then (one step late, so the host does not wait for the device), and
  `settle()` reads the current one before a checkpoint, so that no checkpoint is written
  inside a run of non-finite steps. `preempted(step)` is true after SIGTERM or at Orbax's
  multi-host preemption sync point. Use it as a context manager (it installs the
  SIGTERM handler).
  """

  def __init__(self, checkpointer, limit: int):
    self.checkpointer = checkpointer
    self.guard = NonFiniteGuard(limit)
    self.notice = PreemptionNotice()
    self._pending: tuple[int, dict[str, Any]] | None = None

  def __enter__(self) -> "FaultMonitor":
    self.notice.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self.notice.__exit__(*exc)

  def observe(self, step: int, metrics: dict[str, Any]) -> None:
    self.settle()
    self._pending = (step, {"skipped": metrics["skipped"], "loss": metrics["loss"]})

  def settle(self) -> None:
    if self._pending is not None:
      step, metrics = self._pending
      self._pending = None
      self.guard.update(step, jax.device_get(metrics))

  def preempted(self, step: int) -> bool:
    return self.notice.requested or self.checkpointer.reached_preemption(step)

  def may_save(self) -> bool:
    """Whether a checkpoint may be written now (not inside a run of non-finite steps)."""
    self.settle()
    return not self.guard.in_fault

  def end_of_step(self, step: int, last_step: int, state: Any, iterator: Any) -> bool:
    """Checkpoints at the boundary after `step`; returns True when the run must stop.

    On a preemption notice: a forced checkpoint, then True. Otherwise a checkpoint on the
    interval and at `last_step`, unless inside a run of non-finite steps.
    """
    if self.preempted(step):
      self.settle()
      self.checkpointer.save(step, state, iterator, force=True)
      logging.warning("Preemption notice: saved step %d to %s; rerun to resume.", step,
                      self.checkpointer.directory)
      return True
    if (self.checkpointer.due(step) or step == last_step) and self.may_save():
      self.checkpointer.save(step, state, iterator, force=step == last_step)
    return False
