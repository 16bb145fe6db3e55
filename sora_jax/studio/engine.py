"""What the studio does, without its web page: checked requests in, signed files out.

`Studio` holds one `Sampler` (so every request of a shape shares one compiled sampling
function), checks a request's values against the model's valid ranges (`Limits`) and its
uploads (`check_upload`), runs it through `prompting.generate`, writes the result with
`write_generated` (watermarked and signed, as `sora-jax sample` writes), and keeps a
gallery of what it made. `inspect` gives the C2PA and watermark verdicts of any file.
Errors a user can cause are `StudioError`s with one line naming the problem.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from sora_jax import configs, prompting, video_io
from sora_jax.data import media
from sora_jax.diffusion.solvers import SOLVERS
from sora_jax.provenance import credentials, manifest, watermark
from sora_jax.provenance.outputs import write_generated
from sora_jax.sample import Sampler


class StudioError(ValueError):
  """A request or an upload the studio refuses; the message is one line for the user."""


# What `video_io.read_media` reads: its image types, and the videos of `prepare-data`.
UPLOAD_TYPES = media.VIDEO_EXTENSIONS + video_io.IMAGE_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class Limits:
  """The ranges the studio's controls offer and its requests are checked against.

  frames, heights, widths: the clip sizes this model can sample (its autoencoder's
  factors and patch size divide them), from `Limits.of`.
  """
  frames: tuple[int, ...]
  heights: tuple[int, ...]
  widths: tuple[int, ...]
  steps: tuple[int, int] = (1, 100)
  cfg_scale: tuple[float, float] = (1.0, 15.0)
  times: tuple[int, int] = (1, 8)
  upload_megabytes: float = 50.0
  upload_frames: int = 512
  upload_side: int = 4096
  image_frames: bool = False   # whether a one-frame clip (an image) is a valid size

  @classmethod
  def of(cls, sampler: Sampler, *, max_scale: int = 4, **overrides) -> "Limits":
    """The sizes `sampler`'s model can generate, up to `max_scale` times its run's
    frames and twice its run's height and width."""
    world = sampler.config.world
    patch = _patch(sampler)

    def valid(n: int, axis: int) -> bool:
      if not _round_trips(sampler, axis, n):
        return False
      shape = [1, 1, 1]
      shape[axis] = n
      return sampler.autoencoder.latent_shape(*shape, 3)[axis] % patch[axis] == 0

    frames = tuple(n for n in range(1, max_scale * world.frames + 1) if valid(n, 0))
    heights = tuple(n for n in range(8, 2 * world.height + 1) if valid(n, 1))
    widths = tuple(n for n in range(8, 2 * world.width + 1) if valid(n, 2))
    return cls(frames=frames, heights=heights, widths=widths,
               image_frames=1 in frames, **overrides)


def _patch(sampler: Sampler) -> tuple[int, int, int]:
  """The model's (t, h, w) patch size, from its variant name."""
  return tuple(configs.decode_variant(sampler.config.model.variant)["patch"])


def _round_trips(sampler: Sampler, axis: int, n: int) -> bool:
  """Whether n frames (axis 0) or pixels (1, 2) encode to whole latents: a causal
  autoencoder keeps frame 0 and groups the rest by its temporal factor; the spatial factor
  is what the run's own size compresses by."""
  ae, world = sampler.autoencoder, sampler.config.world
  if axis == 0:
    return ae.temporal_factor == 1 or (n - 1) % ae.temporal_factor == 0
  size = (world.height, world.width)[axis - 1]
  latent = ae.latent_shape(world.frames, world.height, world.width, 3)[axis]
  return n % (size // latent) == 0


@dataclasses.dataclass
class Request:
  """One generation. `inputs`: paths of the uploads the mode takes
  (`prompting.INPUTS`); `output`: "video" (an .mp4) or "image" (a .png of the first frame:
  a one-frame clip where the model can make one, see `Limits.image_frames`)."""
  prompt: str
  mode: str = "text"
  seed: int = 0
  solver: str = "euler"
  steps: int = 24
  cfg_scale: float = 4.0
  frames: int | None = None
  height: int | None = None
  width: int | None = None
  direction: str = "forward"
  times: int = 1
  strength: float = 0.6
  inputs: Sequence[str] = ()
  output: str = "video"


@dataclasses.dataclass(frozen=True)
class Result:
  """A finished request: the signed file at `path`, the request, its generation record
  (the manifest's `org.sora_jax.generation`), seconds taken and the file's verdicts."""
  index: int
  path: str
  request: Request
  record: dict[str, Any]
  seconds: float
  verdict: dict[str, Any]
  created: str


def check_upload(path: str | None, limits: Limits, what: str = "upload") -> np.ndarray:
  """The uploaded image or video at `path` as uint8 `[T, H, W, 3]`, or a StudioError
  saying why not: a missing file, an unsupported type, too large a file, unreadable
  media, too many frames or too high a resolution."""
  if not path or not os.path.isfile(path):
    raise StudioError(f"{what}: no file was uploaded.")
  name = os.path.basename(path)
  if not name.lower().endswith(UPLOAD_TYPES):
    raise StudioError(f"{what} {name}: unsupported file type (accepted: "
                      f"{', '.join(UPLOAD_TYPES)}).")
  megabytes = os.path.getsize(path) / 2**20
  if megabytes > limits.upload_megabytes:
    raise StudioError(f"{what} {name}: {megabytes:.1f} MB, more than the "
                      f"{limits.upload_megabytes:g} MB the studio accepts.")
  try:
    video = video_io.read_media(path)
  except (OSError, ValueError) as e:
    cause = str(e.__cause__ or e).strip().splitlines()
    raise StudioError(f"{what} {name}: cannot read it as an image or video"
                      + (f" ({cause[0][:120]})." if cause else ".")) from e
  t, h, w = video.shape[:3]
  if t > limits.upload_frames:
    raise StudioError(f"{what} {name}: {t} frames, more than the {limits.upload_frames} "
                      "the studio accepts.")
  if max(h, w) > limits.upload_side:
    raise StudioError(f"{what} {name}: {w}x{h} pixels, larger than {limits.upload_side} on "
                      "a side.")
  return video


class Studio:
  """The studio's state: one sampler, its limits, where results go, the gallery."""

  def __init__(self, sampler: Sampler, out_dir: str, *,
               signing: credentials.Credentials | None = None,
               trust_anchors_pem: str | None = None, limits: Limits | None = None,
               fps: int = 8, scale: int = 8):
    """`signing`: the credentials results are signed with (default
    `credentials.default_credentials()`); `trust_anchors_pem`: the CA certificates
    verdicts trust (default: the local development CA when results are signed with the
    local identity)."""
    self.sampler = sampler
    self.out_dir = out_dir
    os.makedirs(out_dir, exist_ok=True)
    self.signing = signing or credentials.default_credentials()
    # What "trusted" means in the verdicts: the anchors' description.
    self.trusted_against = "the given trust anchors" if trust_anchors_pem else None
    if trust_anchors_pem is None and self.signing.local:
      trust_anchors_pem = credentials.local_ca_pem()
      self.trusted_against = "this machine's local development CA"
    self.trust_anchors_pem = trust_anchors_pem
    self.limits = limits or Limits.of(sampler)
    self.fps, self.scale = fps, scale
    self.gallery: list[Result] = []
    self._lock = threading.Lock()       # the gallery and result numbering
    self._sampling = threading.Lock()   # one request on the sampler at a time

  @classmethod
  def from_workdir(cls, workdir: str, out_dir: str | None = None, *,
                   loras: Sequence[tuple[str, float]] = (),
                   loras_low: Sequence[tuple[str, float]] = (), **kwargs) -> "Studio":
    """A studio on any run `Sampler.from_workdir` loads (trained, imported, LoRA-adapted
    with `loras` and `loras_low`, distilled); results go to `out_dir` (default `WORKDIR/studio`)."""
    sampler = Sampler.from_workdir(workdir, loras=loras, loras_low=loras_low)
    return cls(sampler, out_dir or os.path.join(workdir, "studio"), **kwargs)

  def defaults(self) -> Request:
    """A text-to-video request at the run's own size and sampling settings."""
    o, w = self.sampler.options(), self.sampler.config.world
    return Request(prompt="", solver=o.solver, steps=o.steps, cfg_scale=o.cfg_scale,
                   frames=w.frames, height=w.height, width=w.width)

  def check(self, request: Request) -> None:
    """Raises StudioError naming the first value of `request` out of its valid range."""
    lim = self.limits
    try:
      prompting.check_inputs(request.mode, len([p for p in request.inputs if p]))
    except ValueError as e:
      raise StudioError(str(e)) from e
    if not request.prompt.strip():
      raise StudioError("the prompt is empty.")
    if request.solver not in SOLVERS:
      raise StudioError(f"solver {request.solver!r}: expected one of {', '.join(SOLVERS)}.")
    ranges = (("steps", request.steps, lim.steps), ("guidance", request.cfg_scale, lim.cfg_scale),
              ("times", request.times, lim.times), ("strength", request.strength, (0.01, 1.0)))
    for name, value, (lo, hi) in ranges:
      if not lo <= value <= hi:
        raise StudioError(f"{name} {value:g}: must be between {lo:g} and {hi:g}.")
    for name, value, valid in (("frames", request.frames, lim.frames),
                               ("height", request.height, lim.heights),
                               ("width", request.width, lim.widths)):
      if value is not None and value not in valid:
        raise StudioError(f"{name} {value}: this model makes {name} in "
                          f"{_spans(valid)}.")
    if request.direction not in ("forward", "backward"):
      raise StudioError(f"direction {request.direction!r}: expected forward or backward.")
    if request.output not in ("video", "image"):
      raise StudioError(f"output {request.output!r}: expected video or image.")

  def run(self, request: Request,
          progress: Callable[[int, int], None] | None = None) -> Result:
    """Checks `request`, generates, writes the signed, watermarked file and adds it to the
    gallery. `progress(done, total)`: after each transformer evaluation of a sampling call."""
    self.check(request)
    size = self.sampler.config.world
    height, width = request.height or size.height, request.width or size.width
    inputs = [video_io.resize(check_upload(p, self.limits, f"input {i + 1}"), height, width)
              for i, p in enumerate(p for p in request.inputs if p)]
    frames = request.frames
    if request.output == "image" and request.mode == "text" and self.limits.image_frames:
      frames = 1
    options = dict(solver=request.solver, steps=request.steps, cfg_scale=request.cfg_scale)
    start = time.perf_counter()
    with self._sampling:
      try:
        video = prompting.generate(
            self.sampler, request.mode, request.prompt, request.seed, inputs,
            direction=request.direction, times=request.times, strength=request.strength,
            frames=frames, height=request.height, width=request.width, progress=progress,
            **options)
      except ValueError as e:   # what the model cannot do with these inputs and values
        raise StudioError(str(e)) from e
    seconds = time.perf_counter() - start
    if request.output == "image":
      video = video[:, :1]
    with self._lock:
      index = len(self.gallery) + 1
      stem = f"{index:04d}_{request.mode}"
    path = os.path.join(self.out_dir, stem + (".png" if request.output == "image" else ".mp4"))
    generation = {"seed": request.seed, "mode": request.mode, "prompt": request.prompt,
                  "sampler": dataclasses.asdict(self.sampler.options(**options)),
                  "app": "sora-jax studio"}
    record, _ = write_generated(path, video, config=self.sampler.config, step=self.sampler.step,
                                generation=generation, signing=self.signing,
                                ingredients=tuple(p for p in request.inputs if p),
                                fps=self.fps, scale=self.scale)
    result = Result(index=index, path=path, request=request, record=record, seconds=seconds,
                    verdict=self.inspect(path),
                    created=datetime.datetime.now().isoformat(timespec="seconds"))
    with self._lock:
      self.gallery.append(result)
    return result

  def inspect(self, path: str) -> dict[str, Any]:
    """The verdicts on any file: `c2pa` (status trusted / no_manifest / tampered /
    untrusted / unreadable, the anchors "trusted" refers to, the signer, the manifest's
    assertions and ingredients) and `watermark`
    (detected, score, payload; or the reason it could not be read)."""
    check = manifest.verify(path, self.trust_anchors_pem)
    m = check.manifest or {}
    c2pa = {"status": check.status, "failures": list(check.failures),
            "trusted_against": self.trusted_against,
            "signer": (m.get("signature_info") or {}).get("common_name"),
            "assertions": {a["label"]: a.get("data") for a in m.get("assertions", [])},
            "ingredients": [i.get("title") for i in m.get("ingredients", [])]}
    try:
      found = watermark.detect_file(path)
      mark = {"detected": bool(found.detected), "score": round(float(found.score), 3),
              "payload": f"0x{found.payload:08x}" if found.detected else None}
    except (OSError, ValueError) as e:
      mark = {"detected": False, "score": None, "error": str(e)}
    return {"file": os.path.basename(path), "c2pa": c2pa, "watermark": mark}


def _spans(values: Sequence[int]) -> str:
  """`1, 3, 5, ..., 31` for an arithmetic progression, else the list."""
  if len(values) > 3 and len({b - a for a, b in zip(values, values[1:])}) == 1:
    return f"{values[0]}, {values[1]}, ..., {values[-1]}"
  return ", ".join(str(v) for v in values)
