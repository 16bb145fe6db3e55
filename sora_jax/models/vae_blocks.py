"""The building blocks of the causal video VAE (`sora_jax.models.vae`): causal 3D
convolutions with carried caches, residual blocks, per-frame attention, and the
temporal/spatial down- and up-sampling of the encoder and decoder.

Shape letters: B batch, T/H/W frames/height/width, C channels. A cache is a nested dict
of arrays mirroring the module tree (`Cache`): what a causal convolution needs of the
frames before the current chunk.
"""

from __future__ import annotations

from typing import Any, Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx


from sora_jax.models.convolution import video_conv
from sora_jax.models.attention import dot_product_attention
from sora_jax.models.layers import RMSNorm
from sora_jax.parallel import axes

Cache = dict[str, Any]


def conv_initializers(out_axis: str | None = axes.CONV_OUT) -> dict[str, Any]:
  """`kernel_init` / `bias_init` for an `nnx.Conv` over `[B, T, H, W, C]`, whose kernel
  `[kt, kh, kw, Cin, Cout]` and bias `[Cout]` carry logical axis names (`out_axis=None`:
  the output channels are never sharded, e.g. a one-channel head)."""
  return {"kernel_init": nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                               (None, None, None, axes.CONV_IN, out_axis)),
          "bias_init": nnx.with_partitioning(nnx.initializers.zeros_init(), (out_axis,))}


class CausalConv3d(nnx.Module):
  """A 3D convolution, causal in time (left-padded by `kt - 1` frames), 'same' in space.

  `__call__(x, cache)`: `x [B, T, H, W, Cin]` -> `([B, T, H', W', Cout], cache')`, where
  `cache` `[B, kt - 1, H, W, Cin]` holds the frames before `x` (zeros before the video
  starts, when None) and `cache'` the last `kt - 1` frames of `concat(cache, x)`.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = (3, 3, 3), *,
               stride: Sequence[int] = (1, 1, 1), factorized: bool = False,
               pad_end: bool = False, rngs: nnx.Rngs):
    """`pad_end`: pad space only after the last row and column (by k - 2), as a stride-2
    convolution after `ZeroPad2d((0, 1, 0, 1))` does (Wan), instead of 'same' padding."""
    kt, kh, kw = kernel
    self.context = kt - 1
    # factorized ("2+1D"): a (1, kh, kw) spatial conv, then a (kt, 1, 1) temporal one;
    # about kt*kh*kw / (kh*kw + kt) times fewer FLOPs than the full 3D kernel.
    self.factorized = factorized and kt > 1 and kh * kw > 1
    spatial = (1, kh, kw) if self.factorized else (kt, kh, kw)
    self.conv = video_conv(
        in_channels, out_channels, kernel_size=spatial, strides=tuple(stride),
        padding=(((0, 0), (0, max(kh - 2, 0)), (0, max(kw - 2, 0))) if pad_end else
                 ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))),
        **conv_initializers(), rngs=rngs)
    self.temporal = video_conv(
        out_channels, out_channels, kernel_size=(kt, 1, 1), padding="VALID",
        **conv_initializers(), rngs=rngs) if self.factorized else None

  def __call__(self, x: jax.Array, cache: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    if self.factorized:
      x = self.conv(x)                                        # [B, T, H', W', Cout]
      conv = self.temporal
    else:
      conv = self.conv
    if not self.context:
      return conv(x), None
    if cache is None:
      cache = jnp.zeros(x.shape[:1] + (self.context,) + x.shape[2:], x.dtype)
    x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)   # [B, kt - 1 + T, H, W, C]
    return conv(x), x[:, -self.context:]


class ResBlock3d(nnx.Module):
  """norm -> SiLU -> causal conv -> norm -> SiLU -> causal conv, plus a (1x1x1) shortcut."""

  def __init__(self, in_channels: int, out_channels: int, *, factorized: bool = False,
               norm: str = "rms", rngs: nnx.Rngs):
    self.norm1 = channel_norm(in_channels, norm)
    self.conv1 = CausalConv3d(in_channels, out_channels, factorized=factorized, rngs=rngs)
    self.norm2 = channel_norm(out_channels, norm)
    self.conv2 = CausalConv3d(out_channels, out_channels, factorized=factorized, rngs=rngs)
    self.shortcut = (CausalConv3d(in_channels, out_channels, (1, 1, 1), rngs=rngs)
                     if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache]:
    cache = cache or {}
    h, c1 = self.conv1(jax.nn.silu(self.norm1(x)), cache.get("conv1"))
    h, c2 = self.conv2(jax.nn.silu(self.norm2(h)), cache.get("conv2"))
    skip = x if self.shortcut is None else self.shortcut(x)[0]
    return skip + h, {"conv1": c1, "conv2": c2}


def channel_norm(channels: int, form: str) -> RMSNorm:
  """The VAE's norm over channels at each position: "rms" (`x / sqrt(mean(x^2) + 1e-6)`)
  or "l2" (`x / max(|x|, 1e-12) * sqrt(C)`, Wan's), both times a learned gain."""
  return RMSNorm(channels, eps=1e-12 if form == "l2" else 1e-6, l2=form == "l2")


class FrameAttention(nnx.Module):
  """Single-head self-attention over the positions of each frame, with a residual
  (Wan's VAE middle): `[B, T, H, W, C]` -> same."""

  def __init__(self, channels: int, *, norm: str, rngs: nnx.Rngs):
    self.norm = channel_norm(channels, norm)
    init = dict(kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                  (axes.CONV_IN, axes.CONV_OUT)),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes.CONV_OUT,)))
    self.qkv = nnx.Linear(channels, 3 * channels, **init, rngs=rngs)
    self.proj = nnx.Linear(channels, channels, **init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
    out = dot_product_attention(q, k, v)                                  # [BT, HW, 1, C]
    return x + self.proj(out.reshape(b, t, h, w, c))


def _pair_frames(x: jax.Array, pad: str) -> jax.Array:
  """`[B, T, H, W, C]` -> `[B, ceil(T/2), 2, H, W, C]`: causal frame pairs (2j - 1, 2j); an
  odd-length video is left-padded with one frame (zeros, or a copy of its first frame)."""
  if x.shape[1] % 2:
    first = jnp.zeros_like(x[:, :1]) if pad == "zeros" else x[:, :1]
    x = jnp.concatenate([first, x], axis=1)
  b, t, h, w, c = x.shape
  return x.reshape(b, t // 2, 2, h, w, c)


def group_mean(x: jax.Array, channels: int) -> jax.Array:
  """Averages consecutive groups of `[..., C]` channels down to `channels` (C a multiple)."""
  return x.reshape(x.shape[:-1] + (channels, x.shape[-1] // channels)).mean(-1)


def average_down(x: jax.Array, channels: int, *, time: bool, space: bool) -> jax.Array:
  """Wan 2.2's parameter-free encoder shortcut (diffusers' `AvgDown3D`):
  `[B, T, H, W, C]` -> `[B, ceil(T / ft), H / fs, W / fs, channels]` (ft, fs = 2 where
  `time`, `space`, else 1). Frames are left-padded with zeros to a multiple of ft (a
  video's first frame stays on its own); each ft x fs x fs block's values, ordered
  (channel, frame, row, column), are averaged in consecutive groups down to `channels`."""
  ft, fs = (2 if time else 1), (2 if space else 1)
  if x.shape[1] % ft:
    x = jnp.concatenate([jnp.zeros_like(x[:, :ft - x.shape[1] % ft]), x], axis=1)
  x = einops.rearrange(x, "b (t i) (h j) (w k) c -> b t h w (c i j k)", i=ft, j=fs, k=fs)
  return group_mean(x, channels)


def duplicate_up(x: jax.Array, channels: int, *, time: bool, space: bool,
                 first: bool) -> jax.Array:
  """Wan 2.2's parameter-free decoder shortcut (diffusers' `DupUp3D`), the inverse
  arrangement of `average_down`: `[B, T, H, W, C]` -> `[B, T * ft, H * fs, W * fs, channels]`
  with each channel repeated into its (channel, frame, row, column) block; at the start
  of a video (`first`) the first ft - 1 frames are dropped (one latent frame, one frame)."""
  ft, fs = (2 if time else 1), (2 if space else 1)
  x = jnp.repeat(x, channels * ft * fs * fs // x.shape[-1], axis=-1)
  x = einops.rearrange(x, "b t h w (c i j k) -> b (t i) (h j) (w k) c", i=ft, j=fs, k=fs)
  return x[:, ft - 1:] if first else x


class Downsample(nnx.Module):
  """Halves space (a stride-2 3x3 conv per frame) and/or time.

  resample="pairs": in time, frames (2j - 1, 2j) become output frame j through a 1x1x1
  conv over their stacked channels; a video of odd length (a first chunk) is
  left-padded with one zero frame so that its first frame stays on its own. Later
  chunks have even lengths and need no state from earlier ones. With `shortcut`, the
  output adds a parameter-free average of the input over the merged pixels/frames
  (DC-AE's space-to-channel residual), which eases training at high compression.

  resample="wan": space is padded after the last row/column only; in time, frame 0
  passes unchanged and output j >= 1 is a 3-tap stride-2 conv over frames
  (2j - 2, 2j - 1, 2j); chunks carry the last frame as the cache.
  """

  def __init__(self, channels: int, *, time: bool, space: bool, rngs: nnx.Rngs,
               shortcut: bool = False, resample: str = "pairs"):
    self.time, self.space, self.shortcut = time, space, shortcut
    self.resample = resample
    wan = resample == "wan"
    self.spatial = (CausalConv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2), pad_end=wan,
                                 rngs=rngs) if space else None)
    if not time:
      self.temporal = None
    elif wan:
      self.temporal = video_conv(channels, channels, kernel_size=(3, 1, 1), strides=(2, 1, 1),
                               padding="VALID", **conv_initializers(), rngs=rngs)
    else:
      self.temporal = CausalConv3d(2 * channels, channels, (1, 1, 1), rngs=rngs)

  def __call__(self, x: jax.Array, cache: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    """`x [B, T, H, W, C]`; `cache`: the previous chunk's last frame (resample="wan"),
    None at the start of a video. Returns the output and the next cache."""
    if self.space:
      y = self.spatial(x)[0]
      if self.shortcut:
        b, t, h, w, c = x.shape
        y = y + x.reshape(b, t, h // 2, 2, w // 2, 2, c).mean((3, 5)).astype(y.dtype)
      x = y
    if not self.time:
      return x, None
    if self.resample == "wan":
      last = x[:, -1:]
      if cache is None:                                  # the video starts here
        rest = self.temporal(x) if x.shape[1] >= 3 else x[:, :0]
        return jnp.concatenate([x[:, :1], rest.astype(x.dtype)], axis=1), last
      return self.temporal(jnp.concatenate([cache.astype(x.dtype), x], axis=1)), last
    pairs = _pair_frames(x, "zeros")                             # [B, T/2, 2, H, W, C]
    b, t2, _, h, w, c = pairs.shape
    y = self.temporal(jnp.moveaxis(pairs, 2, -2).reshape(b, t2, h, w, 2 * c))[0]
    if self.shortcut:
      y = y + _pair_frames(x, "copy").mean(2).astype(y.dtype)
    return y, None


class Upsample(nnx.Module):
  """Doubles space (nearest, then a 3x3 conv) and/or time (a causal conv to 2C channels,
  split into two frames). The very first frame of a video is not doubled (`first=True`):
  one latent frame is one pixel frame there, mirroring `Downsample`.

  resample="pairs": the time conv runs over every frame and the first output is dropped.
  resample="wan": frame 0 passes unchanged and the time conv runs on the frames after it
  (zeros before frame 1); the spatial conv halves the channels (`out_channels`) unless
  `keep_width`.
  """

  def __init__(self, channels: int, *, time: bool, space: bool, rngs: nnx.Rngs,
               shortcut: bool = False, resample: str = "pairs", keep_width: bool = False):
    """`keep_width`: with resample="wan", the spatial conv keeps the width (Wan 2.2)."""
    self.time, self.space, self.shortcut = time, space, shortcut
    self.resample = resample
    self.out_channels = channels // 2 if resample == "wan" and not keep_width else channels
    self.temporal = CausalConv3d(channels, 2 * channels, (3, 1, 1), rngs=rngs) if time else None
    self.spatial = (CausalConv3d(channels, self.out_channels, (1, 3, 3), rngs=rngs)
                    if space else None)

  def _double(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    y, cache = self.temporal(x, cache)
    b, t, h, w, c2 = y.shape
    y = y.reshape(b, t, h, w, 2, c2 // 2)
    return jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, c2 // 2), cache   # [B, 2T, H, W, C]

  def __call__(self, x: jax.Array, cache: Cache | None = None, *, first: bool = True
               ) -> tuple[jax.Array, Cache]:
    cache = cache or {}
    new: Cache = {}
    if self.time and self.resample == "wan":
      if not first:
        x, new["temporal"] = self._double(x, cache.get("temporal"))
      elif x.shape[1] > 1:
        rest, new["temporal"] = self._double(x[:, 1:], None)
        x = jnp.concatenate([x[:, :1], rest.astype(x.dtype)], axis=1)
      else:   # a first chunk of one frame: the time conv has seen nothing yet
        new["temporal"] = jnp.zeros(x.shape[:1] + (2,) + x.shape[2:], x.dtype)
    elif self.time:
      y, new["temporal"] = self._double(x, cache.get("temporal"))
      if self.shortcut:                                          # each frame, twice
        y = y + jnp.repeat(x, 2, axis=1).astype(y.dtype)
      x = y[:, 1:] if first else y
    if self.space:
      x2 = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
      y = self.spatial(x2)[0]
      x = y + x2.astype(y.dtype) if self.shortcut else y
    return x, new
