"""Spacetime patches, 3D rotary positions and timestep embeddings (pure functions).

Shape letters: B batch, T/H/W frames/height/width of a video (or latent), C channels,
N spacetime tokens, D head dimension.
"""

from __future__ import annotations

import math
from typing import Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np


def patchify(video: jax.Array, patch: Sequence[int]) -> jax.Array:
  """Cuts a video into spacetime patches.

  Args:
    video: `[B, T, H, W, C]`; T, H, W divisible by the patch sizes.
    patch: `(pt, ph, pw)`.

  Returns:
    `[B, N, pt*ph*pw*C]` with N = (T/pt)*(H/ph)*(W/pw), tokens in (t, h, w) raster order.
  """
  pt, ph, pw = patch
  return einops.rearrange(
      video, "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: jax.Array, grid: Sequence[int], patch: Sequence[int],
               channels: int) -> jax.Array:
  """Inverse of `patchify`: `[B, N, pt*ph*pw*C]` -> `[B, T, H, W, C]` for grid `(t, h, w)`."""
  (gt, gh, gw), (pt, ph, pw) = grid, patch
  return einops.rearrange(
      tokens, "b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c",
      t=gt, h=gh, w=gw, pt=pt, ph=ph, pw=pw, c=channels)


def overlap_window(patch: int, margin: int) -> np.ndarray:
  """`[patch + 2*margin]` blending weights of an overlapping patch along one axis: 1 in
  the middle, ramping linearly over the `2*margin` pixels it shares with each neighbour,
  so that two neighbours' weights sum to 1 on every shared pixel."""
  k = np.arange(patch + 2 * margin, dtype=np.float64)
  ramp = np.minimum(k + 0.5, patch + 2 * margin - k - 0.5) / (2 * margin)
  return np.minimum(ramp, 1.0).astype(np.float32)


def _overlap_add(x: jax.Array, axis: int, patch: int, margin: int) -> jax.Array:
  """Overlap-adds `[..., G, K, ...]` (G patches of K = patch + 2*margin pixels on `axis`,
  K on axis + 1) at stride `patch` into `[..., G*patch + 2*margin, ...]`."""
  g, shared = x.shape[axis], 2 * margin
  head, middle, tail = jnp.split(x, [shared, patch], axis=axis + 1)
  pad = [(0, 0)] * x.ndim
  after, before = list(pad), list(pad)
  after[axis], before[axis] = (0, 1), (1, 0)
  seams = jnp.pad(head, after) + jnp.pad(tail, before)                  # [.., G+1, 2m, ..]
  inner, last = jnp.split(seams, [g], axis=axis)                        # G and 1 of them
  blocks = jnp.concatenate([inner, middle], axis=axis + 1)              # [.., G, patch, ..]
  rest = x.shape[axis + 2:]
  return jnp.concatenate([blocks.reshape(x.shape[:axis] + (g * patch,) + rest),
                          last.reshape(x.shape[:axis] + (shared,) + rest)], axis=axis)


def unpatchify_overlapping(tokens: jax.Array, grid: Sequence[int], patch: Sequence[int],
                           channels: int, margin: int) -> jax.Array:
  """Blends patches that overlap their spatial neighbours into a video: each token draws
  its `ph x pw` patch plus `margin` pixels on every side, and where neighbours overlap the
  video is their average weighted by `overlap_window` (a linear cross-fade), so that no
  seam can fall on a token boundary; the margins outside the video are dropped (and the
  weights renormalised there). `margin = 0` is `unpatchify`.

  Args:
    tokens: `[B, N, pt*(ph+2m)*(pw+2m)*C]`, tokens in `patchify`'s (t, h, w) raster order.
    grid: `(t, h, w)` patches; patch: `(pt, ph, pw)` with `2*margin <= min(ph, pw)`.

  Returns:
    `[B, T, H, W, C]`.
  """
  if not margin:
    return unpatchify(tokens, grid, patch, channels)
  (gt, gh, gw), (pt, ph, pw) = grid, patch
  if 2 * margin > min(ph, pw):
    raise ValueError(f"an overlap margin of {margin} px needs patches of at least "
                     f"{2 * margin} px (got {ph}x{pw}).")
  kh, kw = ph + 2 * margin, pw + 2 * margin
  x = einops.rearrange(tokens, "b (t h w) (pt kh kw c) -> b (t pt) h kh w kw c",
                       t=gt, h=gh, w=gw, pt=pt, kh=kh, kw=kw, c=channels)
  window = np.outer(overlap_window(ph, margin), overlap_window(pw, margin))  # [kh, kw]
  weights = jnp.asarray(window)[None, None, None, :, None, :, None]
  x = x * weights.astype(x.dtype)
  total = jnp.broadcast_to(weights, (1, 1, gh, kh, gw, kw, 1)).astype(jnp.float32)
  for axis, size in ((4, pw), (2, ph)):                # [B, T', h, kh, W+2m, C] after W
    x = _overlap_add(x, axis, size, margin)
    total = _overlap_add(total, axis, size, margin)
  crop = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
  return (x[crop] / total[crop].astype(x.dtype)).astype(tokens.dtype)


def num_tokens(size: Sequence[int], patch: Sequence[int]) -> int:
  """Spacetime tokens of a `(frames, height, width)` clip with patch `(pt, ph, pw)`."""
  return int(np.prod([s // p for s, p in zip(size, patch)]))


def grid_positions(grid: Sequence[int]) -> np.ndarray:
  """`[N, 3]` integer (t, h, w) positions of the tokens of a `(t, h, w)` patch grid."""
  t, h, w = np.meshgrid(*[np.arange(g) for g in grid], indexing="ij")
  return np.stack([t.ravel(), h.ravel(), w.ravel()], axis=-1).astype(np.int32)


def camera_positions(rays: jax.Array, patch: Sequence[int]) -> jax.Array:
  """`[B, N, 3]` float (t, h, w) token positions on the world plane a camera looks at
  (camera-aligned RoPE): where each pixel's ray meets the plane z = 0, averaged over the
  token's patch, in patch units of the ray grid, so that a still camera gives
  `grid_positions` and a static point of the plane keeps its position in every frame
  whatever the camera does. An example whose rays are zero (no camera) gets the grid.

  Args:
    rays: `[B, T, H, W, 6]` Plücker rays, moment then unit direction, origins in units of
      min(H, W) (`sora_jax.data.camera.plucker_rays`).
    patch: `(pt, ph, pw)`.
  """
  b, frames, height, width, _ = rays.shape
  pt, ph, pw = patch
  grid = (frames // pt, height // ph, width // pw)
  rays = rays.astype(jnp.float32)
  moment, direction = rays[..., :3], rays[..., 3:]
  dz = direction[..., 2:3]
  seen = jnp.abs(dz) > 1e-6                                           # [B, T, H, W, 1]
  closest = jnp.cross(direction, moment)          # the ray's point nearest the origin
  steps = -closest[..., 2:3] / jnp.where(seen, dz, 1.0)
  world = (closest + steps * direction)[..., :2] * min(height, width)   # (x, y) pixels
  tokens = patchify(world[..., ::-1], patch)                          # (y, x) per pixel
  tokens = tokens.reshape(b, tokens.shape[1], pt * ph * pw, 2).mean(2)  # [B, N, 2]
  spatial = tokens / jnp.asarray([ph, pw], jnp.float32) - 0.5
  positions = jnp.asarray(grid_positions(grid), jnp.float32)          # [N, 3]
  every = patchify(seen.astype(jnp.float32), patch).min(-1)[..., None] > 0  # [B, N, 1]
  spatial = jnp.where(every, spatial, positions[None, :, 1:])
  return jnp.concatenate([jnp.broadcast_to(positions[:, :1], (b, positions.shape[0], 1)),
                          spatial], axis=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """How a head's dimension is shared by time, height and width (Wan 2.1's split).

  The head dimension holds D/2 rotating pairs; height and width get (D/2)//3 pairs
  each and time gets the rest.
  """
  if head_dim % 2:
    raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings.")
  pairs = head_dim // 2
  spatial = pairs // 3
  return (pairs - 2 * spatial, spatial, spatial)


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> jax.Array:
  """Rotation angles of 3D RoPE.

  Args:
    positions: `[..., N, 3]` (t, h, w) token positions (integers or floats).
    head_dim: D.
    theta: frequency base.

  Returns:
    `[..., N, D/2]` angles; pair i rotates by position[axis(i)] * freq(i).
  """
  angles = []
  for axis, pairs in enumerate(rope_split(head_dim)):
    freqs = 1.0 / theta ** (np.arange(0, 2 * pairs, 2, dtype=np.float64) / (2 * pairs))
    angles.append(positions[..., axis:axis + 1].astype(jnp.float32) * freqs.astype(np.float32))
  return jnp.concatenate(angles, axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates adjacent pairs (x[2i], x[2i+1]) of `x: [B, N, heads, D]` by `angles: [B, N, D/2]`.

  Written as `pair * cos + flip(pair) * (-sin, sin)` rather than with slices of the
  pair, whose gradients would be zero-padded copies.
  """
  dtype = x.dtype
  pairs = einops.rearrange(x.astype(jnp.float32), "... (d two) -> ... d two", two=2)
  cos = jnp.cos(angles)[:, :, None, :, None]                       # [B, N, 1, D/2, 1]
  sin = jnp.sin(angles)[:, :, None, :, None] * jnp.array([-1.0, 1.0], jnp.float32)
  rotated = pairs * cos + jnp.flip(pairs, -1) * sin
  return einops.rearrange(rotated, "... d two -> ... (d two)").astype(dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding `[B, dim]` (cos half first) of timesteps `t: [B]` in [0, 1000]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
