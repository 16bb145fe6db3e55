"""Metrics to a JSONL file and TensorBoard event files in the workdir (process 0 only)."""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
  """`write(step, {name: value})` appends to `<workdir>/metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
                     + "\n")
    self.jsonl.flush()
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, float(value), int(step))

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()


class StepRate:
  """Steps per second between successive calls (the first call measures from creation)."""

  def __init__(self, step: int):
    self.time, self.step = time.perf_counter(), step

  def __call__(self, step: int) -> float:
    now = time.perf_counter()
    rate = (step - self.step) / max(now - self.time, 1e-9)
    self.time, self.step = now, step
    return rate
