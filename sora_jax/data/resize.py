"""The resize policy of prepared media: crop to one size, or keep the aspect on a patch grid.

  crop    scale so the frame covers `height x width`, then cut the centre: every clip
          has the same size (fixed-size training, `data.grouping="none"`).
  native  keep the aspect ratio; scale to about `height * width` pixels and round both
          sides down to multiples of `grid` (the patch size times the autoencoder's
          spatial factor), cutting at most `grid - 1` pixels off each side: clips keep
          their native shapes for bucketing or packing.

Frames are never upscaled unless `upscale` is set: a source too small for its policy
is refused with a `ValueError` saying so (the preparation skips and reports it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

MODES = ("crop", "native")


@dataclasses.dataclass(frozen=True)
class ResizePolicy:
  """How frames of any size become frames of the dataset."""
  mode: str = "crop"
  height: int = 32
  width: int = 32
  grid: int = 1
  upscale: bool = False
  max_aspect: float = 4.0    # longer side / shorter side beyond which a source is refused

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"media.resize={self.mode!r}: expected one of {MODES}.")
    if min(self.height, self.width, self.grid) < 1:
      raise ValueError("media.height/width/grid must be positive.")
    if self.max_aspect < 1:
      raise ValueError(f"media.max_aspect={self.max_aspect} must be >= 1.")

  def sizes(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """`((resized_h, resized_w), (out_h, out_w))` for a `height x width` source.

    Raises:
      ValueError: the source is empty, too elongated, or smaller than the policy needs
        without upscaling.
    """
    if height < 1 or width < 1:
      raise ValueError(f"empty frame size {height}x{width}")
    if max(height, width) / min(height, width) > self.max_aspect:
      raise ValueError(f"aspect ratio {width}:{height} beyond media.max_aspect="
                       f"{self.max_aspect}")
    if self.mode == "crop":
      scale = max(self.height / height, self.width / width)
      if scale > 1 and not self.upscale:
        raise ValueError(f"{height}x{width} is smaller than {self.height}x{self.width} "
                         "and media.upscale is off")
      resized = (max(self.height, round(height * scale)), max(self.width, round(width * scale)))
      return resized, (self.height, self.width)
    scale = math.sqrt(self.height * self.width / (height * width))
    if not self.upscale:
      scale = min(scale, 1.0)
    resized = (max(1, round(height * scale)), max(1, round(width * scale)))
    out = (resized[0] // self.grid * self.grid, resized[1] // self.grid * self.grid)
    if min(out) < self.grid:
      raise ValueError(f"{height}x{width} is smaller than the patch grid ({self.grid} "
                       "pixels) without upscaling")
    return resized, out

  def __call__(self, frame: np.ndarray) -> np.ndarray:
    """uint8 `[H, W, 3]` -> uint8 `[h, w, 3]` by this policy (area filter when shrinking)."""
    (rh, rw), (oh, ow) = self.sizes(*frame.shape[:2])
    if (rh, rw) != frame.shape[:2]:
      shrink = rh <= frame.shape[0] and rw <= frame.shape[1]
      method = Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC
      frame = np.asarray(Image.fromarray(frame).resize((rw, rh), method))
    top, left = (rh - oh) // 2, (rw - ow) // 2
    return np.ascontiguousarray(frame[top:top + oh, left:left + ow])


def fit_clip(video: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Crops and resizes uint8 `video [T, H, W, 3]` to `size = (frames, height, width)`.

  Time: the first `frames` frames (a shorter clip repeats its last frame).
  Space: scale so the frame covers `height x width` (bilinear), then crop the centre.
  A clip already of that size is returned unchanged.
  """
  frames, height, width = size
  if video.shape[:3] == tuple(size):
    return video
  video = video[:frames]
  if len(video) < frames:
    video = np.concatenate([video, np.repeat(video[-1:], frames - len(video), 0)])
  h, w = video.shape[1:3]
  scale = max(height / h, width / w)
  new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
  top, left = (new_h - height) // 2, (new_w - width) // 2
  out = np.empty((frames, height, width, 3), np.uint8)
  for f in range(frames):
    frame = Image.fromarray(video[f]).resize((new_w, new_h), Image.BILINEAR)
    out[f] = np.asarray(frame)[top:top + height, left:left + width]
  return out
