"""How the camera moved in a video, measured on its background, independently of any model.

Between consecutive frames the background of the camera world (`sora_jax.data.camera`)
moves by a similarity: a translation for a pan, a scale about the frame centre for a zoom.
`frame_motion` measures it on two uint8 frames: phase correlation (a Hann window, the
normalised cross-power spectrum) finds the shift to about a pixel, then Gauss-Newton on the
background's brightness refines the shift and the scale together, leaving out object
pixels (any `world.PALETTE` colour of the world) of either frame.

`estimate` reads a whole clip: the median per-pair scale decides a zoom (and its sign);
otherwise the median shift of the content, turned around (the content moves against the
camera), decides static or a pan, its direction and its speed in `min(H, W)` per frame.
`tests/evaluation/test_camera.py` checks it against the ground-truth paths of held-out
world clips.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from sora_jax.data.camera import PAN_DIRECTIONS
from sora_jax.data.world import WorldConfig
from sora_jax.evaluation.bench import DIRECTION_FRAMES
from sora_jax.evaluation import tracking

# The thresholds of `estimate`.
ZOOM_THRESHOLD = 0.01        # |median log scale| per frame above which it is a zoom
STATIC_THRESHOLD = 0.2       # pixels per frame of mean content motion below which: static


@dataclasses.dataclass(frozen=True)
class CameraEstimate:
  """What `estimate` measured: `kind` (one of `data.camera.CAMERA_MOTIONS` but "track",
  which reads as the pan it makes), `speed` (pans: the camera's mean speed as a fraction of
  min(H, W) per frame; zooms: the zoom's growth per frame, negative zooming out), and the
  per-pair content `shifts [T-1, 2]` (x, y pixels) and `scales [T-1]`."""
  kind: str
  speed: float
  shifts: np.ndarray
  scales: np.ndarray


def _luma_and_background(frame: np.ndarray, world: WorldConfig, threshold: float
                         ) -> tuple[np.ndarray, np.ndarray]:
  """float64 luma `[H, W]` and a bool mask of its background pixels (no object colour)."""
  labels = tracking.world_labels(frame[None], world, threshold)[0]
  luma = frame.astype(np.float64) @ np.asarray([0.299, 0.587, 0.114])
  return luma, labels < 0


def _peak_offset(values: np.ndarray, i: int) -> float:
  """Sub-sample offset of a peak at `values[i]` (cyclic) from a parabola through it."""
  left, mid, right = values[i - 1], values[i], values[(i + 1) % len(values)]
  den = left - 2 * mid + right
  return 0.0 if den == 0 else float(np.clip(0.5 * (left - right) / den, -0.5, 0.5))


def phase_correlation(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
  """`((dx, dy), peak)`: the shift that moves `a` onto `b` (content of `a` at p is in `b` at
  p + (dx, dy)), to about a pixel, and the correlation peak's height."""
  h, w = a.shape
  window = np.outer(np.hanning(h), np.hanning(w))
  fa = np.fft.fft2((a - a.mean()) * window)
  fb = np.fft.fft2((b - b.mean()) * window)
  cross = fb * np.conj(fa)
  surface = np.real(np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-9)))
  iy, ix = np.unravel_index(np.argmax(surface), surface.shape)
  dy = iy + _peak_offset(surface[:, ix], iy)
  dx = ix + _peak_offset(surface[iy, :], ix)
  shift = np.asarray([(dx + w / 2) % w - w / 2, (dy + h / 2) % h - h / 2])
  return shift, float(surface[iy, ix])


def frame_motion(a: np.ndarray, b: np.ndarray, world: WorldConfig, threshold: float = 60.0,
                 iterations: int = 40) -> tuple[np.ndarray, float]:
  """`((dx, dy), scale)` of the background from uint8 frame `a [H, W, 3]` to frame `b`:
  content at p in `a` is at `scale * (p - c) + c + (dx, dy)` in `b` (c the centre).

  Phase correlation gives the shift to about a pixel; Gauss-Newton on the background's
  brightness (b warped back onto a, object pixels of either frame and pixels warped from
  outside the frame left out) refines shift and log scale together."""
  (la, ba), (lb, bb) = (_luma_and_background(f, world, threshold) for f in (a, b))
  h, w = la.shape
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  fill = lambda luma, keep: np.where(keep, luma, luma[keep].mean() if keep.any() else 0)  # noqa: E731
  shift, _ = phase_correlation(fill(la, ba), fill(lb, bb))
  params = np.asarray([shift[0], shift[1], 0.0])            # dx, dy, log scale
  grad_y, grad_x = np.gradient(lb)
  for _ in range(iterations):
    scale = np.exp(params[2])
    qx, qy = scale * (xs - cx) + cx + params[0], scale * (ys - cy) + cy + params[1]
    coords = [qy, qx]
    warped = ndimage.map_coordinates(lb, coords, order=1, mode="nearest")
    keep = (ba & (ndimage.map_coordinates(bb.astype(float), coords, order=1) > 0.999)
            & (qx >= 0) & (qx <= w - 1) & (qy >= 0) & (qy <= h - 1))
    if keep.sum() < 16:
      break
    gx = ndimage.map_coordinates(grad_x, coords, order=1, mode="nearest")
    gy = ndimage.map_coordinates(grad_y, coords, order=1, mode="nearest")
    jacobian = np.stack([gx, gy, scale * (gx * (xs - cx) + gy * (ys - cy))], -1)[keep]
    residual = (warped - la)[keep]
    step = np.linalg.lstsq(jacobian, -residual, rcond=None)[0]
    params = params + step
    if np.abs(step).max() < 1e-4:
      break
  return params[:2], float(np.exp(params[2]))


def estimate(video: np.ndarray, world: WorldConfig, threshold: float = 60.0) -> CameraEstimate:
  """The camera motion of uint8 `video [T, H, W, 3]` (module docstring)."""
  if len(video) < 2:
    raise ValueError("a camera motion needs at least two frames.")
  motions = [frame_motion(video[f], video[f + 1], world, threshold)
             for f in range(len(video) - 1)]
  shifts = np.stack([m[0] for m in motions])
  scales = np.asarray([m[1] for m in motions])
  log_scale = float(np.median(np.log(scales)))
  if abs(log_scale) > ZOOM_THRESHOLD:
    return CameraEstimate("zoom_in" if log_scale > 0 else "zoom_out",
                          float(np.expm1(log_scale)), shifts, scales)
  camera = -np.median(shifts, axis=0)              # the content moves against the camera
  size = min(video.shape[1:3])
  if np.hypot(*camera) < STATIC_THRESHOLD:
    return CameraEstimate("static", 0.0, shifts, scales)
  if abs(camera[0]) >= abs(camera[1]):
    kind = "pan_right" if camera[0] > 0 else "pan_left"
  else:
    kind = "pan_down" if camera[1] > 0 else "pan_up"
  return CameraEstimate(kind, float(np.hypot(*camera)) / size, shifts, scales)


def to_first_frame(points: np.ndarray, found: CameraEstimate, height: int, width: int
                   ) -> np.ndarray:
  """Frame positions `[T, 2]` (x, y at pixel centres + 0.5, as the trackers give them; NaN
  where unseen) carried back into frame 0's coordinates through the measured camera
  (`found.shifts`, `found.scales`): where each point is on the world plane, in the
  plane's frame-0 view. A static camera leaves them as they are; a pan's motion is taken
  off."""
  centre = np.asarray([width / 2.0, height / 2.0])
  out = np.array(points, np.float64)
  # Frame f's point p is at gain * p + offset in frame 0: undoing pair f -> f + 1
  # (p -> (p - centre - shift) / scale + centre) composes into the map of frame f + 1.
  gain, offset = 1.0, np.zeros(2)
  for f in range(1, len(out)):
    shift, scale = found.shifts[f - 1], found.scales[f - 1]
    gain, offset = gain / scale, offset + gain * (centre - (centre + shift) / scale)
    out[f] = gain * out[f] + offset
  return out


@dataclasses.dataclass(frozen=True)
class CameraPrompt:
  """The camera phrase of a camera-world caption: its motion and speed word ("" for
  static and track)."""
  motion: str
  speed: str = ""


def camera_prompt(caption: str) -> CameraPrompt | None:
  """The camera phrase a caption starts with ("the camera pans left slowly as ..."), or
  None for a caption without one."""
  words = caption.split(" as ", 1)[0].split()
  if words[:2] != ["the", "camera"] or len(words) < 3:
    return None
  verb = words[2]
  if verb == "stays":
    return CameraPrompt("static")
  if verb == "follows":
    return CameraPrompt("track")
  if verb in ("pans", "zooms") and len(words) >= 4:
    return CameraPrompt(f"{verb[:-1]}_{words[3]}", words[4] if len(words) > 4 else "")
  return None


def path_error(found: CameraEstimate, prompt: CameraPrompt, world: WorldConfig,
               size: tuple[int, int]) -> float | None:
  """Mean pixels per frame between the measured and the requested camera of a still or
  panning prompt: the content's measured shift per frame pair against the shift the
  prompted motion and speed word make (None for zooms, tracking, or an unknown word)."""
  speeds = {word: pan for word, pan, _ in world.camera_speeds}
  if prompt.motion == "static":
    wanted = np.zeros(2)
  elif prompt.motion in PAN_DIRECTIONS and prompt.speed in speeds:
    wanted = -np.asarray(PAN_DIRECTIONS[prompt.motion]) * speeds[prompt.speed] * min(size)
  else:
    return None
  return float(np.mean(np.linalg.norm(found.shifts - wanted, axis=-1)))


def camera_metrics(video: np.ndarray, prompt: CameraPrompt, world: WorldConfig,
                   object_tracks: dict[str, np.ndarray] | None = None) -> dict:
  """Camera adherence of uint8 `video [T, H, W, 3]` against `prompt`: the measured kind
  (`estimate`), whether it is the prompted one ("track" counts as any pan), the zoom's
  sign, the measured speed against the prompted word's (`world.camera_speeds`), the path
  error in pixels per frame (`path_error`: still and panning prompts), and, for
  `object_tracks` (name -> frame positions `[T, 2]`), each object's direction on the world
  plane over the first `bench.DIRECTION_FRAMES` frames (camera taken off,
  `to_first_frame`)."""
  found = estimate(video, world)
  ok = (found.kind.startswith("pan_") if prompt.motion == "track" else found.kind == prompt.motion)
  speeds = {word: (pan, zoom) for word, pan, zoom in world.camera_speeds}
  speed_error = None
  if prompt.speed in speeds and ok and prompt.motion != "static":
    want = speeds[prompt.speed][1 if prompt.motion.startswith("zoom") else 0]
    speed_error = abs(abs(found.speed) - want) / want
  out = {"camera_kind": found.kind, "camera_ok": float(ok), "camera_speed": found.speed,
         "path_error_px": path_error(found, prompt, world, video.shape[1:3]),
         "camera_speed_error": speed_error,
         "zoom_sign_ok": (float(found.kind == prompt.motion) if prompt.motion.startswith("zoom")
                          else None)}
  if object_tracks is not None:
    h, w = video.shape[1:3]
    # Over the first frames, as ShapesBench reads a direction (a later bounce flips it).
    out["world_directions"] = {
        name: tracking.direction_of(to_first_frame(p, found, h, w), DIRECTION_FRAMES)
        for name, p in object_tracks.items()}
  return out
