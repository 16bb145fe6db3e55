"""Decoding the user's media with PyAV: videos resampled to a frame rate, images as one frame.

A video is read as the frames a viewer sees at times `start + k / fps` (k = 0, 1, ...):
at each such time, the latest decoded frame whose timestamp is not after it. This
resamples any frame rate, constant or variable, to `fps` without drifting; timestamps
are counted from the stream's first frame. Rotation metadata (the display matrix) is
applied, so portrait phone videos come out upright; audio streams are never decoded.

Every failure raises `MediaError` naming the file and the reason (not a video, an
unsupported codec, a decoder error at a given time, no frames), which the preparation
reports and skips.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS

Frame = np.ndarray   # uint8 [H, W, 3]


class MediaError(ValueError):
  """A file that cannot be used, with the reason (`str(e)` is "path: reason")."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path, self.reason = path, reason


@dataclasses.dataclass(frozen=True)
class MediaInfo:
  """What a file holds. Height and width are as displayed (after rotation)."""
  path: str
  kind: str            # "video" | "image"
  height: int
  width: int
  rotation: int        # degrees counter-clockwise applied for display (0 for images)
  fps: float           # average frame rate of the stream (0 for images)
  duration: float      # seconds (0 for images)
  codec: str
  has_audio: bool

  @property
  def aspect_ratio(self) -> float:
    """Width / height as displayed."""
    return self.width / self.height


def is_image(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS)


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise MediaError(path, "no such file")
  if os.path.getsize(path) == 0:
    raise MediaError(path, "empty file (0 bytes)")


def _open(path: str):
  import av  # pylint: disable=g-import-not-at-top
  _check_file(path)
  try:
    container = av.open(path, metadata_errors="ignore")
  except (av.error.FFmpegError, UnicodeDecodeError) as e:
    raise MediaError(path, f"not a readable video ({e})") from None
  if not container.streams.video:
    container.close()
    raise MediaError(path, "no video stream")
  stream = container.streams.video[0]
  if stream.codec_context is None or not stream.codec_context.name:
    container.close()
    raise MediaError(path, "unsupported codec")
  return container, stream


def _read_image(path: str) -> Frame:
  from PIL import Image, ImageOps, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  _check_file(path)
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)   # EXIF orientation, like a viewer
      return np.asarray(image.convert("RGB"))
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise MediaError(path, f"not a readable image ({e})") from None


def _upright(frame: Frame, rotation: int) -> Frame:
  """Applies a display rotation of `rotation` degrees counter-clockwise."""
  return np.ascontiguousarray(np.rot90(frame, k=(rotation // 90) % 4))


def probe(path: str) -> MediaInfo:
  """Reads a file's header (videos) or pixels (images) and says what it holds."""
  if is_image(path):
    frame = _read_image(path)
    return MediaInfo(path, "image", frame.shape[0], frame.shape[1], 0, 0.0, 0.0, "image", False)
  container, stream = _open(path)
  with container:
    rotation, height, width = 0, stream.codec_context.height, stream.codec_context.width
    try:
      first = next(container.decode(stream))
    except StopIteration:
      raise MediaError(path, "no frames") from None
    except Exception as e:  # av raises FFmpegError subclasses and others for broken data
      raise MediaError(path, f"decoder error at the first frame ({e})") from None
    rotation = int(round(getattr(first, "rotation", 0) or 0))
    height, width = first.height, first.width
    if rotation % 180:
      height, width = width, height
    fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    if stream.duration is not None and stream.time_base is not None:
      duration = float(stream.duration * stream.time_base)
    else:
      duration = (container.duration or 0) / 1e6
    return MediaInfo(path, "video", height, width, rotation, fps, duration,
                     stream.codec_context.name, bool(container.streams.audio))


def iter_frames(path: str, fps: float, start: float = 0.0, end: float | None = None,
                transform: Callable[[Frame], Frame] | None = None,
                ) -> Iterator[tuple[float, Frame]]:
  """Yields `(time, frame)` at times `start + k / fps` up to `end` (default: the end).

  Args:
    path: a video (or an image: one frame at time 0).
    fps: the output frame rate.
    start, end: seconds from the stream's first frame; decoding seeks to `start`.
    transform: applied to each output frame (upright uint8 `[H, W, 3]`), e.g. a resize;
      applied once per source frame, however many output times show it.

  Raises:
    MediaError: the file is unreadable, or the decoder fails mid-stream (with the time).
  """
  if fps <= 0:
    raise ValueError(f"fps={fps} must be positive.")
  transform = transform or (lambda f: f)
  if is_image(path):
    yield 0.0, transform(_read_image(path))
    return
  container, stream = _open(path)
  stream.thread_type = "AUTO"
  with container:
    base = stream.time_base
    origin = None          # time of the stream's first frame
    if start > 0:
      first_pts = stream.start_time or 0
      container.seek(int(first_pts + start / base), stream=stream, backward=True)
      origin = float(first_pts * base)
    k, held, held_time, held_end = 0, None, None, None
    try:
      for frame in container.decode(stream):
        if frame.pts is None:
          continue
        t = float(frame.pts * base)
        origin = t if origin is None else origin
        t -= origin
        duration = float(frame.duration * base) if frame.duration else 1.0 / max(
            float(stream.average_rate or fps), 1e-6)
        while held is not None and start + k / fps < t:
          out_t = start + k / fps
          if end is not None and out_t >= end:
            return
          if out_t >= held_time:
            yield out_t, held
          k += 1
        if end is not None and t >= end and held is not None:
          return
        rotation = int(round(getattr(frame, "rotation", 0) or 0))
        # Bicubic chroma upsampling: the scaler the ffmpeg command line uses.
        image = _upright(frame.to_ndarray(format="rgb24", interpolation="BICUBIC"), rotation)
        held, held_time, held_end = transform(image), t, t + duration
    except MediaError:
      raise
    except Exception as e:  # av raises FFmpegError subclasses and others for broken data
      where = f"{held_time:.2f} s" if held_time is not None else "the start"
      raise MediaError(path, f"decoder error after {where} ({type(e).__name__}: {e})") from None
    if held is None:
      raise MediaError(path, "no frames" if start == 0 else f"no frames after {start:.2f} s")
    while start + k / fps < held_end and (end is None or start + k / fps < end):
      if start + k / fps >= held_time:
        yield start + k / fps, held
      k += 1


def read_frames(path: str, fps: float, start: float = 0.0, duration: float | None = None,
                transform: Callable[[Frame], Frame] | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
  """`times [T]` float64 and uint8 `frames [T, H, W, 3]` (see `iter_frames`)."""
  end = None if duration is None else start + duration
  pairs = list(iter_frames(path, fps, start, end, transform))
  if not pairs:
    raise MediaError(path, f"no frames between {start:.2f} s and "
                           f"{'the end' if end is None else f'{end:.2f} s'}")
  return np.array([t for t, _ in pairs]), np.stack([f for _, f in pairs])
