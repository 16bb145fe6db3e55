"""Step caching: skip the transformer's blocks at sampler evaluations where what they
add would barely change, reusing what they added at the last evaluation computed.

The rule is MagCache's (Ma et al., 2025, "MagCache: Fast Video Generation with
Magnitude-Aware Cache"): the residual the blocks add, `r_i` at evaluation i of a sampling
schedule, changes across evaluations mostly in magnitude, and the ratio of magnitudes
`|r_i| / |r_(i-1)|` follows a curve that depends on the model and the schedule but
hardly on the prompt. So the curve is calibrated once per model and schedule from a few
uncached runs (`magnitude_ratios` of the norms the sampler records) and stored with the
model; at sampling time it says where to skip:

  from the last computed evaluation on, each following one multiplies `ratio` by its
  calibrated magnitude ratio and adds `|1 - ratio|` to `error`; it is skipped (the last
  residual reused) while `error <= threshold` and at most `max_skips` evaluations in a
  row are skipped, otherwise computed (and `ratio`, `error` restart). The first
  `retain` share of the evaluations is always computed: the layout forms there.

The schedule depends on the calibration alone, so it is fixed before sampling
(`skip_schedule`) and the jitted loop picks each evaluation's branch with `lax.cond`
on it. Threshold 0 skips nothing. Pure functions over numpy arrays.
"""

from __future__ import annotations

import numpy as np

MAX_SKIPS = 2       # MagCache's K
RETAIN = 0.2        # MagCache's retention ratio


def magnitude_ratios(norms: np.ndarray) -> np.ndarray:
  """`[E]` mean over runs of `|r_i| / |r_(i-1)|` (1 at i = 0), from the residual norms
  `norms [R, E]` of R uncached runs of one schedule of E evaluations."""
  norms = np.asarray(norms, np.float64)
  if norms.ndim != 2 or norms.shape[1] < 1 or not np.all(np.isfinite(norms)):
    raise ValueError(f"norms: expected finite [runs, evaluations], got shape {norms.shape}.")
  ratios = np.ones(norms.shape[1])
  ratios[1:] = (norms[:, 1:] / np.maximum(norms[:, :-1], 1e-12)).mean(0)
  return ratios


def skip_schedule(ratios: np.ndarray, threshold: float, *, max_skips: int = MAX_SKIPS,
                  retain: float = RETAIN) -> np.ndarray:
  """`[E]` bool: which evaluations reuse the cached residual (see the module docstring)."""
  if threshold < 0 or max_skips < 0 or not 0.0 <= retain <= 1.0:
    raise ValueError(f"step caching: threshold={threshold} and max_skips={max_skips} must "
                     f"be >= 0 and retain={retain} in [0, 1].")
  ratios = np.asarray(ratios, np.float64)
  skip = np.zeros(ratios.shape[0], bool)
  ratio, error, skipped = 1.0, 0.0, 0
  for i in range(ratios.shape[0]):
    if i == 0 or i < retain * ratios.shape[0]:
      continue
    ratio *= ratios[i]
    error += abs(1.0 - ratio)
    if threshold > 0 and error <= threshold and skipped < max_skips:
      skip[i] = True
      skipped += 1
    else:
      ratio, error, skipped = 1.0, 0.0, 0
  return skip
