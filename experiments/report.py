"""Shared output of the experiments: a markdown table on stdout and a JSON file."""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

Column = tuple[str, Callable[[dict[str, Any]], str]]   # (header, row -> cell text)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
  lines = ["| " + " | ".join(h for h, _ in columns) + " |",
           "| " + " | ".join("---" for _ in columns) + " |"]
  lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
  return "\n".join(lines)


def report(rows: Sequence[dict[str, Any]], columns: Sequence[Column], out: str,
           **meta: Any) -> None:
  """Prints the table and writes `{**meta, "rows": rows}` as JSON to `out`."""
  print("\n" + markdown_table(rows, columns))
  with open(out, "w", encoding="utf-8") as f:
    json.dump({**meta, "rows": rows}, f, indent=2)
  print(f"\nWrote {out}")


def pyplot():
  """matplotlib's pyplot on the file-only Agg backend, or None (saying so) without it."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("(no plot: matplotlib is not installed)")
    return None
  return plt


def save_figure(fig, path: str) -> str:
  """Lays out, writes and closes a figure; returns `path`."""
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  fig.clf()
  return path
