"""A plan as text: per-chip memory against HBM, collectives, FLOPs, and the verdict."""

from __future__ import annotations

import re
from typing import Any

from sora_jax.plan.collectives import KINDS
from sora_jax.plan.topology import GiB

_PARTS = (("parameters", "parameters"), ("optimizer", "optimiser state"), ("ema", "EMA"),
          ("kv_cache", "KV cache (streaming)"), ("temporary", "activations / temporaries"),
          ("output", "outputs"),
          ("alias", "  of which donated (reuse arguments)"), ("argument", "arguments"),
          ("total", "total"), ("host_offloaded", "host memory: offloaded residuals (not HBM)"),
          ("host_parameters", "host memory: frozen parameters the step never reads (not HBM)"))
_HOST_PARTS = ("host_offloaded", "host_parameters")   # shown when not zero


def gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


# The compiler's "Used X of Y hbm" (a refusal that itemises the heap).
_USED = re.compile(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm")


def needed_bytes(error: str) -> str:
  """"X of Y" from the compiler's out-of-memory message ("Used X of Y hbm", or "required
  ... (X) exceeds available HBM (Y)"), when present."""
  match = (_USED.search(error)
           or re.search(r"required[^(]*\(([\d.]+[KMGT]?)\) exceeds available HBM "
                        r"\(([\d.]+[KMGT]?)\)", error))
  return f"{match.group(1)} of {match.group(2)}" if match else ""


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _bytes(text: str) -> int:
  """XLA's human-readable size ("39.12G": binary units) -> bytes."""
  return round(float(text[:-1] if text[-1] in _UNITS else text) * _UNITS.get(text[-1], 1))


def heap_breakdown(error: str) -> dict[str, int] | None:
  """What a compile refused for HBM used, from the compiler's itemised message (a cap just
  under the need makes libtpu print it: "Used X of Y hbm", then "HLO temp X (... Unpadded
  (D) ..., P% fragmentation (F))"): bytes `used`, `available`, `temporaries`, `data` (the
  temporaries' live bytes, unpadded) and `fragmentation` (holes between them); None when
  the message does not itemise them (a first estimate, or another error)."""
  used = _USED.search(error)
  temps = re.search(r"HLO temp\s+([\d.]+[KMGT]?) \(.*?Unpadded \(([\d.]+[KMGT]?)\).*?"
                    r"fragmentation \(([\d.]+[KMGT]?)\)", error)
  if not used or not temps:
    return None
  return {"used": _bytes(used.group(1)), "available": _bytes(used.group(2)),
          "temporaries": _bytes(temps.group(1)), "data": _bytes(temps.group(2)),
          "fragmentation": _bytes(temps.group(3))}


def verdict(plan: dict[str, Any]) -> str:
  """One line: "fits on ..." or "does not fit on NAME: needs X GiB of Y; largest ..."."""
  hbm = plan["hbm_bytes"]
  if plan["fits"]:
    used = plan["memory_per_chip_bytes"]
    return (f"fits on {plan['topology']}: {gib(used)} of {gib(hbm)} per chip "
            f"({1 - used / hbm:.0%} headroom)")
  parts = []
  for program in plan["programs"]:
    if program["fits"]:
      continue
    buffers = ", ".join(f"{b['name']} {gib(b['bytes'])}" for b in program["largest_buffers"])
    if program["error"]:
      needs, heap = needed_bytes(program["error"]), heap_breakdown(program["error"])
      needs = (f"{needs} (compiler)" if needs
               else f"more than it has ({program['error'].splitlines()[0][:200]})")
      if heap:
        needs += (f", its temporaries {gib(heap['data'])} of data and "
                  f"{gib(heap['fragmentation'])} of fragmentation")
    else:
      needs = f"{gib(program['memory_per_chip_bytes']['total'])} of {gib(hbm)}"
    parts.append(f"{program['name']} needs {needs}; largest buffers: {buffers}")
  return f"does not fit on {plan['topology']}: " + " | ".join(parts)


def format_plan(plan: dict[str, Any]) -> str:
  """The plan as a short report (markdown tables)."""
  mesh = ", ".join(f"{k} {v}" for k, v in plan["mesh"].items() if v > 1) or "one device"
  lines = [f"Plan for {plan['topology']} ({plan['chips']} {plan['chip']} devices, "
           f"{gib(plan['hbm_bytes'])} HBM each); mesh: {mesh}", ""]
  for program in plan["programs"]:
    memory = program["memory_per_chip_bytes"]
    lines.append(f"{program['name']}: compiled in {program['compile_seconds']:.1f} s"
                 if not program["error"] else f"{program['name']}: refused by the compiler")
    if memory:
      lines += ["", "| per chip | bytes |", "|---|---|"]
      lines += [f"| {label} | {gib(memory[key])} |" for key, label in _PARTS
                if key in memory and (memory[key] or key not in _HOST_PARTS)]
    counts = program["collectives"].get("kinds", {})
    if counts:
      lines += ["", "| collective | per step | bytes per chip |", "|---|---|---|"]
      lines += [f"| {k} | {counts[k]['count']} | {gib(counts[k]['bytes'])} |" for k in KINDS
                if counts[k]["count"]]
      lines.append(f"| all | | {gib(program['collectives']['total_bytes'])} |")
    lines.append("")
  if plan["model_flops_per_step"]:
    lines.append(f"Model FLOPs per train step: {plan['model_flops_per_step']:.4g} "
                 f"({plan['model_flops_per_step'] / plan['chips']:.4g} per chip)")
  bound = plan.get("step_time_bound")
  if bound:
    mfu = bound["mfu_upper_bound"]
    lines.append(f"Step-time lower bound: {bound['seconds']:.3g} s per step ({bound['method']}; "
                 f"{bound['per_layer_seconds']:.3g} s per layer, "
                 f"{bound['attention_kernel_seconds']:.3g} s of attention kernel per layer, "
                 f"{bound['outside_seconds']:.3g} s outside the layers); MFU at most "
                 + (f"{mfu:.1%}" if mfu is not None else "not measured"))
  lines += [f"Note: {n}" for n in plan["notes"]]
  lines.append(verdict(plan))
  return "\n".join(lines)
