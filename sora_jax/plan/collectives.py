"""The collectives of a compiled program, read from its optimised HLO text (and the host
memory its layer loop keeps, `host_loop_bytes`).

For each kind (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute)
the count of executions per call of the program and the bytes they move per chip. A
collective inside a `while` body (the scanned layers, XLA's windowed einsum loops)
counts once per iteration when the trip count is known (the compiler's
`known_trip_count`, or a loop condition `i < N`); otherwise once, and the computation
holding the loop is listed in `unknown_trip_counts`.

Bytes of one execution are those of its larger side (summed over the buffers XLA
combines into one collective): the gathered result of an
all-gather, the input of a reduce-scatter (its result times the replica group), the
buffer of an all-reduce, all-to-all or collective-permute.
"""

from __future__ import annotations

import collections
import re
from typing import Any

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*[(].*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"\b(condition|body|to_apply|calls|branch_computations)="
                    r"(?:\{([^}]*)\}|%?([\w.\-]+))")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _bytes(shape_text: str) -> list[int]:
  """Bytes of each array shape in `shape_text` (a result type, maybe a tuple)."""
  out = []
  for dtype, dims in _SHAPE.findall(shape_text):
    if dtype in _DTYPE_BYTES:
      out.append(_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d])))
  return out


def _group_size(rest: str) -> int:
  """Devices per replica group of a collective: `replica_groups={{0,1},{2,3}}`,
  `replica_groups=[2,4]<=[8]` (iota: 2 groups of 4) or `replica_groups=mesh['a'=2,'b'=4]
  {'b'}` (the listed axes)."""
  if (m := re.search(r"replica_groups=\{\{([\d,]*)\}", rest)):
    return len([d for d in m.group(1).split(",") if d])
  if (m := re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)):
    return int(m.group(2))
  if (m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)):
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2))]))
  return 1


def _parse(hlo: str) -> tuple[dict[str, list[tuple[str, str, str]]], str | None]:
  """`{computation: [(opcode, result type, rest of line)]}` and the entry's name."""
  computations: dict[str, list[tuple[str, str, str]]] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line)   # a header starts at column 0; instructions are indented
    if match:
      current = match.group(2)
      computations[current] = []
      if match.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    inst = _INSTRUCTION.match(line)
    if inst:
      computations[current].append((inst.group(4), inst.group(3), inst.group(5)))
  return computations, entry


def _trip_from_condition(instructions: list[tuple[str, str, str]]) -> int | None:
  """The trip count of a counted loop from its condition `i < N` (one integer constant,
  a less-than compare; the form XLA gives scans and its own loops), else None."""
  constants = [rest for opcode, result, rest in instructions
               if opcode == "constant" and re.match(r"[su]\d+\[\]", result)]
  compares = [rest for opcode, _, rest in instructions if opcode == "compare"]
  if len(constants) == 1 and len(compares) == 1 and "direction=LT" in compares[0]:
    value = re.match(r"\s*(-?\d+)\)", constants[0])
    return int(value.group(1)) if value else None
  return None


def _multipliers(computations, entry) -> tuple[dict[str, int], list[str]]:
  """How many times each computation runs per call of the entry."""
  times: dict[str, int] = collections.defaultdict(int)
  unknown: list[str] = []

  def visit(name: str, count: int, depth: int = 0) -> None:
    if depth > 64 or name not in computations:
      return
    times[name] += count
    for opcode, _, rest in computations[name]:
      trip = 1
      if opcode == "while":
        found = _TRIP.search(rest)
        condition = re.search(r"condition=%?([\w.\-]+)", rest)
        trip = (int(found.group(1)) if found else
                _trip_from_condition(computations.get(condition.group(1), []))
                if condition else None)
        if trip is None:
          unknown.append(name)
          trip = 1
      for role, listed, single in _CALLS.findall(rest):
        for callee in (listed or single).replace("%", "").split(","):
          callee = callee.strip()
          if callee:
            visit(callee, count * (trip if role == "body" else 1), depth + 1)

  if entry is not None:
    visit(entry, 1)
  return times, unknown


def collectives(hlo: str) -> dict[str, Any]:
  """`{"kinds": {kind: {"count", "bytes"}}, "total_bytes", "unknown_trip_counts"}` of the
  optimised HLO text of one compiled program (`compiled.as_text()`), per chip per call."""
  computations, entry = _parse(hlo)
  times, unknown = _multipliers(computations, entry)
  kinds = {k: {"count": 0, "bytes": 0} for k in KINDS}
  for name, instructions in computations.items():
    runs = times.get(name, 0)
    if not runs:
      continue
    for opcode, result, rest in instructions:
      kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
      if kind not in kinds:
        continue
      sizes = _bytes(result)
      # A tuple result is several buffers combined into one collective (summed); an async
      # start's tuple holds operands and results alike (the largest one counts).
      combined = not opcode.endswith("-start") or kind == "all-reduce"
      size = (sum(sizes) if combined else max(sizes)) if sizes else 0
      if kind == "reduce-scatter":            # its input: the result times the group
        size *= _group_size(rest)
      kinds[kind]["count"] += runs
      kinds[kind]["bytes"] += runs * size
  return {"kinds": kinds, "total_bytes": sum(k["bytes"] for k in kinds.values()),
          "unknown_trip_counts": sorted(set(unknown))}


_HOST_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*\[[0-9,]*\])\{[^}]*S\(5\)[^}]*\}")


def host_loop_bytes(hlo: str) -> int:
  """Bytes per chip of the arrays a `while` loop carries in host memory (memory space
  S(5): the layer loop's remat residuals under an offloading policy), the largest over the
  program's loops. Each is written to host once in the forward pass and read back once
  in the backward pass."""
  computations, _ = _parse(hlo)
  return max((sum(_bytes(" ".join(_HOST_ARRAY.findall(result))))
              for instructions in computations.values()
              for opcode, result, _ in instructions if opcode == "while"), default=0)
