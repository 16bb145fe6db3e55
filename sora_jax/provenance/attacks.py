"""Edits a watermark must survive: re-encoding, resizing, cropping, dropping frames.

Each attack maps uint8 `[T, H, W, 3]` to uint8 `[T', H', W', 3]`; `ATTACKS` names the ones
`experiments/provenance_bench.py` measures. Re-encoding goes through a real libx264 mp4 file
(imageio-ffmpeg) and back.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import imageio.v2 as imageio
import numpy as np
from PIL import Image

from sora_jax import video_io

Attack = Callable[[np.ndarray], np.ndarray]


def reencode(video: np.ndarray, crf: int = 28, fps: int = 8) -> np.ndarray:
  """An H.264 (libx264, yuv420p) round trip at constant rate factor `crf`."""
  video = np.asarray(video, np.uint8)
  h, w = video.shape[1:3]
  if h % 2 or w % 2:    # yuv420p needs even sizes: drop the last row / column
    video = video[:, :h - h % 2, :w - w % 2]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "attack.mp4")
    with video_io.ffmpeg_subprocess(), imageio.get_writer(
        path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1,
        pixelformat="yuv420p", output_params=["-crf", str(crf), "-preset", "medium"]) as writer:
      for frame in video:
        writer.append_data(frame)
    return video_io.read_video(path)


def resize(video: np.ndarray, factor: float = 0.75) -> np.ndarray:
  """Bicubic resize of every frame by `factor` (sizes rounded)."""
  h, w = video.shape[1:3]
  size = (max(1, round(w * factor)), max(1, round(h * factor)))
  return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC))
                   for f in np.asarray(video, np.uint8)])


def crop(video: np.ndarray, fraction: float = 0.1, anchor: tuple[float, float] = (0.3, 0.7)
         ) -> np.ndarray:
  """Removes `fraction` of the height and of the width; `anchor` splits what is removed
  between top/bottom and left/right (0: all from the bottom / right)."""
  h, w = video.shape[1:3]
  dh, dw = round(h * fraction), round(w * fraction)
  top, left = round(dh * anchor[0]), round(dw * anchor[1])
  return np.asarray(video)[:, top:top + h - dh, left:left + w - dw]


def halve_fps(video: np.ndarray) -> np.ndarray:
  """Keeps every other frame (a 16 fps clip becomes 8 fps of the same duration)."""
  return np.asarray(video)[::2]


def combined(video: np.ndarray) -> np.ndarray:
  """Crop 10%, resize 0.75x, halve the frame rate, re-encode at CRF 28."""
  return reencode(halve_fps(resize(crop(video), 0.75)), crf=28)


ATTACKS: dict[str, Attack] = {
    "none": lambda v: np.asarray(v),
    "crf28": lambda v: reencode(v, crf=28),
    "resize0.75": lambda v: resize(v, 0.75),
    "crop10%": lambda v: crop(v, 0.1),
    "fps/2": halve_fps,
    "combined": combined,
}
