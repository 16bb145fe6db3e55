"""ShapesBench over long videos: per-second curves, how long identity holds, and drift.

A minute of the procedural world keeps its objects: their number, colours and shapes never
change, and they move at constant velocity with elastic wall bounces. `per_second` scores
every second of a uint8 video `[T, H, W, 3]` on its own with `bench.video_metrics` against
the prompt's objects; the curves are those scores over seconds:

  count, colour, shape   the prompted number of objects, each prompted colour present, each
                         track of the prompted shape (1 or 0 per second; shape None when no
                         object is seen apart from others that second)
  hallucinated_frames    share of the second's frames with an extra or a missing object
  appear_vanish          objects popping in or out within the second
  permanence             occlusions within the second after which the same track goes on
                         (track continuity; None without an occlusion)
  physics                pixels per frame between each track and the best constant-velocity
                         path with bounces over the second

`identity_held` is the share of seconds whose count, colours and shapes are all right;
`drift` compares the last second with the first ten (relative, signed so that positive is
worse), the measure of a long generation slowly losing the world.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sora_jax.data.world import WorldConfig
from sora_jax.evaluation.bench import PromptObject, video_metrics

# Curves, and whether higher is better.
CURVES = {"count": True, "colour": True, "shape": True, "hallucinated_frames": False,
          "appear_vanish": False, "permanence": True, "physics": False}
BASELINE_SECONDS = 10


def per_second(video: np.ndarray, prompt: Sequence[PromptObject], world: WorldConfig,
               fps: int) -> list[dict[str, Any]]:
  """`bench.video_metrics` of each whole second of `video [T, H, W, 3]` (T // fps rows)."""
  seconds = len(video) // fps
  if seconds < 1:
    raise ValueError(f"a video of {len(video)} frames holds no whole second at {fps} fps.")
  return [video_metrics(video[s * fps:(s + 1) * fps], prompt, world) for s in range(seconds)]


def curves(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """`{curve: [seconds] float}` of `per_second` rows (NaN where a metric is None)."""
  return {name: np.asarray([np.nan if r[name] is None else float(r[name]) for r in rows])
          for name in CURVES}


def identity_held(rows: Sequence[dict[str, Any]]) -> float:
  """Share of seconds in which the count, every colour and every seen shape are right."""
  held = [r["count"] == 1.0 and r["colour"] == 1.0 and r["shape"] in (None, 1.0) for r in rows]
  return float(np.mean(held))


def drift(curve: np.ndarray, higher_is_better: bool,
          baseline_seconds: int = BASELINE_SECONDS) -> float | None:
  """How much worse the last second is than the mean of the first `baseline_seconds`,
  relative to that mean (0.1: 10% worse; negative: better); None when either is
  undefined. A zero baseline of a lower-is-better curve compares absolute values."""
  base = curve[:baseline_seconds]
  base = base[~np.isnan(base)]
  last = curve[-1]
  if not len(base) or np.isnan(last):
    return None
  mean = float(base.mean())
  change = (mean - last) if higher_is_better else (last - mean)
  return float(change / abs(mean)) if abs(mean) > 1e-9 else float(change)


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Identity held, the mean of every curve over the seconds, and every curve's drift."""
  c = curves(rows)
  return {"seconds": len(rows), "identity_held": identity_held(rows),
          "mean": {k: (None if np.isnan(v).all() else float(np.nanmean(v))) for k, v in c.items()},
          "drift": {k: drift(v, CURVES[k]) for k, v in c.items()}}
