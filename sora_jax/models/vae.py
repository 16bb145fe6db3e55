"""A causal 3D convolutional video VAE (the Wan 2.1 / CogVideoX / MAGVIT-v2 family).

Videos `[B, T, H, W, 3]` in [-1, 1] with T = 1 + k * ft (ft the temporal factor)
map to latents `[B, 1 + k, H / fs, W / fs, Z]`: every convolution is causal in time
(it sees only the current and earlier frames), so the first frame is encoded on its
own and an image is a one-frame video in the same latent space. Norms are RMS over
channels at each position (`layers.RMSNorm`), so no statistics mix frames either.

Chunked encoding and decoding carry each causal convolution's last `kt - 1` input
frames (its cache) from one chunk to the next, so a video of any length runs in the
memory of one chunk and gives the same latents as encoding it whole. Spatial tiling
with overlap blending (`tiled_encode`, `tiled_decode`) bounds memory in height and width.

Wan 2.1's VAE (diffusers `AutoencoderKLWan`) is a configuration of these modules:
`norm="l2"`, `resample="wan"`, `mid_attention`, `quant_convs`, `clip_output` (see
`VAEConfig` and `sora_jax/interop/wan_vae.py`).

Shape letters: B batch, T/H/W frames/height/width, C channels, Z latent channels.
Caches are nested dicts of arrays mirroring the module tree (`Cache`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models.vae_blocks import (  # noqa: F401  (public names of this module too)
    Cache, CausalConv3d, Downsample, FrameAttention, ResBlock3d, Upsample, average_down,
    channel_norm, conv_initializers, duplicate_up, group_mean)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of `VideoVAE`.

  compression: `(ft, fs, fs)` temporal and spatial downsampling, powers of two.
  channels: width of each resolution level; there are `len(channels) - 1` downsampling
    stages, spatial ones first, temporal ones on the last `log2(ft)` stages.
  factorized: each 3x3x3 convolution becomes a 1x3x3 then a 3x1x1 one ((2+1)D).
  patch: p x p pixels are folded into channels before the encoder (and unfolded after
    the decoder), as in the LTX-Video and Cosmos tokenizers: part of the spatial factor,
    and the network's full-resolution stage runs on p^2 times fewer positions.
  decoder_channels: the decoder's widths per level (same number of levels, listed from
    full resolution like `channels`); None = `channels`. A decoder wider than the encoder
    spends parameters where reconstruction sharpness comes from.
  residual_stages: Wan 2.2's residual VAE (with resample="wan"): every encoder level adds
    its input, averaged down to the level's output shape (`average_down`), and every
    upsampling decoder level adds its input duplicated up (`duplicate_up`); the decoder's
    upsampling keeps the width instead of halving it.
  """
  compression: tuple[int, int, int] = (4, 8, 8)
  latent_channels: int = 16
  channels: tuple[int, ...] = (32, 64, 128, 128)
  num_res_blocks: int = 1
  in_channels: int = 3
  factorized: bool = False   # (2+1)D convolutions: spatial 3x3, then temporal 3 (cheaper)
  patch: int = 1             # pixels folded into channels (p x p) before the first conv
  shortcuts: bool = False    # parameter-free resampling shortcuts (DC-AE), see Downsample
  # Options that express Wan 2.1's VAE with these modules:
  norm: str = "rms"          # "rms" | "l2" (x / |x| * sqrt(C) * gain, Wan's RMS_norm)
  resample: str = "pairs"    # "pairs" | "wan", see Downsample and Upsample
  mid_attention: bool = False  # single-head attention over each frame between mid blocks
  quant_convs: bool = False  # 1x1x1 convs after the encoder and before the decoder
  clip_output: bool = False  # decoded videos clipped to [-1, 1]
  decoder_channels: tuple[int, ...] | None = None
  residual_stages: bool = False

  def __post_init__(self):
    ft, fh, fw = self.compression
    if fh != fw:
      raise ValueError(f"vae.compression={self.compression}: height and width factors must match.")
    stages = len(self.channels) - 1
    if self.patch < 1 or fh % self.patch:
      raise ValueError(f"vae.patch={self.patch} must be positive and divide the spatial factor "
                       f"{fh}.")
    for name, factor in (("temporal", ft), ("spatial", fh // self.patch)):
      if factor < 1 or factor & (factor - 1):
        raise ValueError(f"vae.compression={self.compression}: {name} factor {factor} is not a "
                         "power of two.")
      if int(math.log2(factor)) > stages:
        raise ValueError(f"vae.compression={self.compression}: a {name} factor of {factor} needs "
                         f"{int(math.log2(factor))} stages, vae.channels gives {stages}.")
    if self.decoder_channels is not None and len(self.decoder_channels) != len(self.channels):
      raise ValueError(f"vae.decoder_channels={self.decoder_channels} must have one width per "
                       f"level of vae.channels={self.channels}.")
    if self.num_res_blocks < 1 or self.latent_channels < 1:
      raise ValueError("vae.num_res_blocks and vae.latent_channels must be positive.")
    if self.norm not in ("rms", "l2"):
      raise ValueError(f"vae.norm={self.norm!r}: expected rms or l2.")
    if self.resample not in ("pairs", "wan"):
      raise ValueError(f"vae.resample={self.resample!r}: expected pairs or wan.")
    if self.resample == "wan" and (self.shortcuts or self.factorized):
      raise ValueError("vae.resample='wan' works without shortcuts and factorized convolutions.")
    if self.residual_stages:
      self._check_residual_stages()

  def _check_residual_stages(self):
    if self.resample != "wan":
      raise ValueError("vae.residual_stages needs vae.resample='wan' (Wan 2.2's VAE).")
    factors = [(2 if t else 1) * (4 if s else 1) for t, s in self.stage_downsampling] + [1]
    ch, dec = self.channels, tuple(reversed(self.decoder_channels or self.channels))
    for i, factor in enumerate(factors):
      if (ch[max(i - 1, 0)] * factor) % ch[i]:
        raise ValueError(f"vae.residual_stages: vae.channels={ch}: the input width of level "
                         f"{i} times its downsampling factor {factor} must divide by its "
                         f"width {ch[i]}.")
    for i, factor in enumerate(reversed(factors[:-1])):
      if (dec[i] * factor) % dec[max(i - 1, 0)]:
        raise ValueError(f"vae.residual_stages: decoder widths {dec} (lowest resolution first): "
                         f"level {i}'s width times its upsampling factor {factor} must divide "
                         f"by its input width {dec[max(i - 1, 0)]}.")

  @property
  def stage_downsampling(self) -> list[tuple[bool, bool]]:
    """`(time, space)` downsampling of each stage."""
    stages = len(self.channels) - 1
    time_stages = int(math.log2(self.compression[0]))
    space_stages = int(math.log2(self.compression[1] // self.patch))
    return [(i >= stages - time_stages, i < space_stages) for i in range(stages)]

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """`(T', H', W', Z)` of the latent of a `[frames, height, width]` video."""
    ft, fs, _ = self.compression
    check_video_shape(self, frames, height, width)
    return (1 + (frames - 1) // ft, height // fs, width // fs, self.latent_channels)


def check_video_shape(config: VAEConfig, frames: int, height: int, width: int) -> None:
  """Raises ValueError unless frames = 1 + k * ft and height, width divide by fs."""
  ft, fs, _ = config.compression
  if frames < 1 or (frames - 1) % ft:
    raise ValueError(f"the VAE encodes 1 + k * {ft} frames (temporal factor {ft}); got {frames}.")
  if height % fs or width % fs:
    raise ValueError(f"the VAE needs height and width divisible by {fs}; got {height}x{width}.")


def mid_blocks(channels: int, config: VAEConfig, rngs: nnx.Rngs
               ) -> tuple[nnx.List, FrameAttention | None]:
  """The two middle residual blocks and, with `mid_attention`, the attention between them."""
  blocks = nnx.List([ResBlock3d(channels, channels, factorized=config.factorized,
                                norm=config.norm, rngs=rngs) for _ in range(2)])
  attention = (FrameAttention(channels, norm=config.norm, rngs=rngs)
               if config.mid_attention else None)
  return blocks, attention


def apply_mid(blocks: nnx.List, attention: FrameAttention | None, x: jax.Array,
              cache: Cache, new: Cache) -> jax.Array:
  """Runs `mid_blocks`' modules, reading and writing caches `mid0`, `mid1`."""
  x, new["mid0"] = blocks[0](x, cache.get("mid0"))
  if attention is not None:
    x = attention(x)
  x, new["mid1"] = blocks[1](x, cache.get("mid1"))
  return x


def apply_blocks(blocks: nnx.List, indices: range, x: jax.Array, cache: Cache,
                 new: Cache) -> jax.Array:
  """Runs `blocks[i]` for i in `indices` (one resolution level), reading and writing
  caches `block{i}`."""
  for i in indices:
    x, new[f"block{i}"] = blocks[i](x, cache.get(f"block{i}"))
  return x


class Encoder(nnx.Module):
  """Video `[B, T, H, W, C]` -> moments `[B, T', H', W', 2Z]` (mean and log-variance)."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    ch = config.channels
    f, self.patch, norm = config.factorized, config.patch, config.norm
    self.conv_in = CausalConv3d(config.in_channels * config.patch ** 2, ch[0], factorized=f,
                                rngs=rngs)
    blocks, downs = [], []
    prev = ch[0]
    for i, width in enumerate(ch):
      for _ in range(config.num_res_blocks):
        blocks.append(ResBlock3d(prev, width, factorized=f, norm=norm, rngs=rngs))
        prev = width
      if i < len(ch) - 1:
        time, space = config.stage_downsampling[i]
        downs.append(Downsample(width, time=time, space=space, rngs=rngs,
                                shortcut=config.shortcuts, resample=config.resample))
    self.blocks = nnx.List(blocks)
    self.downs = nnx.List(downs)
    self.num_res_blocks = config.num_res_blocks
    self.residual_stages = config.residual_stages
    self.widths = ch
    self.downsampling = config.stage_downsampling + [(False, False)]
    self.mid, self.mid_attention = mid_blocks(prev, config, rngs)
    self.norm_out = channel_norm(prev, norm)
    self.conv_out = CausalConv3d(prev, 2 * config.latent_channels, factorized=f, rngs=rngs)
    # With shortcuts, the posterior mean adds the channel-group average of the features.
    self.latent_shortcut = config.shortcuts and prev % config.latent_channels == 0
    self.latent_channels = config.latent_channels
    z2 = 2 * config.latent_channels
    self.quant_conv = CausalConv3d(z2, z2, (1, 1, 1), rngs=rngs) if config.quant_convs else None

  def __call__(self, x: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache]:
    cache = cache or {}
    new: Cache = {}
    p = self.patch
    x = einops.rearrange(x, "b t (h p) (w q) c -> b t h w (p q c)", p=p, q=p)
    h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
    nrb = self.num_res_blocks
    for level, width in enumerate(self.widths):
      level_input = h
      h = apply_blocks(self.blocks, range(level * nrb, (level + 1) * nrb), h, cache, new)
      if level < len(self.downs):
        h, new[f"down{level}"] = self.downs[level](h, cache.get(f"down{level}"))
      if self.residual_stages:
        time, space = self.downsampling[level]
        h = h + average_down(level_input, width, time=time, space=space).astype(h.dtype)
    h = apply_mid(self.mid, self.mid_attention, h, cache, new)
    out, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(h)), cache.get("conv_out"))
    if self.latent_shortcut:
      z = self.latent_channels
      out = out.at[..., :z].add(group_mean(h, z).astype(out.dtype))
    if self.quant_conv is not None:
      out = self.quant_conv(out)[0]
    return out, new


class Decoder(nnx.Module):
  """Latent `[B, T', H', W', Z]` -> video `[B, T, H, W, C]` (mirror of `Encoder`)."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    ch = tuple(reversed(config.decoder_channels or config.channels))
    downsampling = list(reversed(config.stage_downsampling))
    f, norm, z = config.factorized, config.norm, config.latent_channels
    self.post_quant_conv = (CausalConv3d(z, z, (1, 1, 1), rngs=rngs) if config.quant_convs
                            else None)
    self.conv_in = CausalConv3d(z, ch[0], factorized=f, rngs=rngs)
    # With shortcuts, the first features add the latent repeated over channel groups.
    self.latent_shortcut = config.shortcuts and ch[0] % z == 0
    self.mid, self.mid_attention = mid_blocks(ch[0], config, rngs)
    blocks, ups = [], []
    prev = ch[0]
    for i, width in enumerate(ch):
      for _ in range(config.num_res_blocks + 1):
        blocks.append(ResBlock3d(prev, width, factorized=f, norm=norm, rngs=rngs))
        prev = width
      if i < len(ch) - 1:
        time, space = downsampling[i]
        ups.append(Upsample(width, time=time, space=space, rngs=rngs,
                            shortcut=config.shortcuts, resample=config.resample,
                            keep_width=config.residual_stages))
        prev = ups[-1].out_channels
    self.blocks = nnx.List(blocks)
    self.ups = nnx.List(ups)
    self.per_stage = config.num_res_blocks + 1
    self.residual_stages = config.residual_stages
    self.widths, self.upsampling = ch, downsampling
    self.norm_out = channel_norm(prev, norm)
    self.patch = config.patch
    self.conv_out = CausalConv3d(prev, config.in_channels * config.patch ** 2, factorized=f,
                                 rngs=rngs)

  def __call__(self, z: jax.Array, cache: Cache | None = None, *, first: bool = True
               ) -> tuple[jax.Array, Cache]:
    cache = cache or {}
    new: Cache = {}
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)[0]
    h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
    if self.latent_shortcut:
      h = h + jnp.repeat(z, h.shape[-1] // z.shape[-1], axis=-1).astype(h.dtype)
    h = apply_mid(self.mid, self.mid_attention, h, cache, new)
    n = self.per_stage
    for level, width in enumerate(self.widths):
      level_input = h
      h = apply_blocks(self.blocks, range(level * n, (level + 1) * n), h, cache, new)
      if level < len(self.ups):
        h, new[f"up{level}"] = self.ups[level](h, cache.get(f"up{level}"), first=first)
        if self.residual_stages:
          time, space = self.upsampling[level]
          h = h + duplicate_up(level_input, width, time=time, space=space,
                               first=first).astype(h.dtype)
    h, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(h)), cache.get("conv_out"))
    p = self.patch
    return einops.rearrange(h, "b t h w (p q c) -> b t (h p) (w q) c", p=p, q=p), new


class LatentStat(nnx.Variable):
  """Per-channel latent statistics `[Z]`: saved with the model, not trained."""


class VideoVAE(nnx.Module):
  """The causal video VAE: `encode` to a Gaussian posterior, `decode` back to pixels.

  Latents are normalised per channel by `latent_mean` / `latent_std` (statistics of
  the training data, computed after training and saved with the parameters) in
  `normalise` / `denormalise`; `encode`/`decode` work on raw latents.
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)
    self.latent_mean = LatentStat(jnp.zeros((config.latent_channels,)))
    self.latent_std = LatentStat(jnp.ones((config.latent_channels,)))

  # Whole videos ---------------------------------------------------------------

  def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`video [B, T, H, W, C]` -> posterior `(mean, logvar)`, each `[B, T', H', W', Z]`."""
    check_video_shape(self.config, *video.shape[1:4])
    moments, _ = self.encoder(video)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latent: jax.Array) -> jax.Array:
    """`latent [B, T', H', W', Z]` -> video `[B, 1 + (T' - 1) ft, H' fs, W' fs, C]`."""
    return self._clip(self.decoder(latent)[0])

  def decode_next(self, latent: jax.Array, cache: Cache | None = None
                  ) -> tuple[jax.Array, Cache]:
    """Decodes latent frames `[B, t', H', W', Z]` that follow those decoded into `cache`
    (None: the video's first latent frames, latent 0 included) -> `(video, cache)`: the
    video of just these frames, and the causal caches for the next ones. Decoding a video
    a chunk at a time this way equals `decode` of the whole (streaming output)."""
    video, cache = self.decoder(latent, cache, first=cache is None)
    return self._clip(video), cache

  def _clip(self, video: jax.Array) -> jax.Array:
    return jnp.clip(video, -1.0, 1.0) if self.config.clip_output else video

  def __call__(self, video: jax.Array, key: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reconstruction of `video` through a posterior sample (its mean when `key` is None).

    Returns `(reconstruction [B, T, H, W, C], mean, logvar)`.
    """
    mean, logvar = self.encode(video)
    z = mean if key is None else posterior_sample(mean, logvar, key)
    return self.decode(z.astype(video.dtype)), mean, logvar

  # Normalised latents (what the diffusion transformer sees) -----------------------

  def normalise(self, latent: jax.Array) -> jax.Array:
    return (latent - self.latent_mean[...]) / self.latent_std[...]

  def denormalise(self, latent: jax.Array) -> jax.Array:
    return latent * self.latent_std[...] + self.latent_mean[...]

  # Chunks in time: the same result in the memory of one chunk ----------------------

  def encode_chunked(self, video: jax.Array, chunk_frames: int | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """`encode` one chunk at a time: frame 0, then chunks of `chunk_frames` frames.

    Each causal convolution's cache is carried from chunk to chunk under `lax.scan`,
    so the result equals `encode(video)` while only one chunk's activations exist.
    `chunk_frames` (default: the temporal factor) must be a multiple of it and divide T - 1.
    """
    ft = self.config.compression[0]
    chunk = chunk_frames or ft
    t = video.shape[1]
    check_video_shape(self.config, t, *video.shape[2:4])
    if chunk % ft or (t - 1) % chunk:
      raise ValueError(f"chunk_frames={chunk} must be a multiple of {ft} dividing {t - 1}.")
    head, cache = self.encoder(video[:, :1])
    if t > 1:
      rest = jnp.moveaxis(video[:, 1:].reshape(
          (video.shape[0], (t - 1) // chunk, chunk) + video.shape[2:]), 1, 0)  # [N, B, chunk, ...]

      def body(cache, chunk_video):
        moments, cache = self.encoder(chunk_video, cache)
        return cache, moments

      _, tail = jax.lax.scan(body, cache, rest)                       # [N, B, chunk/ft, ...]
      tail = jnp.moveaxis(tail, 0, 1)
      tail = tail.reshape((tail.shape[0], -1) + tail.shape[3:])
      head = jnp.concatenate([head, tail], axis=1)
    mean, logvar = jnp.split(head.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode_chunked(self, latent: jax.Array, chunk_latents: int = 1) -> jax.Array:
    """`decode` one chunk at a time: latent frame 0, then `chunk_latents` latent frames
    per chunk, carrying the causal caches; equals `decode(latent)`."""
    t = latent.shape[1]
    if (t - 1) % chunk_latents:
      raise ValueError(f"chunk_latents={chunk_latents} must divide {t - 1} latent frames.")
    head, cache = self.decoder(latent[:, :1], first=True)
    if t == 1:
      return self._clip(head)
    rest = jnp.moveaxis(latent[:, 1:].reshape(
        (latent.shape[0], (t - 1) // chunk_latents, chunk_latents) + latent.shape[2:]), 1, 0)

    def body(cache, chunk_latent):
      video, cache = self.decoder(chunk_latent, cache, first=False)
      return cache, video

    _, tail = jax.lax.scan(body, cache, rest)
    tail = jnp.moveaxis(tail, 0, 1)
    tail = tail.reshape((tail.shape[0], -1) + tail.shape[3:])
    return self._clip(jnp.concatenate([head, tail], axis=1))


# Spatial tiles: bounded memory in height and width ---------------------------------

def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of `tile` covering `size`, consecutive tiles overlapping by at
  least `overlap` (the last tile is aligned to the end)."""
  if tile >= size:
    return [0]
  if not 0 <= overlap < tile:
    raise ValueError(f"tile overlap {overlap} must be in [0, {tile}).")
  step = tile - overlap
  starts = list(range(0, size - tile, step)) + [size - tile]
  return sorted(set(starts))


def _ramp(starts: Sequence[float], index: int, tile: int) -> jax.Array:
  """Blend weights `[tile]` of tile `index`: linear ramps over the overlaps with neighbours."""
  w = jnp.ones((tile,), jnp.float32)
  pos = jnp.arange(tile, dtype=jnp.float32)
  start = starts[index]
  if index > 0:                                        # overlap with the previous tile
    ov = starts[index - 1] + tile - start
    if ov > 0:
      w = jnp.minimum(w, (pos + 1) / (ov + 1))
  if index < len(starts) - 1:                          # overlap with the next tile
    ov = start + tile - starts[index + 1]
    if ov > 0:
      w = jnp.minimum(w, (tile - pos) / (ov + 1))
  return w


def tiled_apply(fn: Callable[[jax.Array], jax.Array], x: jax.Array, *, tile: int, overlap: int,
                scale: float) -> jax.Array:
  """Applies `fn` to overlapping spatial tiles of `x [B, T, H, W, C]` and blends the outputs.

  `fn` maps `[B, T, h, w, C]` to `[B, T', h * scale, w * scale, C']` (scale 1/fs to encode,
  fs to decode). Outputs of overlapping tiles are averaged with linear ramp weights, so
  seams fade instead of jumping. All tiles have one shape: a jitted `fn` compiles once
  (`tiled_encode` and `tiled_decode` pass the VAE's methods jitted).
  """
  _, _, h, w, _ = x.shape
  th, tw = min(tile, h), min(tile, w)
  rows, cols = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
  out = weight = None
  for i, r in enumerate(rows):
    for j, c in enumerate(cols):
      y = fn(x[:, :, r:r + th, c:c + tw]).astype(jnp.float32)
      oh, ow = y.shape[2], y.shape[3]
      if out is None:
        out = jnp.zeros(y.shape[:2] + (round(h * scale), round(w * scale)) + y.shape[4:])
        weight = jnp.zeros((round(h * scale), round(w * scale), 1))
      wr = _ramp([s * scale for s in rows], i, oh)
      wc = _ramp([s * scale for s in cols], j, ow)
      wt = (wr[:, None] * wc[None, :])[..., None]              # [h', w', 1]
      ro, co = round(r * scale), round(c * scale)
      out = out.at[:, :, ro:ro + oh, co:co + ow].add(y * wt)
      weight = weight.at[ro:ro + oh, co:co + ow].add(wt)
  return out / weight


def tiled_encode(vae: VideoVAE, video: jax.Array, *, tile: int = 256, overlap: int = 64,
                 chunk_frames: int | None = None) -> jax.Array:
  """Posterior mean `[B, T', H', W', Z]` of a large video, tile by tile (and chunk by chunk).

  `tile` and `overlap` are in pixels and must be multiples of the spatial factor.
  """
  fs = vae.config.compression[1]
  if tile % fs or overlap % fs:
    raise ValueError(f"tile={tile} and overlap={overlap} must be multiples of {fs}.")
  return tiled_apply(lambda v: _encode_tile(vae, v, chunk_frames), video, tile=tile,
                     overlap=overlap, scale=1 / fs)


def tiled_decode(vae: VideoVAE, latent: jax.Array, *, tile: int = 32, overlap: int = 8,
                 chunk_latents: int = 1) -> jax.Array:
  """Video of a large latent, decoded in overlapping latent tiles (sizes in latent pixels)."""
  fs = vae.config.compression[1]
  return tiled_apply(lambda z: _decode_tile(vae, z, chunk_latents), latent, tile=tile,
                     overlap=overlap, scale=fs)


# The tile functions, one trace per tile shape and chunk size for every call.
_encode_tile = nnx.jit(lambda vae, video, chunk: vae.encode_chunked(video, chunk)[0],
                       static_argnums=2)
_decode_tile = nnx.jit(lambda vae, latent, chunk: vae.decode_chunked(latent, chunk),
                       static_argnums=2)


def posterior_sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """A sample `[B, T', H', W', Z]` of the Gaussian posterior `(mean, logvar)`."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all but the batch axis: `[B]`."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(-1)


def build_vae(config: VAEConfig, rngs: nnx.Rngs) -> VideoVAE:
  """Builds the VAE with unsharded parameters (they carry logical axis names; the caller
  shards them, as for the transformer in `sora_jax.models.model.build_model`)."""
  with nnx.use_eager_sharding(False):
    return VideoVAE(config, rngs=rngs)
