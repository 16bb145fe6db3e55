"""TPU slices to compile for without owning one.

`libtpu` (the `jax[tpu]` extra, installable on any Linux x86 machine) carries XLA's TPU
compiler; `jax.experimental.topologies` gives the devices of a named slice
("v5p:2x2x2", "v6e:2x4", "v4:2x2x1", "v5e:4x4") to build a `Mesh` from, and
`jit(...).lower(...).compile()` compiles for them without touching a TPU. One process
at a time may load libtpu (its lock file, `LOCK_FILE`; `ALLOW_MULTIPLE_LIBTPU_LOAD=1` lifts
it).

Per-chip figures are the public specifications of each generation (HBM capacity and
dense bfloat16 peak), used for "does it fit" and the MFU bound of a step-time estimate.
Plans are per device: where a chip is more than one device (v4's topologies list its two
TensorCores as devices, each with half the chip's HBM; the compiler refuses a v4 program
over 15.25 GiB), `chip_of` gives one device's share.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import jax

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: its name in topology strings, HBM bytes and bf16 peak FLOP/s, and how
  many devices a topology lists per chip."""
  name: str
  hbm_bytes: int
  peak_bf16_flops: float
  devices_per_chip: int = 1

  def per_device(self) -> "Chip":
    """One device's share of the chip (the chip itself when it is one device)."""
    n = self.devices_per_chip
    return dataclasses.replace(self, hbm_bytes=self.hbm_bytes // n,
                               peak_bf16_flops=self.peak_bf16_flops / n, devices_per_chip=1)


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, devices_per_chip=2),
    "v5e": Chip("v5e", 16 * GiB, 197e12),
    "v5p": Chip("v5p", 95 * GiB, 459e12),
    "v6e": Chip("v6e", 32 * GiB, 918e12),
}


class PlanError(ValueError):
  """A plan cannot be made: unknown topology, libtpu missing, unsupported config."""


def chip_of(topology: str) -> Chip:
  """One device of a topology name "<chip>:<AxBxC>", e.g. "v5p:2x2x2" -> a v5p chip,
  "v4:2x2x1" -> a v4 TensorCore (half a v4 chip; module docstring)."""
  match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", topology)
  if not match or match.group(1) not in CHIPS:
    raise PlanError(f"--topology {topology!r}: expected <chip>:<AxB[xC]> with chip one of "
                    f"{sorted(CHIPS)}, e.g. v5p:2x2x2 or v6e:2x4.")
  return CHIPS[match.group(1)].per_device()


LOCK_FILE = "/tmp/libtpu_lockfile"     # libtpu's: one process at a time loads it


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of the named TPU slice (no TPU needed; libtpu's compiler is)."""
  chip_of(topology)
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # jax raises RuntimeError/ValueError/JaxRuntimeError here
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if importlib.util.find_spec("libtpu") is None:
      raise PlanError(f"compiling for TPU needs libtpu: pip install 'jax[tpu]=={jax.__version__}' "
                      f"({message})") from e
    if "libtpu_lockfile" in message:
      raise PlanError(f"--topology {topology!r}: another process has loaded libtpu (its lock "
                      f"file {LOCK_FILE}), e.g. a training run started without "
                      "JAX_PLATFORMS=cpu on a machine with no TPU; run this after it, or "
                      "with ALLOW_MULTIPLE_LIBTPU_LOAD=1.") from e
    raise PlanError(f"--topology {topology!r}: {message}") from e
  return list(description.devices)
