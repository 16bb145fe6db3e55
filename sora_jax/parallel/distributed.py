"""Multi-process (multi-host) initialisation.

On TPU pods `jax.distributed.initialize()` finds its peers by itself; elsewhere the
coordinator and this process's rank come from the environment:

  SORA_JAX_COORDINATOR    host:port of process 0 (e.g. 127.0.0.1:12345)
  SORA_JAX_NUM_PROCESSES  number of processes
  SORA_JAX_PROCESS_ID     this process's rank
  SORA_JAX_DISTRIBUTED=1  call `jax.distributed.initialize()` with no arguments (TPU pods,
                          SLURM/Open MPI clusters that JAX detects)

On CPU the collectives between processes go through gloo.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils


def initialize_from_env() -> bool:
  """Initialises `jax.distributed` when the environment asks for it; returns whether it did."""
  coordinator = os.environ.get("SORA_JAX_COORDINATOR")
  if coordinator:
    initialize(coordinator, int(os.environ["SORA_JAX_NUM_PROCESSES"]),
               int(os.environ["SORA_JAX_PROCESS_ID"]))
    return True
  if os.environ.get("SORA_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()
    return True
  return False


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """`jax.distributed.initialize` with gloo collectives when running on CPU."""
  if os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def sync(name: str) -> None:
  """Barrier across all processes (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
