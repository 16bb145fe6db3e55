"""ShapesBench metrics: what a generated video of the procedural world gets right or wrong.

`video_metrics(video, prompt, world)` compares one uint8 video `[T, H, W, 3]` with the
objects its prompt names (`PromptObject`: colour, shape, direction, speed), through the
deterministic trackers of `sora_jax.evaluation.objects`. Each prompted object is the
longest track of its colour. Per video:

  colour        share of prompted objects with a track of their colour
  dominant_colour   for one-object prompts, whether the dominant colour is the prompted
                one: the skeleton demo's colour score (`evaluation.colour`), per video
  shape         ... whose track's most frequent shape class is the prompted shape (over
                objects seen apart from others at least once; None if there are none)
  direction     ... moving in the prompted direction over the first 4 frames
  count         whether the median number of objects per frame is the prompted count
  hallucinated_frames   share of frames with an extra object, or a missing one that no
                other object could be hiding (an extra = a detection of an unprompted
                colour, or a second object of a prompted colour)
  appear_vanish number of objects that appear after the first frame or vanish before the
                last where no other object covers them (the Sora failure of things
                popping in and out of existence)
  permanence    share of occlusions (a prompted object unseen for some frames while
                another object covers where it should be) after which the same track
                continues; None when the clip has none
  physics       mean distance in pixels per frame between each prompted track and the
                best constant-velocity motion with elastic wall bounces (least squares
                over its start and velocity, `world.simulate`), over frames where the
                object is whole
  size_stability   mean over prompted tracks of the coefficient of variation of the
                area over frames where it is whole (0 is perfectly stable)
  shape_stability  share of frames whose shape class is the track's majority one
  direction_leak   in prompts of several objects, the share of objects (of those whose
                prompted direction differs from another object's) that move in another
                object's prompted direction instead of their own: attributes bound to
                the wrong object (T2I-CompBench's attribute binding); None without such
                objects
  shape_leak    the same for shapes (of objects whose shape is read)
  flicker       mean absolute change of background pixels between consecutive frames,
                in levels of 255 (0 for a still background)

and, not averaged, `shapes_read`: per prompted object `(prompted shape, shape read or
None)`; `shape_confusion(rows)` counts them over videos (which shapes a model draws as
which: a model that draws every shape as a soft blob reads as all circles).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from scipy import optimize

from sora_jax.data.world import (PALETTE, WorldConfig, _shape_mask, camera_attributes,
                                 held_out, object_attributes, simulate)
from sora_jax.evaluation import colour as colour_lib
from sora_jax.evaluation import objects, tracking

DIRECTION_FRAMES = 4     # frames over which the direction of motion is read


@dataclasses.dataclass(frozen=True)
class PromptObject:
  colour: str
  shape: str
  direction: str
  speed: str = ""


def prompt_objects(example: dict[str, Any], world: WorldConfig) -> list[PromptObject]:
  """The objects of a world record (`render_example`), as a prompt names them."""
  return [PromptObject(**a) for a in object_attributes(example, world)]


def visibility(example: dict[str, Any], world: WorldConfig) -> np.ndarray:
  """`[K, T]` share of each object's pixels that no later-drawn object covers."""
  frames, height, width = np.asarray(example["video"]).shape[:3]
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
  count = int(example["num_objects"])
  out = np.zeros((count, frames))
  for f in range(frames):
    masks = [_shape_mask(world.shapes[int(example["shape"][k])], ys, xs,
                         *example["positions"][k, f], float(example["size"][k]))
             for k in range(count)]
    for k in range(count):
      visible = masks[k] & ~np.any(masks[k + 1:], axis=0) if k + 1 < count else masks[k]
      out[k, f] = visible.sum() / max(masks[k].sum(), 1)
  return out


def categories(example: dict[str, Any], world: WorldConfig) -> dict[str, bool]:
  """What a held-out clip tests: a held-out attribute combination (`world.holdout`), an
  occlusion (an object at least half hidden in some frame), a wall bounce."""
  steps = np.diff(np.asarray(example["positions"]), axis=1)        # [K, T-1, 2]
  bounce = bool((np.sign(steps[:, 1:]) * np.sign(steps[:, :-1]) < 0).any())
  return {"held_out": any(held_out(world, {**a, **camera_attributes(example)})
                          for a in object_attributes(example, world)),
          "occlusion": bool((visibility(example, world) < 0.5).any()), "bounce": bounce}


def fit_motion(positions: np.ndarray, radius: float, height: int, width: int
               ) -> tuple[np.ndarray, np.ndarray, float]:
  """The constant-velocity path with elastic wall bounces nearest `positions [T, 2]`
  (NaN rows ignored): `(path [T, 2], initial velocity [2], mean error in pixels over
  the given rows)`."""
  seen = ~np.isnan(positions[:, 0])
  idx = np.nonzero(seen)[0]
  frames = len(positions)
  if len(idx) < 2:
    return positions.copy(), np.zeros(2), 0.0
  velocity0 = (positions[idx[1]] - positions[idx[0]]) / (idx[1] - idx[0])
  start0 = positions[idx[0]] - velocity0 * idx[0]

  def path(x):
    start = np.clip(x[:2], radius, [width - radius, height - radius])
    return simulate(start, x[2:], radius, frames, height, width)

  def residual(x):
    return (path(x)[seen] - positions[seen]).ravel()

  best = None
  for guess in (np.concatenate([start0, velocity0]),
                np.concatenate([positions[idx[0]], np.zeros(2)])):
    fit = optimize.least_squares(residual, guess, method="lm" if seen.sum() * 2 >= 4 else "trf",
                                 diff_step=1e-3)
    if best is None or fit.cost < best.cost:
      best = fit
  fitted = path(best.x)
  error = float(np.mean(np.linalg.norm(fitted[seen] - positions[seen], axis=-1)))
  return fitted, best.x[2:], error


def _whole(track: objects.Track) -> np.ndarray:
  """`[T]` frames where the track shows (nearly) its whole object: apart from other
  objects, or at least 90% of its largest area."""
  areas = np.array([d.area if d else 0 for d in track.detections])
  apart = np.array([d is not None and not d.touching for d in track.detections])
  return apart | (areas >= 0.9 * areas.max()) if areas.max() else apart


def _fit(track: objects.Track, radius: float, height: int, width: int):
  """`fit_motion` over the frames where the track's object is whole (None if < 3)."""
  whole = _whole(track)
  if whole.sum() < 3:
    return None
  return fit_motion(np.where(whole[:, None], track.positions, np.nan), radius, height, width)


def prompted_tracks(video: np.ndarray, prompt: Sequence[PromptObject], world: WorldConfig,
                    threshold: float = 60.0, min_area: int = 3):
  """The trackers on uint8 `video [T, H, W, 3]`: `(labels [T, H, W], detections per frame,
  tracks, main)`, `main` holding per prompted object the longest track of its colour (None
  where there is none)."""
  height, width = video.shape[1:3]
  colours = list(world.colours)
  labels = tracking.world_labels(video, world, threshold)
  detections = objects.detect(labels, len(colours), min_area)
  tracks = objects.track(detections, max_jump=0.25 * min(height, width),
                         frame_size=(height, width))
  main: list[objects.Track | None] = []
  for o in prompt:
    mine = [t for t in tracks if t.colour == colours.index(o.colour)]
    main.append(max(mine, key=lambda t: t.seen.sum()) if mine else None)
  return labels, detections, tracks, main


def video_metrics(video: np.ndarray, prompt: Sequence[PromptObject], world: WorldConfig,
                  threshold: float = 60.0, min_area: int = 3) -> dict[str, Any]:
  """ShapesBench metrics of uint8 `video [T, H, W, 3]` against `prompt` (module docstring)."""
  frames, height, width = video.shape[:3]
  colours = list(world.colours)
  labels, detections, tracks, main = prompted_tracks(video, prompt, world, threshold, min_area)
  wanted = [colours.index(o.colour) for o in prompt]

  colour_ok = [t is not None for t in main]
  shapes = [t.shape() if t is not None else None for t in main]
  shape_ok = [s == o.shape for s, o in zip(shapes, prompt) if s is not None]
  radius = float(np.mean(world.size_range)) * min(height, width)
  fits = [_fit(t, radius, height, width) if t is not None else None for t in main]
  directions = []
  for t, fit in zip(main, fits):
    if fit is not None and np.abs(fit[1]).max() > 0.1:
      directions.append(tracking.direction_name(*fit[1]))
    else:
      directions.append(tracking.direction_of(t.positions, DIRECTION_FRAMES) if t else None)
  direction_ok = [d == o.direction for d, o in zip(directions, prompt)]
  per_frame = np.array([len(d) for d in detections])
  count_ok = float(np.median(per_frame)) == len(prompt)

  bad_frames = _hallucinated_frames(detections, tracks, main, wanted)
  appear_vanish, occlusions, kept = _appearances(tracks, main, wanted, frames)
  physics = [fit[2] for fit in fits if fit is not None]
  size_cv, shape_stable = _stability(main)
  flicker = _flicker(video, labels)

  dominant = None
  if len(prompt) == 1:
    palette = {name: PALETTE[name] for name in colours}
    dominant = float(colour_lib.dominant_colour(video, palette, tracking.background_of(world),
                                              threshold)
                     == prompt[0].colour)
  return {
      "colour": float(np.mean(colour_ok)), "dominant_colour": dominant,
      "shape": float(np.mean(shape_ok)) if shape_ok else None,
      "direction": float(np.mean(direction_ok)), "count": float(count_ok),
      "hallucinated_frames": float(bad_frames.mean()), "appear_vanish": appear_vanish,
      "permanence": kept / occlusions if occlusions else None,
      "physics": float(np.mean(physics)) if physics else None,
      "size_stability": float(np.mean(size_cv)) if size_cv else None,
      "shape_stability": float(np.mean(shape_stable)) if shape_stable else None,
      "direction_leak": _leak(directions, [o.direction for o in prompt]),
      "shape_leak": _leak(shapes, [o.shape for o in prompt]),
      "flicker": flicker,
      "shapes_read": [(o.shape, s) for o, s in zip(prompt, shapes)],
  }


def shape_confusion(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
  """`{prompted shape: {shape read: objects}}` over `video_metrics` rows; "unread" counts
  prompted objects without a track of their colour or never seen apart from others."""
  out: dict[str, dict[str, int]] = {}
  for row in rows:
    for prompted, read in row["shapes_read"]:
      counts = out.setdefault(prompted, {})
      counts[read or "unread"] = counts.get(read or "unread", 0) + 1
  return out


def confusion_table(confusion: dict[str, dict[str, int]]) -> str:
  """Markdown of `shape_confusion`: per prompted shape, its objects read as each shape."""
  read = list(objects.SHAPE_CLASSES) + ["unread"]
  lines = ["| prompted shape | " + " | ".join(
               f"read as {n}" if n != "unread" else n for n in read) + " |",
           "| --- " * (len(read) + 1) + "|"]
  lines += [f"| {shape} | " + " | ".join(str(counts.get(n, 0)) for n in read) + " |"
            for shape, counts in sorted(confusion.items())]
  return "\n".join(lines)


def _hallucinated_frames(detections, tracks: Sequence[objects.Track],
                         main: Sequence[objects.Track | None], wanted: Sequence[int]
                         ) -> np.ndarray:
  """`[T]` bool: frames with an object too many, or a prompted one missing where nothing
  could hide it."""
  frames = len(detections)
  prompted_tracks = {id(t) for t in main if t is not None}
  bad_frames = np.zeros(frames, bool)
  for f, found in enumerate(detections):
    extra = any(d.colour not in wanted for d in found)
    extra |= any(t.detections[f] is not None for t in tracks
                 if id(t) not in prompted_tracks and t.colour in wanted)
    missing = False
    for t in main:
      if t is None:
        missing = True
      elif t.detections[f] is None:
        where = _expected_position(t, f)
        missing |= where is None or not _hidden(where, f, tracks, t)
    bad_frames[f] = extra or missing

  return bad_frames


def _appearances(tracks: Sequence[objects.Track], main: Sequence[objects.Track | None],
                 wanted: Sequence[int], frames: int) -> tuple[int, int, int]:
  """`(appear_vanish, occlusions, kept)`: objects appearing or vanishing in plain view;
  occlusions of prompted objects, and how many of them kept their identity."""
  prompted_tracks = {id(t) for t in main if t is not None}
  appear_vanish, occlusions, kept = 0, 0, 0
  for t in tracks:
    if t.seen.sum() < 2 and id(t) not in prompted_tracks:
      appear_vanish += 1        # a flash of an object for one frame
      continue
    if t.first > 0 and not _hidden(t.positions[t.first], t.first - 1, tracks, t, (1,)):
      appear_vanish += 1
    if t.last < frames - 1 and not _hidden(t.positions[t.last], t.last + 1, tracks, t, (-1,)):
      appear_vanish += 1
    for start, end in t.gaps():
      where = _expected_position(t, start)
      if where is not None and _hidden(where, start, tracks, t):
        if id(t) in prompted_tracks:
          occlusions += 1
          kept += 1          # the track continues after the gap: identity kept
      else:
        appear_vanish += 2   # gone for a while in plain view, then back
  for t, c in zip(main, wanted):
    # Hidden at the end of its track, back later as another track: identity lost.
    if t is not None and t.last < frames - 1 and _hidden(t.positions[t.last], t.last + 1,
                                                         tracks, t, (-1,)):
      if any(o is not t and o.colour == c and o.first > t.last for o in tracks):
        occlusions += 1

  return appear_vanish, occlusions, kept


def _stability(main: Sequence[objects.Track | None]) -> tuple[list[float], list[float]]:
  """Per prompted track: the coefficient of variation of its whole (untouched) areas, and
  the share of its unoccluded detections that have its shape."""
  size_cv, shape_stable = [], []
  for t in main:
    if t is None:
      continue
    whole = _whole(t)
    areas = np.array([d.area for d, w in zip(t.detections, whole) if d and w], float)
    if len(areas) >= 2:
      size_cv.append(float(areas.std() / areas.mean()))
    shapes = [d.shape for d in t.detections if d and not d.touching]
    if shapes:
      shape_stable.append(shapes.count(t.shape()) / len(shapes))

  return size_cv, shape_stable


def _flicker(video: np.ndarray, labels: np.ndarray) -> float:
  """Mean absolute change of background pixels that stay background between frames."""
  background = labels < 0
  steady = background[1:] & background[:-1]
  change = np.abs(video[1:].astype(np.float32) - video[:-1].astype(np.float32)).mean(-1)
  flicker = float(change[steady].mean()) if steady.any() else 0.0
  return flicker


def _hidden(point: np.ndarray, f: int, tracks: Sequence[objects.Track],
            this: objects.Track, also: tuple[int, ...] = (-1, 1)) -> bool:
  """Whether another object covers `point` in frame f, one also seen in frame f + k for
  some k in `also` (an object already there, not one appearing at that moment: an
  object vanishing at f needs an occluder seen at f - 1, one appearing at f + 1 an
  occluder still there at f + 1)."""
  frames = len(this.detections)
  if not 0 <= f < frames:
    return False
  for other in tracks:
    d = other.detections[f]
    if other is this or d is None:
      continue
    steady = any(0 <= f + k < frames and other.detections[f + k] is not None for k in also)
    if steady and objects.covered(point, [d]):
      return True
  return False


def _expected_position(t: objects.Track, f: int) -> np.ndarray | None:
  """Where an unseen track should be at frame f: interpolated between its sightings
  around f, else extrapolated from the last two; None when it was seen once."""
  seen = np.nonzero(t.seen)[0]
  p = t.positions
  before, after = seen[seen < f], seen[seen > f]
  if len(before) and len(after):
    a, b = before[-1], after[0]
    return p[a] + (p[b] - p[a]) * (f - a) / (b - a)
  ends = before[-2:] if len(before) >= 2 else after[:2]
  if len(ends) < 2:
    return p[seen[0]] if len(seen) else None
  a, b = ends
  return p[b] + (p[b] - p[a]) / (b - a) * (f - b)


def _leak(measured: Sequence[str | None], prompted: Sequence[str]) -> float | None:
  """The share of objects that show another object's prompted attribute instead of
  their own, over objects whose attribute was measured and differs from another's in the
  prompt (`direction_leak`, `shape_leak`); None when no object qualifies."""
  leaks = []
  for k, (got, wanted) in enumerate(zip(measured, prompted)):
    others = {p for j, p in enumerate(prompted) if j != k and p != wanted}
    if got is not None and others:
      leaks.append(got in others)
  return float(np.mean(leaks)) if leaks else None


METRICS = ("colour", "dominant_colour", "shape", "direction", "count", "hallucinated_frames", "appear_vanish",
           "permanence", "physics", "size_stability", "shape_stability", "flicker",
           "direction_leak", "shape_leak")


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
  """Mean of each metric over videos (None values, e.g. no occlusion, left out)."""
  out = {}
  for name in METRICS:
    values = [r[name] for r in rows if r.get(name) is not None]
    out[name] = float(np.mean(values)) if values else None
  return out


SCORE_PARTS = ("colour", "shape", "direction", "count")


def score(summary: dict[str, float | None]) -> float:
  """One number per model (higher is better): the mean of the adherence metrics
  (colour, shape, direction, count) and of `1 - hallucinated_frames`."""
  parts = [summary[k] for k in SCORE_PARTS if summary.get(k) is not None]
  parts.append(1.0 - summary["hallucinated_frames"])
  return float(np.mean(parts))


def _score_parts(rows: Sequence[dict[str, Any]]) -> np.ndarray:
  """`[N, 5]` each video's score parts (`SCORE_PARTS`, then 1 - hallucinated frames), NaN
  where a metric is None."""
  columns = [[np.nan if r.get(k) is None else float(r[k]) for r in rows] for k in SCORE_PARTS]
  columns.append([np.nan if r.get("hallucinated_frames") is None
                  else 1.0 - float(r["hallucinated_frames"]) for r in rows])
  return np.asarray(columns, np.float64).T


def _resampled_scores(parts: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """`score` of `summarise` for each resample: `weights [R, N]` counts of each video."""
  present = ~np.isnan(parts)
  sums = weights @ np.where(present, parts, 0.0)                          # [R, 5]
  counts = weights @ present.astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
  return np.nanmean(means, axis=1)


def relative_score_interval(rows: Sequence[dict[str, Any]],
                            reference: Sequence[dict[str, Any]], *, resamples: int = 2000,
                            level: float = 0.95, seed: int = 0) -> tuple[float, float]:
  """A paired bootstrap interval of `score(rows) / score(reference) - 1`: videos resampled
  with replacement, the same draws for both (row i of each is the same prompt and seed).
  Returns the `level` percentile interval `(low, high)`."""
  if len(rows) != len(reference) or not rows:
    raise ValueError(f"paired rows: {len(rows)} vs {len(reference)} videos.")
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, len(rows), (resamples, len(rows)))
  weights = np.zeros((resamples, len(rows)))
  np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
  ratio = (_resampled_scores(_score_parts(rows), weights)
           / _resampled_scores(_score_parts(reference), weights) - 1.0)
  tail = (1.0 - level) / 2 * 100
  low, high = np.nanpercentile(ratio, [tail, 100 - tail])
  return float(low), float(high)
