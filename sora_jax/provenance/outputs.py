"""The one writer of generated media: watermarked, then signed, and only then at its path.

Every output path of the system (`sora-jax sample`, the experiments' sheets, the demo)
goes through `write_generated`: the frames are watermarked with the run's payload
(`watermark.marker`), written beside the destination as `<name>.unsigned<ext>`, and a
signed C2PA manifest moves them to the destination, so the destination only ever holds a
finished, signed file. `GeneratedStream` does the same for a video written as it is made
(`sora-jax sample --stream`): its chunks grow a watermarked `<name>.partial.mp4`, signed to
the destination when the video ends.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from sora_jax import video_io
from sora_jax.provenance import credentials, manifest, watermark

_DEFAULT = object()


def write_generated(path: str, videos: np.ndarray, *, config: ml_collections.ConfigDict,
                    step: int | None, generation: dict[str, Any] | None = None,
                    signing: credentials.Credentials | None | object = _DEFAULT,
                    ingredients: Sequence[str] = (), mark: bool = True, fps: int = 8,
                    scale: int = 1, labels: Sequence[str] | None = None) -> tuple[dict, str]:
  """Writes uint8 `videos [N, T, H, W, 3]`: an `.mp4` of the one video (N = 1), or a `.png`
  contact sheet of all of them (`labels` per row); returns `(generation record, the line
  saying who signed it)`.

  Args:
    config, step: the run the frames come from: its config hash and step make the
      watermark's payload and the manifest's `org.sora_jax.generation` record.
    generation: more fields of that record (seed, sampler settings, mode, prompt).
    signing: the credentials (default: `credentials.default_credentials()`); None only
      for an explicit `--no-sign`.
    ingredients: input files the output was made from (recorded in the manifest).
    mark: embed the invisible watermark (False only for an explicit `--no-watermark`).
  """
  signing = _signing(signing)
  record, marker = _record_and_marker(config, step, generation, mark)
  base, ext = os.path.splitext(path)
  unsigned = f"{base}.unsigned{ext}"
  if ext == ".png":
    video_io.write_contact_sheet(unsigned, videos, scale=scale, mark=marker)
    if labels is not None:
      video_io.write_labels(path, labels)
  elif ext == ".mp4":
    if len(videos) != 1:
      raise ValueError(f"{path}: an mp4 holds one video, got {len(videos)}.")
    video_io.write_mp4(unsigned, videos[0], fps=fps, scale=scale, mark=marker)
  else:
    raise ValueError(f"{path}: outputs are .mp4 or .png files.")
  try:
    message = manifest.sign_output(unsigned, signing, generation=record,
                                   ingredients=tuple(ingredients), dest=path)
  finally:
    if os.path.exists(unsigned):
      os.remove(unsigned)
  return record, message


def _signing(signing: credentials.Credentials | None | object
             ) -> credentials.Credentials | None:
  """The credentials to sign with: the default ones unless given (None: `--no-sign`)."""
  return credentials.default_credentials() if signing is _DEFAULT else signing


def _record_and_marker(config: ml_collections.ConfigDict, step: int | None,
                       generation: dict[str, Any] | None, mark: bool):
  """`(generation record, watermark marker or None)` of an output of the run `config` at
  `step`: the record holds the config hash, the step, `generation` and the watermark's
  description; the marker embeds that payload (`video_io`'s `mark`)."""
  config_sha256 = manifest.config_hash(config)
  record = {"config_sha256": config_sha256, "step": step, **(generation or {}),
            "watermark": watermark.describe(config_sha256, step) if mark else "none"}
  return record, (watermark.marker(config_sha256, step) if mark else None)


def write_generated_sheet(path: str, videos: np.ndarray, labels: Sequence[str] | None, *,
                          config: ml_collections.ConfigDict, step: int | None, scale: int = 1,
                          generation: dict[str, Any] | None = None) -> str:
  """A PNG contact sheet of generated uint8 `videos [N, T, H, W, 3]` carrying the run's
  watermark and a signed C2PA manifest (`credentials.default_credentials()`); returns `path`."""
  write_generated(path, videos, config=config, step=step, generation=generation, scale=scale,
                  labels=labels)
  return path


class GeneratedStream:
  """A generated video written chunk by chunk as it is made (`sample --stream`).

  Every chunk is watermarked with the run's payload and appended to `<name>.partial.mp4`, a
  fragmented mp4 that players read while it grows (`video_io.Mp4Stream`); `finish` signs it
  into `path` (a C2PA manifest, as `write_generated` signs) and removes the partial file. A
  stream that stops early (an error, Ctrl-C) is finished with what it holds, its record
  saying so, so the frames already made are not lost and still signed.
  """

  def __init__(self, path: str, *, config: ml_collections.ConfigDict, step: int | None,
               generation: dict[str, Any] | None = None,
               signing: credentials.Credentials | None | object = _DEFAULT,
               mark: bool = True, fps: int = 8, scale: int = 1):
    if not path.endswith(".mp4"):
      raise ValueError(f"{path}: a streamed video is an .mp4 file.")
    self.path = path
    self.signing = _signing(signing)
    self.record, marker = _record_and_marker(config, step, generation, mark)
    self.partial = f"{os.path.splitext(path)[0]}.partial.mp4"
    self._video = video_io.Mp4Stream(self.partial, fps=fps, scale=scale, mark=marker)

  @property
  def frames(self) -> int:
    return self._video.frames

  def write(self, frames: np.ndarray) -> None:
    """Appends uint8 `frames [t, H, W, 3]` (watermarked) to the growing file."""
    self._video.append(frames)

  def finish(self, complete: bool = True, **fields: Any) -> tuple[dict, str]:
    """Closes the video and signs it into `path` (the record gets `fields`, the frames
    written and whether the video is `complete`); returns `(record, signing line)`."""
    self._video.close()
    self.record.update(fields, frames_written=self.frames, complete=complete)
    try:
      message = manifest.sign_output(self.partial, self.signing, generation=self.record,
                                     dest=self.path)
    finally:
      if os.path.exists(self.partial):
        os.remove(self.partial)
    return self.record, message
