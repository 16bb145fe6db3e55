"""A camera over the procedural world: a textured plane larger than the frame, seen through
a camera that stays still, pans, zooms or tracks an object.

The world plane has an analytic texture (`Texture`: a smooth gradient, a soft grid, a few
noise blobs and static landmarks, all in greys, so the trackers, which read objects by
their colour's distance from grey on this world, still see only the objects), so a frame
renders exactly at any sub-pixel position and zoom. Objects live in world coordinates
(pixels of the plane, the camera's frame-0 view being `[0, W] x [0, H]`) and bounce off the
walls of that view.

A camera path (`camera_path`) is, per frame, the view's centre in world coordinates and its
zoom (frame pixels per world pixel, 1 at frame 0):

  static                 centre and zoom fixed
  pan_left ... pan_down  the centre moves `speed * min(H, W)` world pixels per frame (the
                         content moves the other way in the frame)
  zoom_in, zoom_out      the zoom grows (shrinks) by a factor `1 + speed` per frame about
                         the fixed centre
  track                  the centre follows the first object (pans at its velocity)

`camera_matrices` gives the same path as per-frame intrinsics and extrinsics (a pinhole
camera looking down at the plane), the form 3D-style camera conditioning takes.
"""

from __future__ import annotations

import numpy as np

CAMERA_MOTIONS = ("static", "pan_left", "pan_right", "pan_up", "pan_down", "zoom_in",
                  "zoom_out", "track")
PAN_DIRECTIONS = {"pan_left": (-1.0, 0.0), "pan_right": (1.0, 0.0), "pan_up": (0.0, -1.0),
                  "pan_down": (0.0, 1.0)}


def camera_path(motion: str, speed: float, frames: int, height: int, width: int,
                track: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`(centre [T, 2] world (x, y), zoom [T])` of a camera `motion` at `speed` (a fraction of
  min(H, W) per frame for pans, the zoom's growth per frame for zooms). `track`: the
  followed object's centres `[T, 2]` (world) for "track"."""
  if motion not in CAMERA_MOTIONS:
    raise ValueError(f"camera motion {motion!r}: expected one of {CAMERA_MOTIONS}.")
  f = np.arange(frames, dtype=np.float64)
  centre = np.tile([width / 2.0, height / 2.0], (frames, 1))
  zoom = np.ones(frames)
  if motion in PAN_DIRECTIONS:
    centre = centre + np.outer(f, PAN_DIRECTIONS[motion]) * speed * min(height, width)
  elif motion == "zoom_in":
    zoom = (1.0 + speed) ** f
  elif motion == "zoom_out":
    zoom = (1.0 + speed) ** -f
  elif motion == "track":
    if track is None:
      raise ValueError("camera motion 'track' needs the tracked object's path.")
    centre = centre + (np.asarray(track, np.float64) - track[0])
  return centre.astype(np.float32), zoom.astype(np.float32)


def frame_to_world(centre: np.ndarray, zoom: float, height: int, width: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """World coordinates `(ys, xs)` `[H, W]` of the frame's pixel centres for a camera at
  `centre` (world x, y) and `zoom`."""
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
  return (centre[1] + (ys - height / 2.0) / zoom, centre[0] + (xs - width / 2.0) / zoom)


class Texture:
  """The world plane's texture, a function of world coordinates (`__call__`), drawn once
  per clip from `seed`: greys with a faint tint spanning [22, 22 + 70 * contrast] about a
  mean of 22 + 30 * contrast (contrast 1: the dark [22, 92] of the first camera world,
  too faint for a squared-error model to draw; `world.texture_contrast`), its features
  (the grid's period, blobs, landmarks, the gradient's width) `feature_size` times those
  of the first plane (`world.texture_feature_size`)."""

  MAX_CONTRAST = (255 - 22) / 70.0

  def __init__(self, seed: int, height: int, width: int, contrast: float = 1.0,
               feature_size: float = 1.0):
    if not 0.0 < contrast <= self.MAX_CONTRAST:
      raise ValueError(f"texture contrast {contrast}: expected a value in (0, "
                       f"{self.MAX_CONTRAST:.2f}].")
    if not feature_size > 0.0:
      raise ValueError(f"texture feature size {feature_size}: expected a positive value.")
    rng = np.random.default_rng(seed)
    scale = min(height, width)
    self.contrast = float(contrast)
    self.period = scale / 4.0 * feature_size
    self.phase = rng.uniform(0, 2 * np.pi, 4)
    self.gradient = rng.normal(size=2) / scale / feature_size
    # Blobs and landmarks over a plane three views wide around the frame-0 view.
    self.blobs = rng.uniform([-width, -height], [2 * width, 2 * height], (24, 2))
    self.blob_size = rng.uniform(0.06, 0.14, 24) * scale * feature_size
    self.blob_gain = rng.choice([-1.0, 1.0], 24) * rng.uniform(10, 18, 24)
    self.marks = rng.uniform([-width, -height], [2 * width, 2 * height], (12, 2))
    self.mark_size = 0.06 * scale * feature_size
    self.tint = rng.uniform(-4, 4, 3)

  def __call__(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """uint8 RGB `[..., 3]` at world coordinates `ys`, `xs`."""
    k, c = 2 * np.pi / self.period, self.contrast
    grey = (22.0 + 30.0 * c + c * 10.0 * np.tanh(xs * self.gradient[0] + ys * self.gradient[1])
            + c * 6.0 * (np.cos(k * xs + self.phase[0]) + np.cos(k * ys + self.phase[1]))
            + c * 4.0 * np.sin(0.37 * k * xs + 0.61 * k * ys + self.phase[2]))
    for (bx, by), size, gain in zip(self.blobs, self.blob_size, self.blob_gain):
      grey = grey + c * gain * np.exp(-((xs - bx) ** 2 + (ys - by) ** 2) / (2 * size ** 2))
    rgb = grey[..., None] + self.tint
    for mx, my in self.marks:   # landmarks: small squares, brighter and warm-tinted
      inside = (np.abs(xs - mx) <= self.mark_size) & (np.abs(ys - my) <= self.mark_size)
      rgb = np.where(inside[..., None], rgb + c * np.asarray([22.0, 16.0, 4.0]), rgb)
    return np.clip(rgb, 22, 22 + 70 * c).astype(np.uint8)


def camera_matrices(centre: np.ndarray, zoom: np.ndarray, height: int, width: int,
                    distance: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """`(intrinsics [T, 3, 3], extrinsics [T, 3, 4])` of a pinhole camera looking straight
  down at the plane (z = 0) from `distance` world units per zoom: focal length `zoom *
  distance` in pixels per world pixel, principal point the frame centre; world-to-camera
  `[R | t]` with R the identity (no rotation) and t moving the centre to the optical axis.
  Projecting a plane point with them gives the frame pixel `frame_to_world` inverts."""
  frames = len(zoom)
  intrinsics = np.zeros((frames, 3, 3), np.float32)
  intrinsics[:, 0, 0] = intrinsics[:, 1, 1] = zoom * distance
  intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 2, 2] = width / 2, height / 2, 1
  extrinsics = np.zeros((frames, 3, 4), np.float32)
  extrinsics[:, :, :3] = np.eye(3)
  extrinsics[:, 0, 3], extrinsics[:, 1, 3] = -centre[:, 0], -centre[:, 1]
  extrinsics[:, 2, 3] = distance
  return intrinsics, extrinsics


# Explicit camera control ---------------------------------------------------------

CAMERA_VALUES = 21   # per frame: the intrinsics (9) then the extrinsics (12), flattened
RAY_VALUES = 6       # per pixel: a Plücker ray's moment and direction (`plucker_rays`)


def pack_camera(intrinsics: np.ndarray, extrinsics: np.ndarray) -> np.ndarray:
  """float32 `[T, 21]`: a camera path's per-frame intrinsics `[T, 3, 3]` and extrinsics
  `[T, 3, 4]` side by side (what a batch carries)."""
  t = len(intrinsics)
  return np.concatenate([np.reshape(intrinsics, (t, 9)), np.reshape(extrinsics, (t, 12))],
                        axis=1).astype(np.float32)


def named_camera(spec: str, frames: int, height: int, width: int) -> np.ndarray:
  """`[T, 21]` packed camera of a named path, "MOTION:SPEED" (e.g. "pan_left:0.05",
  "zoom_in:0.04", "static"): `camera_path`'s speed units."""
  motion, _, speed = spec.partition(":")
  if motion not in CAMERA_MOTIONS or motion == "track":
    raise ValueError(f"camera {spec!r}: expected MOTION[:SPEED] with a motion of "
                     f"{[m for m in CAMERA_MOTIONS if m != 'track']}.")
  try:
    value = float(speed) if speed else 0.0
  except ValueError as e:
    raise ValueError(f"camera {spec!r}: the speed {speed!r} is not a number.") from e
  centre, zoom = camera_path(motion, value, frames, height, width)
  return pack_camera(*camera_matrices(centre, zoom, height, width))


def plucker_rays(packed, height: int, width: int):
  """Per-pixel Plücker coordinates `[..., T, H, W, 6]` (moment o × d, then the unit
  direction d) of the rays through the pixel centres of cameras `packed [..., T, 21]`
  (`pack_camera`), o the camera centre in units of min(H, W) world pixels: what the
  transformer's camera input embeds (CameraCtrl's ray embedding)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  packed = jnp.asarray(packed, jnp.float32)
  k = packed[..., :9].reshape(packed.shape[:-1] + (3, 3))
  e = packed[..., 9:].reshape(packed.shape[:-1] + (3, 4))
  rot, trans = e[..., :3], e[..., 3]
  ys, xs = jnp.meshgrid(jnp.arange(height) + 0.5, jnp.arange(width) + 0.5, indexing="ij")
  pixels = jnp.stack([xs, ys, jnp.ones_like(xs)], -1)                       # [H, W, 3]
  in_camera = jnp.einsum("...ij,hwj->...hwi", jnp.linalg.inv(k), pixels)    # [..., H, W, 3]
  direction = jnp.einsum("...ji,...hwj->...hwi", rot, in_camera)            # R^T d
  direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
  origin = -jnp.einsum("...ji,...j->...i", rot, trans) / min(height, width)   # -R^T t
  moment = jnp.cross(jnp.broadcast_to(origin[..., None, None, :], direction.shape), direction)
  return jnp.concatenate([moment, direction], axis=-1)


def camera_channels(temporal: int = 1, spatial: int = 1) -> int:
  """Channels of `camera_input` per latent position of an autoencoder that folds
  `temporal` frames and `spatial` x `spatial` pixels into one (1, 1: pixel models)."""
  return RAY_VALUES * temporal * spatial * spatial


def camera_input(packed, height: int, width: int, temporal: int = 1, spatial: int = 1):
  """The rays of cameras `packed [..., T, 21]` at the grid the transformer diffuses:
  `[..., T', H / spatial, W / spatial, camera_channels(temporal, spatial)]`.

  A pixel model (`temporal` = `spatial` = 1) gets `plucker_rays` itself. A latent model
  gets each latent position's block of pixel rays stacked into its channels (the rays'
  pixel-unshuffle, as CameraCtrl and VideoX-Fun feed latent video models): a causal VAE's
  first latent frame is frame 0 alone, so frame 0's rays are repeated `temporal - 1`
  times in front and every latent frame then holds `temporal` frames' rays (T = 1 + k *
  `temporal` frames -> T' = 1 + k). Raises ValueError for a size the autoencoder does not
  take.
  """
  import einops  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  frames = packed.shape[-2]
  if (frames - 1) % temporal or height % spatial or width % spatial:
    raise ValueError(f"camera input: {frames} frames of {height}x{width} do not fold into "
                     f"latents of {temporal} frames and {spatial}x{spatial} pixels.")
  rays = plucker_rays(packed, height, width)                      # [..., T, H, W, 6]
  if temporal > 1:
    first = jnp.repeat(rays[..., :1, :, :, :], temporal - 1, axis=-4)
    rays = jnp.concatenate([first, rays], axis=-4)
  return einops.rearrange(rays, "... (t i) (h j) (w k) c -> ... t h w (i j k c)",
                          i=temporal, j=spatial, k=spatial)
