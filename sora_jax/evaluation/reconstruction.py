"""Reconstruction quality of a video autoencoder: PSNR and SSIM per frame position.

Frame 0 is reported on its own: a causal video VAE encodes it alone (like an image),
so its quality differs from the frames that share a latent frame with their neighbours.
"""

from __future__ import annotations

from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np


def psnr_uint8(video: np.ndarray, reference: np.ndarray) -> float:
  """PSNR (dB) of a uint8 video (or image) against a uint8 reference of the same shape,
  over all their values at once (peak 255; identical arrays give 240 dB, not infinity)."""
  mse = np.mean((np.asarray(video, np.float64) - np.asarray(reference, np.float64)) ** 2)
  return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def psnr_ssim(reference: jax.Array, reconstruction: jax.Array) -> tuple[jax.Array, jax.Array]:
  """PSNR (dB) and SSIM of every frame, for videos `[B, T, H, W, C]` in [-1, 1].

  Both are computed on [0, 1] images (reconstructions clipped to it); SSIM uses the
  standard 11x11 Gaussian window with sigma 1.5 (`dm_pix.ssim`). Returns two `[B, T]`.
  """
  ref = (reference.astype(jnp.float32) + 1.0) / 2.0
  rec = jnp.clip((reconstruction.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
  b, t = ref.shape[:2]
  ref, rec = ref.reshape((b * t,) + ref.shape[2:]), rec.reshape((b * t,) + rec.shape[2:])
  mse = jnp.square(ref - rec).mean(axis=(1, 2, 3))
  psnr = 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))
  ssim = dm_pix.ssim(ref, rec)
  return psnr.reshape(b, t), ssim.reshape(b, t)


def summarise(psnr: np.ndarray, ssim: np.ndarray) -> dict[str, Any]:
  """Per-frame-position and overall means of `[N, T]` PSNR/SSIM arrays.

  Returns `{"psnr", "ssim"}` over all frames, `{"psnr_first_frame", "ssim_first_frame"}`,
  `{"psnr_other_frames", "ssim_other_frames"}` (frames 1..T-1, absent for images) and
  `{"psnr_per_frame", "ssim_per_frame"}` lists indexed by frame position.
  """
  psnr, ssim = np.asarray(psnr, np.float64), np.asarray(ssim, np.float64)
  out: dict[str, Any] = {
      "examples": int(psnr.shape[0]),
      "psnr": float(psnr.mean()), "ssim": float(ssim.mean()),
      "psnr_first_frame": float(psnr[:, 0].mean()), "ssim_first_frame": float(ssim[:, 0].mean()),
      "psnr_per_frame": [float(v) for v in psnr.mean(0)],
      "ssim_per_frame": [float(v) for v in ssim.mean(0)],
  }
  if psnr.shape[1] > 1:
    out["psnr_other_frames"] = float(psnr[:, 1:].mean())
    out["ssim_other_frames"] = float(ssim[:, 1:].mean())
  return out
