"""Orbax checkpoints of the train state and the Grain iterator.

Layout: `<workdir>/checkpoints/<step>/{state, data}`; `state` is the train-state pytree
(restored straight into the current mesh's shardings, so a run may resume on another
mesh), `data` holds one JSON file of iterator state per process.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps (asynchronously by default), keeps the last `keep`."""

  def __init__(self, directory: str, *, keep: int, every: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every,
            enable_async_checkpointing=async_save, create=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, iterator: grain.DatasetIterator | None = None,
           *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any,
              iterator: grain.DatasetIterator | None = None) -> Any:
    """Restores the state into `abstract_state`'s shapes and shardings (and the iterator)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
