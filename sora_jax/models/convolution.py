"""3D convolution over video as a sum of 2D convolutions over its frames, for XLA:CPU.

XLA:CPU lowers a 3D convolution several times slower than a 2D one of the same work: a
3x3x3 convolution of `[1, 15, 256, 256, 16]` to 16 channels takes about 430 ms there, and
the same convolution written as three 2D convolutions (one per temporal tap, the frames
folded into the batch) and summed about 120 ms; its gradient 1.5 s against 0.4 s (2-core
AVX-512 machine, jax 0.10). GPU and TPU compilers have their own 3D convolutions, so the
rewrite is applied only when compiling for CPU.

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` that `nnx.Conv`
takes as its `conv_general_dilated=` argument; `video_conv` builds such an `nnx.Conv`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.parallel.sharding import compile_platform

VIDEO_LAYOUT = ("NDHWC", "DHWIO", "NDHWC")   # [B, T, H, W, C], [kt, kh, kw, Cin, Cout]
# Inputs smaller than this many elements keep one 3D convolution: there a few fewer ops
# compile faster, and the convolution's time is negligible either way.
MIN_ELEMENTS = 2 ** 18
FRAME_LAYOUT = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         **kwargs: Any) -> jax.Array:
  """`jax.lax.conv_general_dilated`; when compiling for CPU, a channels-last 3D convolution
  without dilation `[B, T, H, W, Cin] * [kt, kh, kw, Cin, Cout]` of an input of at least
  `MIN_ELEMENTS` runs as `frame_taps_conv`. Everything else (and every other platform)
  goes to lax unchanged."""
  def lax_conv():
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, **kwargs)

  undilated = all(d == 1 for d in (lhs_dilation or ()) + tuple(rhs_dilation or ()))
  if (lhs.ndim != 5 or lhs.size < MIN_ELEMENTS or not undilated or compile_platform() != "cpu"
      or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, VIDEO_LAYOUT)):
    return lax_conv()
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], window_strides, padding)
  return frame_taps_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)),
                         feature_group_count=feature_group_count, **kwargs)


def frame_taps_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int] = (1, 1, 1),
                    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0), (0, 0)), *,
                    feature_group_count: int = 1, **kwargs: Any) -> jax.Array:
  """A 3D convolution as `kt` 2D convolutions summed: `x [B, T, H, W, Cin]`, `kernel
  [kt, kh, kw, Cin / groups, Cout]` -> `[B, T', H', W', Cout]`, where temporal tap `i`
  convolves the frames `i, i + st, ...` of the time-padded video (folded into the batch)
  with `kernel[i]`. Equal to the 3D convolution up to float rounding."""
  (pad_before, pad_after), spatial_padding = padding[0], tuple(padding[1:])
  x = jnp.pad(x, ((0, 0), (pad_before, pad_after), (0, 0), (0, 0), (0, 0)))
  b, t, h, w, c = x.shape
  kt, stride = kernel.shape[0], strides[0]
  frames = (t - kt) // stride + 1
  total = None
  for tap in range(kt):
    taken = x[:, tap:tap + stride * (frames - 1) + 1:stride].reshape(b * frames, h, w, c)
    y = jax.lax.conv_general_dilated(
        taken, kernel[tap], strides[1:], spatial_padding, dimension_numbers=FRAME_LAYOUT,
        feature_group_count=feature_group_count, **kwargs)
    total = y if total is None else total + y
  return total.reshape((b, frames) + total.shape[1:])


def video_conv(in_features: int, out_features: int, kernel_size: Sequence[int],
               **kwargs: Any) -> nnx.Conv:
  """`nnx.Conv` over `[B, T, H, W, C]` with this module's `conv_general_dilated` (the same
  parameters, `kernel [kt, kh, kw, Cin, Cout]`, as a plain `nnx.Conv`)."""
  return nnx.Conv(in_features, out_features, kernel_size,
                  conv_general_dilated=conv_general_dilated, **kwargs)
