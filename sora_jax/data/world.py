"""The procedural world: moving, bouncing shapes with captions from the ground truth.

`render_example` draws one deterministic clip from a seed; `ShapesWorld` is the TFDS
builder that writes train and held-out splits as ArrayRecord (no TensorFlow needed),
read back with random access by `load_world_source`.

Each record holds (T, H, W are the clip's own size: the world's, or one of
`world.sizes`, with T = 1 for images):
  video       uint8 `[T, H, W, 3]`
  caption     text, e.g. "a red square moves left quickly while a blue circle moves up slowly"
  positions   float32 `[K, T, 2]` object centres (x, y) in pixels per frame
  velocity    float32 `[K, 2]` initial velocity (pixels per frame)
  colour, shape  int32 `[K]` indices into the palette and shape list
  size        float32 `[K]` object radius in pixels
  num_objects int32
Objects are drawn in index order, so a later object occludes an earlier one.

A camera world (`world.camera`, `sora_jax.data.camera`) draws the same objects over a
textured plane seen through a moving camera; `positions` and `velocity` are then in world
coordinates (the frame-0 view is `[0, W] x [0, H]`), the caption names the camera's motion
first ("the camera pans left slowly as a red circle moves up"), and the record adds:
  camera_motion int32 index into `camera.CAMERA_MOTIONS`; camera_speed float32
  camera_centre float32 `[T, 2]` the view's centre (world x, y); camera_zoom float32 `[T]`
  intrinsics, extrinsics float32 `[T, 3, 3]`, `[T, 3, 4]` (`camera.camera_matrices`)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

from sora_jax.data import camera
from sora_jax.data.tfds_builders import made_here

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "magenta": (220, 50, 220), "cyan": (40, 220, 230),
    "white": (245, 245, 245), "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# The camera world's objects are told from its grey texture by colour (`chroma`): each of
# its colours must be at least this far (RGB Euclidean) from the grey of its brightness.
CAMERA_MIN_CHROMA = 100.0
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
}


def chroma(rgb: Any) -> np.ndarray:
  """float32 `[..., 3]`: colours `rgb [..., 3]` less their grey of the same brightness
  (the channel mean): zero for every grey, whatever its brightness."""
  rgb = np.asarray(rgb, np.float32)
  return rgb - rgb.mean(axis=-1, keepdims=True)


def _field(default: Any, doc: str) -> Any:
  return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """What the world draws. Speeds and sizes are fractions of min(height, width)."""
  frames: int = _field(8, "frames per clip (a video of the world's own size)")
  height: int = _field(32, "clip height in pixels")
  width: int = _field(32, "clip width in pixels")
  colours: tuple[str, ...] = _field(("red", "green", "blue", "yellow"),
                                    "colours objects draw from (names of PALETTE)")
  shapes: tuple[str, ...] = _field(("circle", "square", "triangle"),
                                   "shapes objects draw from (circle, square, triangle, diamond)")
  directions: tuple[str, ...] = _field(("left", "right", "up", "down"),
                                       "directions objects move in")
  speeds: tuple[tuple[str, float], ...] = _field(
      (("slowly", 0.03), ("quickly", 0.07)),
      "(word, speed) pairs; speed is a fraction of min(height, width) per frame")
  min_objects: int = _field(1, "fewest objects in a clip")
  max_objects: int = _field(3, "most objects in a clip")
  size_range: tuple[float, float] = _field((0.14, 0.2),
                                           "object radius range, a fraction of min(height, width)")
  background: tuple[int, int, int] = _field((40, 40, 40), "background RGB colour")
  num_train: int = _field(2000, "clips in the train split")
  num_test: int = _field(200, "clips in the held-out split")
  # Native sizes: when given, each clip draws its (frames, height, width) from `sizes`,
  # and with probability `image_ratio` it is an image (one frame) of one of those sizes.
  sizes: tuple[tuple[int, int, int], ...] = _field(
      (), "native sizes: each clip draws its (frames, height, width) from these (): the above")
  image_ratio: float = _field(0.0, "with `sizes`, the share of clips that are one-frame images")
  # Held-out attribute combinations: each a string of attribute words of one object
  # ("red triangle", "blue circle left", "green quickly"); no object of the train split
  # has all the words of any of them (by construction), the test split draws freely.
  holdout: tuple[str, ...] = _field(
      (), "attribute combinations ('red triangle'; with a camera also its motion: "
      "'pan_left red') no object of the train split has")
  # The camera world (sora_jax/data/camera.py): a textured plane seen through a moving
  # camera; () keeps the flat background and the fixed view.
  camera: tuple[tuple[str, float], ...] = _field(
      (), "camera world: (motion, weight) pairs drawn per clip (motions: static, pan_left, "
      "pan_right, pan_up, pan_down, zoom_in, zoom_out, track); (): no camera")
  camera_speeds: tuple[tuple[str, float, float], ...] = _field(
      (("slowly", 0.03, 0.03), ("quickly", 0.07, 0.06)),
      "camera world: (word, pan speed as a fraction of min(height, width) per frame, zoom "
      "growth per frame) triples")
  texture_contrast: float = _field(
      1.0, "camera world: the plane texture's contrast (greys in [22, 22 + 70 x]; 1: the "
      "first camera world's faint texture, too faint for models to draw; "
      "configs/world_camera.py: 3)")
  texture_feature_size: float = _field(
      1.0, "camera world: the plane texture's features (grid period, blobs, landmarks) "
      "as a multiple of the first camera world's")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "WorldConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields - {"data_dir"}
    if unknown:
      raise ValueError(f"world: unknown keys {sorted(unknown)}.")
    kw = {k: v for k, v in values.items() if k in fields}
    for key in ("colours", "shapes", "directions"):
      if key in kw:
        kw[key] = tuple(kw[key])
    if "speeds" in kw:
      kw["speeds"] = tuple((str(n), float(s)) for n, s in kw["speeds"])
    for key in ("size_range", "background"):
      if key in kw:
        kw[key] = tuple(kw[key])
    if "sizes" in kw:
      kw["sizes"] = tuple(tuple(int(v) for v in size) for size in kw["sizes"])
    if "holdout" in kw:
      kw["holdout"] = tuple(str(c) for c in kw["holdout"])
    if "camera" in kw:
      pairs = kw["camera"].items() if isinstance(kw["camera"], Mapping) else kw["camera"]
      kw["camera"] = tuple((str(m), float(w)) for m, w in pairs)
    if "camera_speeds" in kw:
      kw["camera_speeds"] = tuple((str(n), float(p), float(z)) for n, p, z in kw["camera_speeds"])
    cfg = cls(**kw)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    for name in self.colours:
      if name not in PALETTE:
        raise ValueError(f"world.colours: unknown colour {name!r}; known {sorted(PALETTE)}.")
    for name in self.shapes:
      if name not in SHAPES:
        raise ValueError(f"world.shapes: unknown shape {name!r}; known {list(SHAPES)}.")
    for name in self.directions:
      if name not in DIRECTIONS:
        raise ValueError(f"world.directions: unknown {name!r}; known {list(DIRECTIONS)}.")
    if not 1 <= self.min_objects <= self.max_objects:
      raise ValueError("world.min_objects/max_objects: need 1 <= min_objects <= max_objects.")
    if min(self.frames, self.height, self.width) < 1:
      raise ValueError("world.frames/height/width must be positive.")
    for size in self.sizes:
      if len(size) != 3 or min(size) < 1:
        raise ValueError(f"world.sizes: {size} is not a positive (frames, height, width).")
    if not 0.0 <= self.image_ratio <= 1.0:
      raise ValueError(f"world.image_ratio={self.image_ratio} must be in [0, 1].")
    for motion, weight in self.camera:
      if motion not in camera.CAMERA_MOTIONS or weight < 0:
        raise ValueError(f"world.camera: ({motion!r}, {weight}) is not a (motion, weight >= 0) "
                         f"pair; motions: {camera.CAMERA_MOTIONS}.")
    if self.camera and sum(w for _, w in self.camera) <= 0:
      raise ValueError("world.camera: the weights must have a positive sum.")
    if self.camera and not self.camera_speeds:
      raise ValueError("world.camera_speeds: a camera world needs at least one speed.")
    if not 0.0 < self.texture_contrast <= camera.Texture.MAX_CONTRAST:
      raise ValueError(f"world.texture_contrast={self.texture_contrast} must be in (0, "
                       f"{camera.Texture.MAX_CONTRAST:.2f}].")
    if not self.texture_feature_size > 0.0:
      raise ValueError(f"world.texture_feature_size={self.texture_feature_size} must be "
                       "positive.")
    greys = [c for c in self.colours if self.camera
             and np.linalg.norm(chroma(PALETTE[c])) < CAMERA_MIN_CHROMA]
    if greys:
      raise ValueError(f"world.colours: {greys} too close to grey for the camera world, whose "
                       f"grey texture the trackers tell objects from by colour; use coloured "
                       f"objects.")
    words = set(self.colours) | set(self.shapes) | set(self.directions) | {
        n for n, _ in self.speeds} | {m for m, _ in self.camera}
    for combo in self.holdout:
      unknown = [w for w in combo.split() if w not in words]
      if unknown or not combo.split():
        raise ValueError(f"world.holdout: {combo!r} has words {unknown} that name no colour, "
                         f"shape, direction, speed or camera motion of this world.")
      if len(combo.split()) < 2:
        raise ValueError(f"world.holdout: {combo!r} names one attribute; hold out "
                         "combinations of at least two (e.g. 'red triangle').")

  @property
  def all_sizes(self) -> tuple[tuple[int, int, int], ...]:
    """Every (frames, height, width) a clip of this world can have (images included)."""
    videos = self.sizes or ((self.frames, self.height, self.width),)
    images = tuple((1, h, w) for _, h, w in videos) if self.image_ratio > 0 else ()
    return tuple(dict.fromkeys(videos + images))

  @classmethod
  def as_config_dict(cls, **overrides: Any) -> dict[str, Any]:
    """The default world with `overrides`, as the plain dict a config's `world` section
    holds (plus `data_dir=""`: the default TFDS directory)."""
    return {**dataclasses.asdict(cls(**overrides)), "data_dir": ""}

  def fingerprint(self) -> str:
    fields = dataclasses.asdict(self)
    if not fields["holdout"]:
      del fields["holdout"]      # worlds from before held-out splits keep their datasets
    if not fields["camera"]:     # ... and worlds without a camera, from before cameras
      del fields["camera"], fields["camera_speeds"]
    if not self.camera or self.texture_contrast == 1.0:
      del fields["texture_contrast"]   # ... and camera worlds from before the contrast
    if not self.camera or self.texture_feature_size == 1.0:
      del fields["texture_feature_size"]
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _shape_mask(shape: str, ys: np.ndarray, xs: np.ndarray, cx: float, cy: float,
                r: float) -> np.ndarray:
  dx, dy = xs - cx, ys - cy
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    side = r * 0.85
    return (np.abs(dx) <= side) & (np.abs(dy) <= side)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= r * 1.15
  if shape == "triangle":  # pointing up, apex at cy - r, base at cy + r / 2
    depth = (dy + r) / (1.5 * r)
    return (dy <= r / 2) & (depth >= 0) & (np.abs(dx) <= depth * r * np.sqrt(3) / 2)
  raise ValueError(f"unknown shape {shape!r}")


def simulate(start: np.ndarray, velocity: np.ndarray, radius: float, frames: int,
             height: int, width: int) -> np.ndarray:
  """Constant-velocity motion with elastic bounces off the walls.

  Args:
    start: `[2]` (x, y) centre at frame 0; velocity: `[2]` pixels per frame.

  Returns:
    `[frames, 2]` centres, kept within `[radius, size - radius]` on each axis.
  """
  pos, vel = start.astype(np.float64).copy(), velocity.astype(np.float64).copy()
  lo = np.array([radius, radius])
  hi = np.array([width - radius, height - radius])
  out = np.zeros((frames, 2), np.float32)
  for f in range(frames):
    out[f] = pos
    pos = pos + vel
    for axis in range(2):
      if pos[axis] < lo[axis]:
        pos[axis], vel[axis] = 2 * lo[axis] - pos[axis], -vel[axis]
      elif pos[axis] > hi[axis]:
        pos[axis], vel[axis] = 2 * hi[axis] - pos[axis], -vel[axis]
  return out


def caption_for(objects: list[dict[str, str]]) -> str:
  """"a red square moves left quickly while a blue circle moves up slowly"."""
  parts = [" ".join(w for w in ("a", o["colour"], o["shape"], "moves", o["direction"],
                                o.get("speed", "")) if w) for o in objects]
  if len(parts) <= 2:
    return " while ".join(parts)
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def render(world: WorldConfig, colours: np.ndarray, shapes: np.ndarray, sizes: np.ndarray,
           positions: np.ndarray, height: int, width: int) -> np.ndarray:
  """Draws objects `[K]` at `positions [K, T, 2]` over the background -> uint8 `[T, H, W, 3]`."""
  frames = positions.shape[1]
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
  video = np.empty((frames, height, width, 3), np.uint8)
  video[...] = np.asarray(world.background, np.uint8)
  for k in range(len(colours)):
    rgb = np.asarray(PALETTE[world.colours[colours[k]]], np.uint8)
    for f in range(frames):
      cx, cy = positions[k, f]
      video[f][_shape_mask(world.shapes[shapes[k]], ys, xs, cx, cy, sizes[k])] = rgb
  return video


def render_view(world: WorldConfig, texture: camera.Texture, colours: np.ndarray,
                shapes: np.ndarray, sizes: np.ndarray, positions: np.ndarray,
                centre: np.ndarray, zoom: np.ndarray, height: int, width: int) -> np.ndarray:
  """The camera world (`sora_jax.data.camera`): objects `[K]` at world `positions [K, T, 2]`
  over the textured plane, seen by a camera at `centre [T, 2]` (world x, y) with `zoom [T]`
  -> uint8 `[T, H, W, 3]`. Every pixel is the texture or an object evaluated at its own
  world coordinates, so sub-pixel pans and zooms render exactly."""
  frames = positions.shape[1]
  video = np.empty((frames, height, width, 3), np.uint8)
  for f in range(frames):
    ys, xs = camera.frame_to_world(centre[f], float(zoom[f]), height, width)
    frame = texture(ys, xs)
    for k in range(len(colours)):
      cx, cy = positions[k, f]
      mask = _shape_mask(world.shapes[shapes[k]], ys, xs, cx, cy, sizes[k])
      frame[mask] = np.asarray(PALETTE[world.colours[colours[k]]], np.uint8)
    video[f] = frame
  return video


def direction_name(dx: float, dy: float) -> str:
  """The world direction of a displacement (its larger axis); `(0, 0)` counts as along x."""
  step = (float(np.sign(dx)), 0.0) if abs(dx) >= abs(dy) else (0.0, float(np.sign(dy)))
  return next((name for name, unit in DIRECTIONS.items() if unit == step), "right")


def held_out(world: WorldConfig, attributes: Mapping[str, str]) -> str | None:
  """The held-out combination an object with these attributes (colour, shape, direction,
  speed names) has, or None."""
  words = set(attributes.values())
  return next((c for c in world.holdout if set(c.split()) <= words), None)


def object_attributes(example: Mapping[str, Any], world: WorldConfig) -> list[dict[str, str]]:
  """Per object of a record, its colour, shape, direction and speed names (direction and
  speed from the stored initial velocity)."""
  frames, height, width = np.asarray(example["video"]).shape[:3]
  scale = min(height, width)
  out = []
  for k in range(int(example["num_objects"])):
    vx, vy = (float(v) for v in example["velocity"][k])
    direction = direction_name(vx, vy)
    speed = min(world.speeds, key=lambda s: abs(s[1] * scale - np.hypot(vx, vy)))[0]
    out.append({"colour": world.colours[int(example["colour"][k])],
                "shape": world.shapes[int(example["shape"][k])],
                "direction": direction, "speed": speed})
  return out


def camera_attributes(example: Mapping[str, Any]) -> dict[str, str]:
  """`{"camera": motion name}` of a camera-world record (what `world.holdout` combinations
  may name with an object's attributes), `{}` for a record without a camera."""
  if "camera_motion" not in example:
    return {}
  return {"camera": camera.CAMERA_MOTIONS[int(example["camera_motion"])]}


def render_example(world: WorldConfig, seed: int, holdout: bool = False) -> dict[str, Any]:
  """One deterministic clip and its ground truth (see module docstring for the fields).

  `holdout=True` (the train split) redraws any object with a held-out combination of
  `world.holdout` (from the same random stream: still deterministic); with no held-out
  combinations the draws are those of a world without them.
  """
  rng = np.random.default_rng(seed)
  frames, height, width = world.frames, world.height, world.width
  if world.sizes:
    frames, height, width = world.sizes[int(rng.integers(len(world.sizes)))]
  if world.image_ratio > 0 and rng.random() < world.image_ratio:
    frames = 1
  scale = min(height, width)
  count = int(rng.integers(world.min_objects, world.max_objects + 1))
  colours = rng.choice(len(world.colours), size=count, replace=count > len(world.colours))
  shapes = rng.integers(0, len(world.shapes), size=count)
  directions = rng.integers(0, len(world.directions), size=count)
  speeds = rng.integers(0, len(world.speeds), size=count)
  if holdout and world.holdout:
    for k in range(count):
      for _ in range(1000):
        attributes = {"colour": world.colours[colours[k]], "shape": world.shapes[shapes[k]],
                      "direction": world.directions[directions[k]],
                      "speed": world.speeds[speeds[k]][0]}
        if held_out(world, attributes) is None:
          break
        free = [c for c in range(len(world.colours))
                if c not in np.delete(colours, k) or count > len(world.colours)]
        colours[k] = free[int(rng.integers(len(free)))]
        shapes[k] = rng.integers(0, len(world.shapes))
        directions[k] = rng.integers(0, len(world.directions))
        speeds[k] = rng.integers(0, len(world.speeds))
      else:
        raise ValueError("world.holdout excludes (almost) every object.")
  sizes = rng.uniform(*world.size_range, size=count).astype(np.float32) * scale
  positions = np.zeros((count, frames, 2), np.float32)
  velocity = np.zeros((count, 2), np.float32)
  objects = []
  for k in range(count):
    r = float(sizes[k])
    start = rng.uniform([r, r], [width - r, height - r])
    velocity[k] = (np.asarray(DIRECTIONS[world.directions[directions[k]]])
                   * world.speeds[speeds[k]][1] * scale)
    positions[k] = simulate(start, velocity[k], r, frames, height, width)
    objects.append({"colour": world.colours[colours[k]], "shape": world.shapes[shapes[k]],
                    "direction": world.directions[directions[k]],
                    "speed": world.speeds[speeds[k]][0]})
  example = {
      "video": render(world, colours, shapes, sizes, positions, height, width),
      "caption": caption_for(objects),
      "positions": positions,
      "velocity": velocity,
      "colour": colours.astype(np.int32),
      "shape": shapes.astype(np.int32),
      "size": sizes,
      "num_objects": np.int32(count),
  }
  if world.camera:    # drawn after everything else: the objects are the fixed view's
    motions, weights = zip(*world.camera)
    for _ in range(1000):
      motion = motions[int(rng.choice(len(motions), p=np.asarray(weights) / sum(weights)))]
      if not holdout or not any(held_out(world, {**o, "camera": motion}) for o in objects):
        break
    else:
      raise ValueError("world.holdout excludes every camera motion of a clip's objects.")
    word, pan, zoom_rate = world.camera_speeds[int(rng.integers(len(world.camera_speeds)))]
    speed = zoom_rate if motion.startswith("zoom") else (0.0 if motion == "static" else pan)
    centre, zoom = camera.camera_path(motion, speed, frames, height, width, track=positions[0])
    texture = camera.Texture(int(rng.integers(2 ** 31)), height, width, world.texture_contrast,
                             world.texture_feature_size)
    intrinsics, extrinsics = camera.camera_matrices(centre, zoom, height, width)
    example.update(
        video=render_view(world, texture, colours, shapes, sizes, positions, centre, zoom,
                          height, width),
        caption=f"the camera {camera_phrase(motion, word, objects)} as {example['caption']}",
        camera_motion=np.int32(camera.CAMERA_MOTIONS.index(motion)),
        camera_speed=np.float32(speed), camera_centre=centre, camera_zoom=zoom,
        intrinsics=intrinsics, extrinsics=extrinsics)
  return example


def camera_phrase(motion: str, word: str, objects: list[dict[str, str]]) -> str:
  """"pans left slowly", "zooms in quickly", "stays still", "follows the red circle"."""
  if motion == "static":
    return "stays still"
  if motion == "track":
    return f"follows the {objects[0]['colour']} {objects[0]['shape']}"
  verb, way = motion.split("_")
  return f"{verb}s {way} {word}"


# TFDS builder ------------------------------------------------------------------

SPLIT_SEEDS = {"train": 0, "test": 1_000_003}


@functools.cache
def _builder_class():
  """The TFDS builder class, defined (and registered with TFDS) once, on first use."""
  import tensorflow_datasets as tfds  # imported lazily: heavy

  class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the procedural world; one builder config per `WorldConfig`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, world: WorldConfig, **kwargs):
      self.world = world
      config = tfds.core.BuilderConfig(
          name=f"{world.frames}x{world.height}x{world.width}_{world.fingerprint()}",
          description=json.dumps(dataclasses.asdict(world)))
      super().__init__(config=config, **kwargs)

    def _info(self):
      f = tfds.features
      return made_here(self.dataset_info_from_configs(features=f.FeaturesDict({
          "video": f.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib"),
          "caption": f.Text(),
          "positions": f.Tensor(shape=(None, None, 2), dtype=np.float32, encoding="zlib"),
          "velocity": f.Tensor(shape=(None, 2), dtype=np.float32),
          "colour": f.Tensor(shape=(None,), dtype=np.int32),
          "shape": f.Tensor(shape=(None,), dtype=np.int32),
          "size": f.Tensor(shape=(None,), dtype=np.float32),
          "num_objects": f.Scalar(dtype=np.int32),
          **({} if not self.world.camera else {
              "camera_motion": f.Scalar(dtype=np.int32),
              "camera_speed": f.Scalar(dtype=np.float32),
              "camera_centre": f.Tensor(shape=(None, 2), dtype=np.float32),
              "camera_zoom": f.Tensor(shape=(None,), dtype=np.float32),
              "intrinsics": f.Tensor(shape=(None, 3, 3), dtype=np.float32),
              "extrinsics": f.Tensor(shape=(None, 3, 4), dtype=np.float32)}),
      })))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples("train", self.world.num_train),
              "test": self._generate_examples("test", self.world.num_test)}

    def _generate_examples(self, split: str, count: int):
      for i in range(count):
        example = render_example(self.world, SPLIT_SEEDS[split] + i, holdout=split == "train")
        if split == "train":    # checked, not only constructed
          for attributes in object_attributes(example, self.world):
            if held_out(self.world, {**attributes, **camera_attributes(example)}):
              raise AssertionError(f"train example {i} has held-out {attributes}.")
        yield i, example

  return ShapesWorld


def default_data_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "sora_jax", "tensorflow_datasets")


def prepare_world(world: WorldConfig, data_dir: str | None = None):
  """Generates the world's TFDS dataset (once; later calls reuse it) and returns the builder.

  Two processes preparing the same new world at once (two runs started together) race to
  rename their finished copy into place; the loser's rename fails. Then the dataset is
  there, written by the other: it is used, and only a failure that left no dataset is
  raised."""
  make = lambda: _builder_class()(world=world, data_dir=data_dir or default_data_dir(),  # noqa: E731
                                  file_format="array_record")
  builder = make()
  try:
    builder.download_and_prepare()
  except Exception:  # TFDS raises several types for a lost rename race
    builder = make()
    if not builder.is_prepared():
      raise
  return builder


def load_world_source(world: WorldConfig, split: str, data_dir: str | None = None):
  """A random-access `tfds` data source over one split, preparing the data if needed."""
  return prepare_world(world, data_dir).as_data_source(split=split)
