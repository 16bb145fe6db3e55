"""Deterministic trackers for the procedural world's videos (no learned model).

Each pixel further than `threshold` (RGB Euclidean) from the background is labelled with the
palette colour whose blend line with the background (`background + a * (colour -
background)`, 0 <= a <= 1) passes nearest to it, else background: an object's soft or
antialiased edge (a blend of its colour and the background, as decoders and generators
draw edges) keeps the object's colour. The nearest palette colour itself would not: half
of the world's yellow over its dark grey is nearer its green and red than its yellow, so
every soft yellow edge read as small green and red objects. An object is a connected
component of one colour of at least `min_area` pixels.

The camera world's background is a grey texture of every brightness, not one colour
(`background_of`): there the same labelling reads each pixel's and colour's `chroma`, its
offset from the grey of its own brightness, against a background of no chroma, so texture
of any contrast is background and an object's colour still is not. From the labels:
per-frame centroids of a colour, per-frame counts of objects per colour, and the
direction of motion of a track.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from sora_jax.data.world import PALETTE, WorldConfig, chroma, direction_name

BACKGROUND = -1


def label_pixels(video: np.ndarray, colours: Sequence[Sequence[int]],
                 background: Sequence[int] | None, threshold: float = 60.0) -> np.ndarray:
  """uint8 `video [T, H, W, 3]` -> int `[T, H, W]`: index into `colours` (the colour whose
  blend line with the background is nearest, module docstring), or -1 (background).
  `background` None: a grey background of any brightness (module docstring)."""
  if background is None:
    video, colours, background = chroma(video), chroma(colours), (0.0, 0.0, 0.0)
  offset = np.asarray(video, np.float32) - np.asarray(background, np.float32)  # [T, H, W, 3]
  far = np.linalg.norm(offset, axis=-1) > threshold
  lines = np.asarray(colours, np.float32) - np.asarray(background, np.float32)  # [K, 3]
  blend = np.clip(offset @ lines.T / np.maximum((lines * lines).sum(-1), 1e-6), 0.0, 1.0)
  residual = np.linalg.norm(offset[..., None, :] - blend[..., None] * lines, axis=-1)
  return np.where(far, np.argmin(residual, axis=-1), BACKGROUND)


def background_of(world: WorldConfig) -> tuple[int, int, int] | None:
  """The `background` `label_pixels` reads `world`'s videos against: its one colour, or None
  (any grey) for a camera world's texture."""
  return None if world.camera else world.background


def world_labels(video: np.ndarray, world: WorldConfig, threshold: float = 60.0) -> np.ndarray:
  """`label_pixels` with the world's colours (labels index `world.colours`)."""
  return label_pixels(video, [PALETTE[c] for c in world.colours], background_of(world),
                      threshold)


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
