"""Cutting a stream of frames into training clips: windows with a stride, never across a cut.

A scene cut is declared between two consecutive frames whose difference
(`frame_difference`: mean absolute difference of small grey thumbnails, in [0, 1])
exceeds `cut_threshold`; a new scene starts there. Within a scene, clips are windows
of `frames` frames starting every `stride` frames; the scene's tail gives one shorter
clip when at least `min_frames` frames remain after the last full window's start
(so `min_frames == frames` gives fixed-length clips only).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

THUMBNAIL = 32   # side of the grey thumbnails that cut detection compares


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """How clips are cut (lengths in frames at the prepared frame rate)."""
  frames: int = 8            # window length (the longest clip)
  min_frames: int = 8        # shortest clip kept (a scene's tail, or a short video)
  stride: int = 8            # frames between window starts
  scene_cuts: bool = True
  cut_threshold: float = 0.15
  max_clips: int = 0         # per file; 0: no limit

  def __post_init__(self):
    if not 1 <= self.min_frames <= self.frames:
      raise ValueError(f"media.min_frames={self.min_frames} must be in [1, media.frames="
                       f"{self.frames}].")
    if self.stride < 1:
      raise ValueError(f"media.stride={self.stride} must be positive.")
    if not 0 < self.cut_threshold <= 1:
      raise ValueError(f"media.cut_threshold={self.cut_threshold} must be in (0, 1].")


@dataclasses.dataclass
class Clip:
  """Frames `[T, H, W, 3]` uint8 shown from `start` seconds, in scene `scene` of its file."""
  frames: np.ndarray
  start: float
  scene: int


def thumbnail(frame: np.ndarray) -> np.ndarray:
  """uint8 `[H, W, 3]` -> float32 grey `[32, 32]` in [0, 1]."""
  grey = Image.fromarray(frame).convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
  return np.asarray(grey, np.float32) / 255.0


def frame_difference(a: np.ndarray, b: np.ndarray) -> float:
  """Mean absolute difference of two frames' grey thumbnails, in [0, 1]."""
  return float(np.mean(np.abs(thumbnail(a) - thumbnail(b))))


def motion_score(frames: np.ndarray) -> float:
  """Mean absolute difference of consecutive frames `[T, H, W, C]`, in [0, 1] (0 for T = 1)."""
  if len(frames) < 2:
    return 0.0
  f = frames.astype(np.float32) / 255.0
  return float(np.mean(np.abs(f[1:] - f[:-1])))


def cut_clips(frames: Iterable[tuple[float, np.ndarray]], spec: ClipSpec) -> Iterator[Clip]:
  """Clips of a stream of `(time, frame [H, W, 3])` (see module docstring), in order."""
  buffer: list[tuple[float, np.ndarray]] = []   # the current scene from the next window start
  skip, scene, emitted = 0, 0, 0                 # frames to drop before the next window
  uncovered = 0                                  # frames of `buffer` in no clip yet
  previous_thumb = None

  def window(items):
    return Clip(np.stack([f for _, f in items]), items[0][0], scene)

  for time, frame in frames:
    if spec.scene_cuts:
      thumb = thumbnail(frame)
      if previous_thumb is not None and np.mean(np.abs(thumb - previous_thumb)) > spec.cut_threshold:
        if uncovered and len(buffer) >= spec.min_frames:   # the scene's tail
          yield window(buffer)
          emitted += 1
          if spec.max_clips and emitted >= spec.max_clips:
            return
        buffer, skip, scene, uncovered = [], 0, scene + 1, 0
      previous_thumb = thumb
    if skip:
      skip -= 1
      continue
    buffer.append((time, frame))
    uncovered += 1
    if len(buffer) == spec.frames:
      yield window(buffer)
      emitted += 1
      if spec.max_clips and emitted >= spec.max_clips:
        return
      buffer, uncovered = buffer[spec.stride:], 0
      skip = max(0, spec.stride - spec.frames)
  if uncovered and len(buffer) >= spec.min_frames:   # the last scene's tail
    yield window(buffer)
