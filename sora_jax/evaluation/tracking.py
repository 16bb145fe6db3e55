"""Deterministic trackers for the procedural world's videos (no learned model).

Each pixel is labelled with the nearest palette colour when it is further than
`threshold` (RGB Euclidean) from the background, else background; an object is a
connected component of one colour of at least `min_area` pixels. From the labels:
per-frame centroids of a colour, per-frame counts of objects per colour, and the
direction of motion of a track.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from sora_jax.data.world import PALETTE, WorldConfig, direction_name

BACKGROUND = -1


def label_pixels(video: np.ndarray, colours: Sequence[Sequence[int]], background: Sequence[int],
                 threshold: float = 60.0) -> np.ndarray:
  """uint8 `video [T, H, W, 3]` -> int `[T, H, W]`: index into `colours`, or -1 (background)."""
  pixels = np.asarray(video, np.float32)
  far = np.linalg.norm(pixels - np.asarray(background, np.float32), axis=-1) > threshold
  palette = np.asarray(colours, np.float32)                                   # [K, 3]
  nearest = np.argmin(np.linalg.norm(pixels[..., None, :] - palette, axis=-1), axis=-1)
  return np.where(far, nearest, BACKGROUND)


def world_labels(video: np.ndarray, world: WorldConfig, threshold: float = 60.0) -> np.ndarray:
  """`label_pixels` with the world's colours (labels index `world.colours`)."""
  return label_pixels(video, [PALETTE[c] for c in world.colours], world.background, threshold)


def centroids(labels: np.ndarray, colour: int, min_area: int = 3) -> np.ndarray:
  """`[T, 2]` (x, y) pixel centroid of colour `colour` per frame of `labels [T, H, W]`
  (pixel centres at +0.5, as the world draws them); NaN where fewer than `min_area` pixels."""
  out = np.full((labels.shape[0], 2), np.nan)
  for f, frame in enumerate(labels):
    ys, xs = np.nonzero(frame == colour)
    if len(xs) >= min_area:
      out[f] = xs.mean() + 0.5, ys.mean() + 0.5
  return out


def object_counts(labels: np.ndarray, num_colours: int, min_area: int = 3) -> np.ndarray:
  """`[T, num_colours]` number of connected components (4-connectivity) of each colour
  with at least `min_area` pixels, per frame."""
  counts = np.zeros((labels.shape[0], num_colours), np.int32)
  for f, frame in enumerate(labels):
    for c in range(num_colours):
      components, n = ndimage.label(frame == c)
      if n:
        sizes = np.bincount(components.ravel())[1:]
        counts[f, c] = int((sizes >= min_area).sum())
  return counts


def direction_of(track: np.ndarray, frames: int | None = None,
                 min_motion: float = 0.5) -> str | None:
  """The world direction ("left", "right", "up", "down") of a `[T, 2]` centroid track:
  the larger axis of the displacement over its first `frames` frames (all when None),
  between the first and last frames where the object is seen. None when it is seen in
  fewer than two frames or moves less than `min_motion` pixels."""
  track = track if frames is None else track[:frames]
  seen = np.nonzero(~np.isnan(track[:, 0]))[0]
  if len(seen) < 2:
    return None
  dx, dy = track[seen[-1]] - track[seen[0]]
  if max(abs(dx), abs(dy)) < min_motion:
    return None
  return direction_name(dx, dy)


def unique_colour_objects(colours: np.ndarray) -> list[int]:
  """Indices of objects whose colour no other object of the clip has (trackable by colour)."""
  values, counts = np.unique(colours, return_counts=True)
  single = set(values[counts == 1].tolist())
  return [k for k, c in enumerate(colours) if int(c) in single]


def constant_share(signature: np.ndarray, reference: np.ndarray | None = None) -> float:
  """Share of frames whose per-colour counts equal `reference` (default: frame 0's)."""
  reference = signature[0] if reference is None else reference
  return float(np.mean(np.all(signature == reference[None], axis=-1)))
