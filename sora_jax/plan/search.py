"""Search over mesh shapes, remat policies, microbatching, and (when asked) attention
backends, splash blocks and scanned layers for the settings that fit a TPU slice.

Each candidate is a set of `--config.` overrides (a mesh over the slice's chips, a remat
policy, host offloading of the saved activations included; sequence sharding runs
attention as ring or as Ulysses attention, both tried; the batch in one or several
microbatches, `train.microbatches`, gradients accumulated; any further options, such as
`model.splash_block` or `model.scan_layers`); each is planned (`planner.plan`, the train step) and the
ones that fit are ranked by the bytes each chip moves off the chip per step (collectives,
plus the offloaded activations written to host and read back), then by memory per chip
(least first). Candidates the config refuses (a batch or a width that does not divide)
are listed with the reason.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Sequence

import jax
import ml_collections

from sora_jax.parallel.axes import MESH_AXES
from sora_jax.parallel.sharding import SEQUENCE_BACKENDS
from sora_jax.plan import planner
from sora_jax.plan.report import gib
from sora_jax.plan.topology import chip_of, topology_devices

REMATS = ("none", "dots", "dots_offload", "full")


def mesh_candidates(chips: int, axes: Sequence[str]) -> list[dict[str, int]]:
  """Every way to write `chips` as a product of sizes over `axes` (the others 1)."""
  divisors = [d for d in range(1, chips + 1) if chips % d == 0]
  out = []
  for sizes in itertools.product(divisors, repeat=len(axes)):
    product = 1
    for s in sizes:
      product *= s
    if product == chips:
      out.append({a: (dict(zip(axes, sizes)).get(a, 1)) for a in MESH_AXES})
  return out


def overrides(mesh: dict[str, int], remat: str, sequence_attention: str = "ring",
              microbatches: int = 1) -> dict[str, Any]:
  """The `--config.` overrides of one candidate (dotted key -> value);
  `sequence_attention` (ring or ulysses) when the mesh splits the sequence;
  `train.microbatches` when more than one."""
  out = {f"mesh.{a}": s for a, s in mesh.items()}
  out["model.remat"] = remat
  if mesh.get("sequence", 1) > 1:
    out["model.attention"] = sequence_attention
  if microbatches > 1:
    out["train.microbatches"] = microbatches
  return out


def candidates(chips: int, axes: Sequence[str], remats: Sequence[str],
               microbatches: Sequence[int] = (1,),
               options: dict[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
  """The overrides of every candidate: each mesh, remat policy and microbatch count, each
  of `SEQUENCE_BACKENDS` for meshes that split the sequence, and each combination of
  `options` (dotted key -> values tried, e.g. `model.splash_block`; `model.attention`
  applies to the meshes that do not split the sequence)."""
  options = dict(options or {})
  attention = options.pop("model.attention", None)
  keys = sorted(options)
  out = []
  for mesh, remat, count in itertools.product(mesh_candidates(chips, axes), remats,
                                              microbatches):
    for values in itertools.product(*(options[k] for k in keys)):
      chosen = dict(zip(keys, values))
      if mesh.get("sequence", 1) > 1:
        out += [{**overrides(mesh, remat, backend, count), **chosen}
                for backend in SEQUENCE_BACKENDS]
      else:
        out += [{**overrides(mesh, remat, microbatches=count), **chosen,
                 **({"model.attention": a} if a else {})} for a in (attention or [None])]
  return out


def search(config: ml_collections.ConfigDict, topology: str, *,
           axes: Sequence[str] = MESH_AXES, remats: Sequence[str] = REMATS,
           microbatches: Sequence[int] = (1,), options: dict[str, Sequence[Any]] | None = None,
           devices: list[jax.Device] | None = None) -> list[dict[str, Any]]:
  """Plans every candidate (`candidates`); returns rows `{"overrides", "fits",
  "memory_per_chip_bytes", "collective_bytes", "rank" (1 = best; None when it does not
  fit), "error"}`, best first."""
  chip_of(topology)
  unknown = set(axes) - set(MESH_AXES)
  if unknown or not axes:
    raise planner.PlanError(f"--search-axes: expected some of {list(MESH_AXES)}, "
                            f"got {list(axes)}.")
  bad = set(remats) - set(REMATS)
  if bad or not remats:
    raise planner.PlanError(f"--search-remat: expected some of {list(REMATS)}, "
                            f"got {list(remats)}.")
  if not microbatches or any(not isinstance(m, int) or m < 1 for m in microbatches):
    raise planner.PlanError(f"--search-microbatches: expected counts of at least 1, "
                            f"got {list(microbatches)}.")
  devices = topology_devices(topology) if devices is None else devices
  rows = []
  for changes in candidates(len(devices), axes, remats, microbatches, options):
    row = {"overrides": changes, "fits": False, "memory_per_chip_bytes": None,
           "collective_bytes": None, "host_offloaded_bytes": None, "rank": None,
           "error": None}
    try:
      candidate = copy.deepcopy(config)
      candidate.update_from_flattened_dict(changes)
      result = planner.plan(candidate, topology, "train", devices=devices)
    except ValueError as e:          # the config refuses this layout (divisibility, ...)
      row["error"] = str(e).splitlines()[0]
    else:
      train = result["programs"][0]
      row.update(fits=result["fits"], error=train["error"] and train["error"].splitlines()[0],
                 memory_per_chip_bytes=train["memory_per_chip_bytes"].get("total"),
                 collective_bytes=train["collectives"].get("total_bytes"),
                 host_offloaded_bytes=train["memory_per_chip_bytes"].get("host_offloaded", 0))
    rows.append(row)
  fitting = sorted((r for r in rows if r["fits"]),
                   key=lambda r: (r["collective_bytes"] + 2 * r["host_offloaded_bytes"],
                                  r["memory_per_chip_bytes"]))
  for rank, row in enumerate(fitting, 1):
    row["rank"] = rank
  return fitting + [r for r in rows if not r["fits"]]


def format_search(rows: list[dict[str, Any]], hbm_bytes: int) -> str:
  """The ranked candidates as a markdown table, and the best one as overrides."""
  lines = ["| rank | overrides | memory per chip | headroom | collectives per chip | "
           "offloaded to host per chip | |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    flags = " ".join(f"--config.{k}={v}" for k, v in r["overrides"].items())
    if r["fits"]:
      lines.append(f"| {r['rank']} | `{flags}` | {gib(r['memory_per_chip_bytes'])} | "
                   f"{1 - r['memory_per_chip_bytes'] / hbm_bytes:.0%} | "
                   f"{gib(r['collective_bytes'])} | {gib(r['host_offloaded_bytes'])} | fits |")
    else:
      reason = r["error"] or (f"needs {gib(r['memory_per_chip_bytes'])}"
                              if r["memory_per_chip_bytes"] else "does not fit")
      lines.append(f"| | `{flags}` | | | | | {reason[:160]} |")
  best = [r for r in rows if r["rank"] == 1]
  if best:
    lines += ["", "Best: " + " ".join(f"--config.{k}={v}" for k, v in best[0]["overrides"].items())]
  else:
    lines += ["", "No candidate fits."]
  return "\n".join(lines)
