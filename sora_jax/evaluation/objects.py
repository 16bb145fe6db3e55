"""Objects in generated frames: detection, shape classification and identity tracking.

Deterministic, no learned model. Pixels are labelled by colour (`tracking.label_pixels`);
a detection is a 4-connected component of one colour with at least `min_area` pixels
(components of a colour that border the same other object are one detection: an
object cut in two by another passing in front), with its centroid, area, bounding box,
shape class, and whether it touches another object (then it may be partly hidden, and
its shape is not used). Shapes are told apart by two
numbers of the component (measured on the world's rasterised shapes at 32 and 64
pixels, where they separate every unoccluded shape):

  triangle  the centroid sits low in the bounding box (relative height > 0.575; the
            world's triangles point up, centroid at 2/3 of the height)
  square    the component fills its bounding box (> 0.94)
  circle    fills about pi/4 of it (> 0.635)
  diamond   fills about half of it

Tracks follow detections through the clip: in each frame, detections of a colour are
assigned to that colour's live tracks by the Hungarian algorithm on the distance to
each track's constant-velocity prediction, relative to how far it may be (`max_jump`
pixels per frame since the track was last seen); a track missing for up to `max_gap`
frames (an occlusion) keeps its identity when the object reappears near where it
should be; unassigned detections start new tracks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage, optimize

SHAPE_CLASSES = ("circle", "square", "triangle", "diamond")


@dataclasses.dataclass(frozen=True)
class Detection:
  """One object in one frame. Positions are (x, y) pixel centroids (pixel centres +0.5)."""
  colour: int
  x: float
  y: float
  area: int
  shape: str
  bbox: tuple[int, int, int, int]     # y0, x0, y1, x1 (exclusive ends)
  touching: bool = False              # borders another object: may be partly hidden


@dataclasses.dataclass
class Track:
  """One object through a clip: per frame its detection, or None where unseen."""
  colour: int
  detections: list[Detection | None]

  @property
  def positions(self) -> np.ndarray:
    """`[T, 2]` (x, y) centroids, NaN where unseen."""
    return np.array([(d.x, d.y) if d else (np.nan, np.nan) for d in self.detections])

  @property
  def seen(self) -> np.ndarray:
    """`[T]` bool: frames where the object is detected."""
    return np.array([d is not None for d in self.detections])

  @property
  def first(self) -> int:
    return int(np.argmax(self.seen))

  @property
  def last(self) -> int:
    return len(self.detections) - 1 - int(np.argmax(self.seen[::-1]))

  def gaps(self) -> list[tuple[int, int]]:
    """`[(start, end), ...]` frame ranges (end exclusive) unseen between two sightings."""
    seen, out, start = self.seen, [], None
    for f in range(self.first, self.last + 1):
      if not seen[f] and start is None:
        start = f
      elif seen[f] and start is not None:
        out.append((start, f))
        start = None
    return out

  def shape(self) -> str | None:
    """The most frequent shape class over the frames where it is seen apart from other
    objects; None when it always touches one (its outline is never whole)."""
    shapes = [d.shape for d in self.detections if d and not d.touching]
    return max(SHAPE_CLASSES, key=shapes.count) if shapes else None


def shape_features(mask: np.ndarray) -> tuple[float, float]:
  """`(fill, centroid height)` of a bool `mask [H, W]`: the share of its bounding box it
  covers, and its centroid's height within the box (0 top, 0.5 middle, 1 bottom)."""
  ys, xs = np.nonzero(mask)
  height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
  return len(xs) / (height * width), (ys.mean() - ys.min() + 0.5) / height


def classify_shape(mask: np.ndarray) -> str:
  """The shape class of a bool `mask [H, W]` (see module docstring)."""
  fill, centroid_height = shape_features(mask)
  if centroid_height > 0.575:
    return "triangle"
  if fill > 0.94:
    return "square"
  return "circle" if fill > 0.635 else "diamond"


def _components(frame: np.ndarray, colour: int) -> list[np.ndarray]:
  """Bool masks `[H, W]` of the objects of one colour in a labelled frame: 4-connected
  components, with components that border the same other object merged (an object cut
  in two by one passing in front of it)."""
  components, n = ndimage.label(frame == colour)
  if n == 0:
    return []
  others = [set() for _ in range(n)]
  for k in range(n):
    ring = ndimage.binary_dilation(components == k + 1) & (frame >= 0) & (frame != colour)
    if ring.any():
      neighbours, _ = ndimage.label(frame >= 0)
      others[k] = {(int(frame[y, x]), int(neighbours[y, x])) for y, x in zip(*np.nonzero(ring))}
  group = list(range(n))

  def root(k):
    while group[k] != k:
      k = group[k]
    return k

  for a in range(n):
    for b in range(a + 1, n):
      if others[a] & others[b]:
        group[root(b)] = root(a)
  masks: dict[int, np.ndarray] = {}
  for k in range(n):
    r = root(k)
    masks[r] = masks.get(r, np.zeros_like(frame, bool)) | (components == k + 1)
  return list(masks.values())


def detect(labels: np.ndarray, num_colours: int, min_area: int = 3) -> list[list[Detection]]:
  """Per frame of `labels [T, H, W]` (colour indices, -1 background), its detections."""
  out = []
  for frame in labels:
    found = []
    for colour in range(num_colours):
      for mask in _components(frame, colour):
        area = int(mask.sum())
        if area < min_area:
          continue
        ys, xs = np.nonzero(mask)
        box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        ring = ndimage.binary_dilation(mask) & (frame >= 0) & (frame != colour)
        found.append(Detection(colour, float(xs.mean() + 0.5), float(ys.mean() + 0.5), area,
                               classify_shape(mask[box[0]:box[2], box[1]:box[3]]), box,
                               bool(ring.any())))
    out.append(found)
  return out


def reflect(value: float, low: float, high: float) -> float:
  """`value` folded into `[low, high]` by elastic reflections at both ends."""
  if high <= low:
    return (low + high) / 2
  span = 2 * (high - low)
  v = (value - low) % span
  return low + (v if v <= high - low else span - v)


def track(detections: list[list[Detection]], max_jump: float, max_gap: int = 4,
          frame_size: tuple[int, int] | None = None) -> list[Track]:
  """Tracks of `detections` (per frame, from `detect`); see module docstring.

  With `frame_size = (height, width)`, predictions bounce off the frame's edges (an
  object of radius `sqrt(area / pi)` at its largest), as the world's objects do.
  """
  frames = len(detections)
  tracks: list[Track] = []
  last_seen: list[int] = []

  def predict(t: Track, f: int) -> tuple[np.ndarray, float]:
    """Where the track should be at frame f, and how far it may be from there. Velocity
    comes from the last two sightings of (nearly) the whole object: a partly hidden
    object's centroid drifts towards its visible part."""
    seen = np.nonzero(t.seen[:f])[0]
    p = t.positions
    areas = np.array([t.detections[i].area for i in seen])
    whole = seen[areas >= 0.7 * areas.max()]
    gap = f - seen[-1]
    if len(whole) < 2:
      return p[seen[-1]], max_jump * gap
    a, b = whole[-2], whole[-1]
    where = p[b] + (p[b] - p[a]) / (b - a) * (f - b)
    if frame_size is not None:
      r = float(np.sqrt(areas.max() / np.pi))
      where = np.array([reflect(where[0], r, frame_size[1] - r),
                        reflect(where[1], r, frame_size[0] - r)])
    return where, max_jump * gap

  for f, found in enumerate(detections):
    live = [i for i, t in enumerate(tracks) if f - last_seen[i] <= max_gap + 1]
    assigned = set()
    for colour in sorted({d.colour for d in found}):
      dets = [j for j, d in enumerate(found) if d.colour == colour]
      cands = [i for i in live if tracks[i].colour == colour]
      if cands:
        predictions = [predict(tracks[i], f) for i in cands]
        cost = np.array([[np.hypot(*(where - (found[j].x, found[j].y))) / reach
                          for j in dets] for where, reach in predictions])
        rows, cols = optimize.linear_sum_assignment(cost)
        for r, c in zip(rows, cols):
          if cost[r, c] <= 1.0:
            tracks[cands[r]].detections[f] = found[dets[c]]
            last_seen[cands[r]] = f
            assigned.add(dets[c])
      for j in dets:
        if j not in assigned:
          tracks.append(Track(colour, [None] * frames))
          tracks[-1].detections[f] = found[j]
          last_seen.append(f)
  return tracks


def covered(point: np.ndarray, detections: list[Detection], margin: float = 1.0) -> bool:
  """Whether an (x, y) point lies in (or within `margin` of) any detection's bounding box:
  an object there can hide another."""
  x, y = point
  return any(d.bbox[1] - margin <= x <= d.bbox[3] + margin and
             d.bbox[0] - margin <= y <= d.bbox[2] + margin for d in detections)
