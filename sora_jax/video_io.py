"""Writing videos (mp4 through imageio-ffmpeg, or PyAV for one that grows while it is
written) and PNG contact sheets of their frames."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator, Sequence

import imageio.v2 as imageio
import numpy as np


def upscale(video: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling of `[..., H, W, C]` by an integer factor."""
  if factor == 1:
    return video
  return np.repeat(np.repeat(video, factor, axis=-3), factor, axis=-2)


@contextlib.contextmanager
def ffmpeg_subprocess() -> Iterator[None]:
  """imageio starts ffmpeg with fork+exec; Python warns about fork in a threaded (JAX) process,
  which does not apply to an immediate exec."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
    yield


Mark = Callable[[np.ndarray], np.ndarray]   # uint8 [T, H, W, 3] -> same shape


def _encodable(video: np.ndarray, scale: int, mark: Mark | None) -> np.ndarray:
  """uint8 frames as the encoder gets them: upscaled, padded to even sizes, marked."""
  video = upscale(np.asarray(video, np.uint8), scale)
  pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
  if pad_h or pad_w:
    video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  return video if mark is None else mark(video)


def write_mp4(path: str, video: np.ndarray, fps: int = 8, scale: int = 1,
              mark: Mark | None = None) -> str:
  """Writes uint8 `video [T, H, W, 3]` as H.264 mp4 (sizes rounded up to even by padding).

  `mark` (e.g. `provenance.watermark.marker(...)`) transforms the frames exactly as they
  are encoded: after upscaling and padding.
  """
  video = _encodable(video, scale, mark)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # (imageio starts ffmpeg at the first frame: the fork happens inside the loop.)
  with ffmpeg_subprocess(), imageio.get_writer(
      path, format="FFMPEG", fps=fps, codec="libx264", quality=9, macro_block_size=1,
      pixelformat="yuv420p") as writer:
    for frame in video:
      writer.append_data(frame)
  return path


class Mp4Stream:
  """An H.264 mp4 written a chunk of frames at a time and readable while it grows: a
  fragmented mp4 (PyAV; a fragment per frame, each written to the file as soon as the next
  frame is encoded, so after a chunk the file holds all its frames but the last; no
  encoder look-ahead; a keyframe every `fps` frames). `mark` transforms each chunk as
  `write_mp4`'s does the whole video. Use as a context manager, or `close()`."""

  def __init__(self, path: str, fps: int = 8, scale: int = 1, mark: Mark | None = None):
    import av  # pylint: disable=g-import-not-at-top
    self.path, self.fps, self.scale, self.mark = path, fps, scale, mark
    self.frames = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._av = av
    self._container = av.open(path, mode="w", format="mp4", options={
        "movflags": "frag_every_frame+empty_moov+default_base_moof", "flush_packets": "1"})
    self._stream = None            # made at the first frame, which gives the size

  def append(self, frames: np.ndarray) -> None:
    """Encodes uint8 `frames [t, H, W, 3]` after those written before (same size)."""
    video = _encodable(frames, self.scale, self.mark)
    if self._stream is None:
      self._stream = self._container.add_stream("libx264", rate=self.fps)
      self._stream.height, self._stream.width = video.shape[1:3]
      self._stream.pix_fmt = "yuv420p"
      self._stream.options = {"tune": "zerolatency", "g": str(self.fps), "crf": "17"}
    for frame in video:
      self._container.mux(self._stream.encode(
          self._av.VideoFrame.from_ndarray(frame, format="rgb24")))
    self.frames += len(frames)

  def close(self) -> None:
    if self._stream is not None:
      self._container.mux(self._stream.encode())      # the encoder's last packets
    self._container.close()

  def __enter__(self) -> "Mp4Stream":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_video(path: str) -> np.ndarray:
  """Reads a video file into uint8 `[T, H, W, 3]` (GIFs with Pillow, the rest with ffmpeg)."""
  if path.lower().endswith(".gif"):
    from PIL import Image, ImageSequence  # pylint: disable=g-import-not-at-top
    with Image.open(path) as gif:
      return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)])
  with ffmpeg_subprocess(), imageio.get_reader(path, format="FFMPEG") as reader:
    return np.stack([np.asarray(f)[..., :3] for f in reader])


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def resize(video: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes uint8 `[T, H, W, 3]` frames to `height x width` (box filter when shrinking, so
  an integer nearest-neighbour upscale, like `write_mp4(scale=k)`'s, is undone exactly)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if video.shape[1:3] == (height, width):
    return video
  shrink = height <= video.shape[1] and width <= video.shape[2]
  method = Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC
  return np.stack([np.asarray(Image.fromarray(f).resize((width, height), method))
                   for f in video])


def read_media(path: str, height: int | None = None, width: int | None = None) -> np.ndarray:
  """Reads an image (a one-frame video) or a video as uint8 `[T, H, W, 3]`, resized to
  `height x width` when given. Raises FileNotFoundError / ValueError naming the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file.")
  try:
    if path.lower().endswith(IMAGE_EXTENSIONS):
      frame = np.asarray(imageio.imread(path))
      if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=-1)
      video = frame[None, ..., :3]
    else:
      video = read_video(path)
  except Exception as e:  # imageio raises many types for unreadable files
    raise ValueError(f"{path}: cannot read it as an image or video ({e}).") from e
  if video.size == 0:
    raise ValueError(f"{path}: no frames.")
  video = np.asarray(video, np.uint8)
  if height and width:
    video = resize(video, height, width)
  return video


def contact_sheet(videos: np.ndarray, scale: int = 1, gap: int = 2) -> np.ndarray:
  """One image with a row per video and a column per frame: `[N, T, H, W, 3]` -> `[H', W', 3]`."""
  videos = upscale(np.asarray(videos, np.uint8), scale)
  n, t, h, w, _ = videos.shape
  sheet = np.full((n * (h + gap) - gap, t * (w + gap) - gap, 3), 255, np.uint8)
  for i in range(n):
    for j in range(t):
      sheet[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = videos[i, j]
  return sheet


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 2) -> np.ndarray:
  """Two sets of videos beside each other, a white gap between: `[N, T, H, W, 3]` twice
  -> `[N, T, H, 2W + gap, 3]` (e.g. generated | ground truth)."""
  left, right = np.asarray(left, np.uint8), np.asarray(right, np.uint8)
  if left.shape != right.shape:
    raise ValueError(f"side_by_side: shapes {left.shape} and {right.shape} differ.")
  white = np.full(left.shape[:3] + (gap, 3), 255, np.uint8)
  return np.concatenate([left, white, right], axis=3)


def video_grid(videos: np.ndarray, columns: int, gap: int = 4) -> np.ndarray:
  """One video tiling several, row by row with `columns` per row and white gaps:
  `[N, T, H, W, 3]` -> `[T, H', W', 3]` (empty cells stay white)."""
  videos = np.asarray(videos, np.uint8)
  n, t, h, w, _ = videos.shape
  rows = -(-n // columns)
  grid = np.full((t, rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
  for i in range(n):
    r, c = divmod(i, columns)
    grid[:, r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = videos[i]
  return grid


def write_contact_sheet(path: str, videos: np.ndarray, labels: Sequence[str] | None = None,
                        scale: int = 1, mark: Mark | None = None) -> str:
  """Writes a PNG contact sheet, and the row labels to `<path>.txt` when given; `mark`
  transforms the sheet (as a one-frame video) before it is written."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  sheet = contact_sheet(videos, scale)
  if mark is not None:
    sheet = mark(sheet[None])[0]
  imageio.imwrite(path, sheet)
  if labels is not None:
    write_labels(path, labels)
  return path


def write_labels(sheet_path: str, labels: Sequence[str]) -> str:
  """Writes a contact sheet's row labels to `<sheet name>.txt`; returns that path."""
  path = os.path.splitext(sheet_path)[0] + ".txt"
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(f"row {i}: {label}\n" for i, label in enumerate(labels))
  return path
