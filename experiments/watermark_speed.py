"""The watermark's embed and detect times (`sora_jax.provenance.watermark`) against the
complex-arithmetic forms it had before `fourier_coefficients` and the pattern synthesis
moved to real matrix products, on the same clips, side by side in one run; the outputs
are checked equal (bitwise embeds, the same detection scores).

  python -m experiments.watermark_speed [--clips 8] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Sequence

import numpy as np

from sora_jax import video_io
from sora_jax.data.world import WorldConfig, render_example
from sora_jax.provenance import watermark


def complex_coefficients(image: np.ndarray, period: float, freqs: np.ndarray) -> np.ndarray:
  """`watermark.fourier_coefficients` as it was: complex matrix products."""
  h, w = image.shape
  wy, wx = watermark._hann(h), watermark._hann(w)  # pylint: disable=protected-access
  img = (image - image.mean()) * wy[:, None] * wx[None, :]
  us, u_idx = np.unique(freqs[:, 0], return_inverse=True)
  vs, v_idx = np.unique(freqs[:, 1], return_inverse=True)
  ex = np.exp(-2j * np.pi * np.outer(np.arange(w), us) / period)
  ey = np.exp(-2j * np.pi * np.outer(vs, np.arange(h)) / period)
  return (ey @ (img @ ex))[v_idx, u_idx] / (wy.sum() * wx.sum())


def complex_pattern(coefficients: np.ndarray, freqs: np.ndarray, period: float, h: int,
                    w: int) -> np.ndarray:
  """The pattern synthesis as it was: a complex einsum."""
  ex = np.exp(2j * np.pi * np.outer(freqs[:, 0], np.arange(w)) / period)
  ey = np.exp(2j * np.pi * np.outer(freqs[:, 1], np.arange(h)) / period)
  return np.real(np.einsum("k,kh,kw->hw", coefficients, ey, ex))


def _timed(clips, bits) -> tuple[list[np.ndarray], list[watermark.Detection], float, float]:
  start = time.perf_counter()
  marked = [watermark.embed(c, bits) for c in clips]
  embed_s = time.perf_counter() - start
  start = time.perf_counter()
  found = [watermark.detect(m) for m in marked]
  return marked, found, embed_s / len(clips), (time.perf_counter() - start) / len(clips)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clips", type=int, default=8, help="World clips (8x32x32, shown 8x).")
  parser.add_argument("--out", default=None, help="Write the results as JSON.")
  args = parser.parse_args(argv)
  clips = [video_io.upscale(render_example(WorldConfig(frames=8, height=32, width=32),
                                           7000 + s)["video"], 8) for s in range(args.clips)]
  bits = watermark.payload_bits(3, 5)
  real = (watermark.fourier_coefficients, watermark._pattern)  # pylint: disable=protected-access
  watermark.detect(watermark.embed(clips[0], bits))      # warm-up: the key's layout, imports
  results = {}
  try:
    for name, (coefficients, pattern) in (("complex products (before)",
                                           (complex_coefficients, complex_pattern)),
                                          ("real products (now)", real)):
      # pylint: disable-next=protected-access
      watermark.fourier_coefficients, watermark._pattern = coefficients, pattern
      results[name] = _timed(clips, bits)
  finally:
    watermark.fourier_coefficients, watermark._pattern = real  # pylint: disable=protected-access
  (before, now) = results.values()
  same = (all(np.array_equal(a, b) for a, b in zip(before[0], now[0]))
          and all(abs(a.score - b.score) < 1e-9 for a, b in zip(before[1], now[1])))
  rows = [{"form": name, "embed_ms": round(r[2] * 1e3, 1), "detect_ms": round(r[3] * 1e3, 1)}
          for name, r in results.items()]
  print(f"{args.clips} clips of 8x256x256; outputs equal: {same}\n")
  print("| form | embed (ms per clip) | detect (ms per clip) |\n| --- | --- | --- |")
  for r in rows:
    print(f"| {r['form']} | {r['embed_ms']} | {r['detect_ms']} |")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"clips": args.clips, "outputs_equal": same, "rows": rows,
                 "machine": platform.machine(), "processor": platform.processor()}, f,
                indent=1)
  if not same:
    raise SystemExit("watermark_speed: the two forms gave different outputs.")


if __name__ == "__main__":
  main()
