"""Writing generated media the way every output is written: watermarked, then signed."""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections
import numpy as np

from sora_jax import video_io
from sora_jax.provenance import credentials, manifest, watermark


def write_generated_sheet(path: str, videos: np.ndarray, labels: Sequence[str] | None, *,
                          config: ml_collections.ConfigDict, step: int | None, scale: int = 1,
                          generation: dict[str, Any] | None = None) -> str:
  """A PNG contact sheet of generated uint8 `videos [N, T, H, W, 3]` carrying the run's
  watermark and a signed C2PA manifest (`credentials.default_credentials()`); returns `path`.

  `generation` adds fields to the manifest's `org.sora_jax.generation` record (the config
  hash, step and watermark are always there).
  """
  signing = credentials.default_credentials()
  config_sha256 = manifest.config_hash(config)
  video_io.write_contact_sheet(path, videos, labels, scale=scale,
                               mark=watermark.marker(config_sha256, step))
  record = {"config_sha256": config_sha256, "step": step,
            "watermark": watermark.describe(config_sha256, step), **(generation or {})}
  manifest.sign_output(path, signing, generation=record)
  return path
