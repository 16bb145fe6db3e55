"""A folder of the user's videos and images as a TFDS dataset of clips (`sora-jax prepare-data`).

  prepare_media(media_dir, out_dir, settings)    ->  out_dir/dataset.json, report.json
  load_media_source(out_dir, split)              ->  random-access records for Grain

Preparation has two stages. (1) Worker processes decode each file (PyAV, at
`settings.fps`, upright, resized by the resize policy), cut it into clips
(`sora_jax.data.clips`) and write the encoded clips of that file to
`out_dir/staging/<key>.pkl` (key: the file's path, size, mtime and the settings), or
the reason it was skipped; a rerun skips files already staged. (2) The TFDS builder
`MediaFolder` writes the staged clips as ArrayRecord; TFDS writes into a temporary
directory and renames it when complete, so a dataset directory is whole or absent.
`dataset.json` then points at it, and older versions are removed.

Each record:
  video         frames, each a PNG (or JPEG) image: TFDS's video layout,
                `Sequence(Image)`; decoded to uint8 `[T, H, W, 3]` by `load_media_source`
  caption       text ("" when the file has none)
  source        path relative to the media folder
  start, fps, duration   float32 seconds, frames per second, seconds (T / fps)
  num_frames, height, width          int32, the clip's stored size
  orig_height, orig_width, aspect_ratio   the source as displayed (aspect = width / height)
  motion        float32 mean absolute frame difference in [0, 1]
  scene         int32 index of the scene within its file
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import shutil
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sora_jax.data import captions as captions_lib
from sora_jax.data import media
from sora_jax.data.clips import ClipSpec, cut_clips, motion_score
from sora_jax.data.resize import ResizePolicy
from sora_jax.data.tfds_builders import made_here

FRAME_FORMATS = ("png", "jpeg")
BUILDER_DIR = "tfds"


@dataclasses.dataclass(frozen=True)
class MediaSettings:
  """How media become clips (the config's `media` section)."""
  fps: float = 8.0
  clips: ClipSpec = ClipSpec()
  resize: ResizePolicy = ResizePolicy()
  frame_format: str = "png"
  test_fraction: float = 0.0        # share of files (by a hash of the path) held out
  max_source_pixels: int = 8192 * 8192   # larger sources are refused as absurd

  def __post_init__(self):
    if self.fps <= 0:
      raise ValueError(f"media.fps={self.fps} must be positive.")
    if self.frame_format not in FRAME_FORMATS:
      raise ValueError(f"media.frame_format={self.frame_format!r}: expected one of "
                       f"{FRAME_FORMATS}.")
    if not 0 <= self.test_fraction < 1:
      raise ValueError(f"media.test_fraction={self.test_fraction} must be in [0, 1).")

  @classmethod
  def from_dict(cls, values: dict[str, Any], grid: int = 1) -> "MediaSettings":
    """From a config's `media` section (`MediaConfig`; keys it lacks take its defaults);
    `grid` is used when `media.grid` is 0."""
    v = {**dataclasses.asdict(MediaConfig()), **values}
    clip_keys = {f.name for f in dataclasses.fields(ClipSpec)}
    resize_keys = {"height", "width", "grid", "upscale", "max_aspect"}
    own = {f.name for f in dataclasses.fields(cls)} - {"clips", "resize"}
    unknown = set(v) - clip_keys - resize_keys - own - {"resize", "workers"}
    if unknown:
      raise ValueError(f"media: unknown keys {sorted(unknown)}.")
    clips = ClipSpec(**{k: v[k] for k in clip_keys})
    resize = ResizePolicy(mode=v["resize"], **{k: v[k] for k in resize_keys if k != "grid"},
                          grid=int(v["grid"] or grid))
    return cls(clips=clips, resize=resize, **{k: v[k] for k in own})

  def fingerprint(self) -> str:
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _field(default: Any, doc: str) -> Any:
  return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class MediaConfig:
  """A config's `media` section: `MediaSettings` flattened (`MediaSettings.from_dict` reads
  it), defaults from `ClipSpec`, `ResizePolicy` and `MediaSettings`, plus `workers`."""
  fps: float = _field(MediaSettings.fps, "frame rate clips are sampled at")
  frames: int = _field(ClipSpec.frames, "window length in frames (the longest clip)")
  min_frames: int = _field(ClipSpec.min_frames, "shortest clip kept (a scene's tail)")
  stride: int = _field(ClipSpec.stride, "frames between window starts")
  scene_cuts: bool = _field(ClipSpec.scene_cuts, "cut clips at detected scene changes")
  cut_threshold: float = _field(ClipSpec.cut_threshold, "frame difference that is a scene cut")
  max_clips: int = _field(ClipSpec.max_clips, "clips per file (0: no limit)")
  resize: str = _field(ResizePolicy.mode, "how frames become height x width: crop | native")
  height: int = _field(ResizePolicy.height, "clip height in pixels")
  width: int = _field(ResizePolicy.width, "clip width in pixels")
  grid: int = _field(0, "sizes are multiples of it (0: patch size x autoencoder factor)")
  upscale: bool = _field(ResizePolicy.upscale, "enlarge sources smaller than the clip size")
  max_aspect: float = _field(ResizePolicy.max_aspect, "longer/shorter side beyond which a "
                             "source is refused")
  frame_format: str = _field(MediaSettings.frame_format, "png | jpeg")
  test_fraction: float = _field(MediaSettings.test_fraction, "share of files held out (by a "
                                "hash of the path)")
  max_source_pixels: int = _field(MediaSettings.max_source_pixels, "larger sources are "
                                  "refused as absurd")
  workers: int = _field(0, "decoding processes (0: one per CPU)")


def media_config(**overrides: Any) -> dict[str, Any]:
  """The default `media` section of a config (`MediaConfig`), with `overrides`. `grid` 0:
  the patch size times the autoencoder's spatial factor; `workers` 0: one decoding
  process per CPU."""
  names = {f.name for f in dataclasses.fields(MediaConfig)}
  unknown = set(overrides) - names
  if unknown:
    raise ValueError(f"media: unknown keys {sorted(unknown)}.")
  return dataclasses.asdict(MediaConfig(**overrides))


def find_media(media_dir: str) -> list[str]:
  """Paths (relative to `media_dir`, sorted) of every video and image under it."""
  if not os.path.isdir(media_dir):
    raise FileNotFoundError(f"--media {media_dir}: no such directory.")
  found = []
  for root, dirs, files in os.walk(media_dir):
    dirs.sort()
    for name in files:
      if name.lower().endswith(media.MEDIA_EXTENSIONS):
        found.append(os.path.relpath(os.path.join(root, name), media_dir))
  return sorted(found)


def split_of(relpath: str, test_fraction: float) -> str:
  """"test" for a stable `test_fraction` of paths (by hash), else "train"."""
  h = int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) / 2**32
  return "test" if h < test_fraction else "train"


def encode_frame(frame: np.ndarray, frame_format: str) -> bytes:
  buffer = io.BytesIO()
  if frame_format == "jpeg":
    Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
  else:
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def clips_of_file(path: str, settings: MediaSettings) -> tuple[media.MediaInfo, list[dict]]:
  """Decodes one file into the records of its clips (frames encoded; no caption/source).

  Raises:
    MediaError: the file cannot be used (unreadable, too small or too large, no clip).
  """
  info = media.probe(path)
  if info.height * info.width > settings.max_source_pixels:
    raise media.MediaError(path, f"absurd size {info.width}x{info.height}")
  try:
    settings.resize.sizes(info.height, info.width)
  except ValueError as e:
    raise media.MediaError(path, str(e)) from None
  spec = settings.clips
  if info.kind == "image":
    spec = dataclasses.replace(spec, frames=1, min_frames=1, stride=1, scene_cuts=False)
  records = []
  for clip in cut_clips(media.iter_frames(path, settings.fps, transform=settings.resize), spec):
    t, h, w = clip.frames.shape[:3]
    records.append({
        "video": [encode_frame(f, settings.frame_format) for f in clip.frames],
        "start": np.float32(clip.start), "fps": np.float32(settings.fps),
        "duration": np.float32(t / settings.fps), "num_frames": np.int32(t),
        "height": np.int32(h), "width": np.int32(w),
        "orig_height": np.int32(info.height), "orig_width": np.int32(info.width),
        "aspect_ratio": np.float32(info.aspect_ratio),
        "motion": np.float32(motion_score(clip.frames)), "scene": np.int32(clip.scene),
    })
  if not records:
    raise media.MediaError(path, f"no clip of at least {spec.min_frames} frames at "
                                 f"{settings.fps:g} fps")
  return info, records


def _stage_key(media_dir: str, relpath: str, settings: MediaSettings) -> str:
  stat = os.stat(os.path.join(media_dir, relpath))
  blob = f"{relpath}|{stat.st_size}|{stat.st_mtime_ns}|{settings.fingerprint()}"
  return hashlib.sha1(blob.encode()).hexdigest()


def _write_atomic(path: str, payload: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(payload)
  os.replace(tmp, path)


def _stage_file(media_dir: str, relpath: str, caption: str, settings: MediaSettings,
                staged: str) -> dict[str, Any]:
  """Worker: decodes one file into `staged` (a pickle); returns a summary."""
  try:
    info, records = clips_of_file(os.path.join(media_dir, relpath), settings)
    result = {"path": relpath, "kind": info.kind, "caption": caption, "records": records}
  except media.MediaError as e:
    result = {"path": relpath, "error": e.reason}
  except Exception as e:  # pylint: disable=broad-except  # one bad file never stops the run
    result = {"path": relpath, "error": f"{type(e).__name__}: {e}"}
  _write_atomic(staged, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
  return _summary(result)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in result.items() if k != "records"} | {
      "clips": len(result.get("records", ()))}


@functools.cache
def _builder_class():
  """The TFDS builder of prepared media (defined on first use: TFDS is heavy)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class MediaFolder(tfds.core.GeneratorBasedBuilder):
    """Clips of a folder of videos and images, staged by `prepare_media`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, staged: dict[str, list[str]], settings: MediaSettings, name: str,
                 **kwargs):
      self.staged, self.settings = staged, settings
      config = tfds.core.BuilderConfig(name=name, description=json.dumps(
          dataclasses.asdict(settings)))
      super().__init__(config=config, **kwargs)

    def _info(self):
      f = tfds.features
      scalar = lambda dtype: f.Scalar(dtype=dtype)  # noqa: E731
      return made_here(self.dataset_info_from_configs(features=f.FeaturesDict({
          # tfds.features.Video is this layout, but needs TensorFlow to be constructed.
          "video": f.Sequence(f.Image(shape=(None, None, 3),
                                      encoding_format=self.settings.frame_format)),
          "caption": f.Text(), "source": f.Text(),
          "start": scalar(np.float32), "fps": scalar(np.float32),
          "duration": scalar(np.float32), "num_frames": scalar(np.int32),
          "height": scalar(np.int32), "width": scalar(np.int32),
          "orig_height": scalar(np.int32), "orig_width": scalar(np.int32),
          "aspect_ratio": scalar(np.float32), "motion": scalar(np.float32),
          "scene": scalar(np.int32),
      })))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(files) for split, files in self.staged.items()}

    def _generate_examples(self, files):
      for staged in files:
        with open(staged, "rb") as fh:
          result = pickle.load(fh)
        for i, record in enumerate(result.get("records", ())):
          yield f"{result['path']}#{i}", {**record, "caption": result["caption"],
                                           "source": result["path"]}

  return MediaFolder


@dataclasses.dataclass
class PrepareReport:
  """What a preparation did (also written to `out_dir/report.json`)."""
  files: int
  clips: dict[str, int]
  images: int
  videos: int
  uncaptioned: int
  skipped: list[dict[str, str]]
  staged_before: int          # files found already staged (a resumed preparation)
  dataset_dir: str


def prepare_media(media_dir: str, out_dir: str, settings: MediaSettings,
                  captions_file: str | None = None, workers: int = 0,
                  progress: bool = True) -> PrepareReport:
  """Prepares every video and image under `media_dir` as a TFDS dataset in `out_dir`.

  Args:
    media_dir: folder tree of media (see `media.MEDIA_EXTENSIONS`).
    out_dir: where the dataset, its staging files and the report go.
    settings: fps, clipping and resize policy.
    captions_file: CSV or JSONL of path -> caption (else sidecar `.txt` files).
    workers: decoding processes (0: one per CPU).
    progress: show a progress bar.

  Returns:
    The report; bad files are listed in `report.skipped` with their reasons.

  Raises:
    FileNotFoundError: no `media_dir` or `captions_file`. ValueError: no usable file.
  """
  files = find_media(media_dir)
  captions = captions_lib.load_captions(captions_file, media_dir) if captions_file else {}
  staging = os.path.join(out_dir, "staging")
  os.makedirs(staging, exist_ok=True)
  jobs = {relpath: os.path.join(staging, _stage_key(media_dir, relpath, settings) + ".pkl")
          for relpath in files}
  summaries: dict[str, dict[str, Any]] = {}
  todo = []
  for relpath, staged in jobs.items():
    if os.path.exists(staged):
      with open(staged, "rb") as f:
        summaries[relpath] = _summary(pickle.load(f))
    else:
      todo.append(relpath)
  staged_before = len(summaries)
  workers = workers or os.cpu_count() or 1
  bar = tqdm(total=len(files), initial=staged_before, unit="file", disable=not progress,
             desc="prepare", dynamic_ncols=True)

  def account(summary):
    summaries[summary["path"]] = summary
    bar.update(1)
    bar.set_postfix(clips=sum(s["clips"] for s in summaries.values()),
                    skipped=sum("error" in s for s in summaries.values()))

  try:
    args = [(media_dir, p, captions_lib.caption_for(p, media_dir, captions), settings, jobs[p])
            for p in todo]
    if workers == 1 or len(todo) <= 1:
      for a in args:
        account(_stage_file(*a))
    else:
      context = multiprocessing.get_context("spawn")   # no fork of a threaded process
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for summary in pool.map(_stage_file, *zip(*args)):
          account(summary)
  finally:
    bar.close()

  good = {p: s for p, s in summaries.items() if "error" not in s}
  if not good:
    report = _write_report(out_dir, files, summaries, {}, "", staged_before)
    reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in report.skipped[:3])
    raise ValueError(f"--media {media_dir}: none of {len(files)} media files could be used "
                     f"({reasons or 'no media files found'}); see {out_dir}/report.json.")
  dataset_dir, clips = _write_dataset(out_dir, settings, jobs, good)
  return _write_report(out_dir, files, summaries, clips, dataset_dir, staged_before)


def _write_dataset(out_dir: str, settings: MediaSettings, jobs: dict[str, str],
                   good: dict[str, dict[str, Any]]) -> tuple[str, dict[str, int]]:
  """Writes the staged clips of the `good` files as the TFDS dataset (train/test split by
  path) and `dataset.json`, removing older versions; returns `(dataset dir, clips per split)`."""
  split = {p: split_of(p, settings.test_fraction) for p in good}
  staged = {}
  for relpath in sorted(good):
    staged.setdefault(split[relpath], []).append(jobs[relpath])
  content = hashlib.sha1("".join(sorted(os.path.basename(jobs[p]) for p in good)).encode()
                         ).hexdigest()[:10]
  name = f"{settings.fingerprint()}_{content}"
  root = os.path.join(out_dir, BUILDER_DIR)
  builder = _builder_class()(staged=staged, settings=settings, name=name, data_dir=root,
                             file_format="array_record")
  builder.download_and_prepare()
  dataset_dir = str(builder.data_dir)
  clips = {name: sum(good[p]["clips"] for p in good if split[p] == name) for name in staged}
  meta = {"dataset_dir": dataset_dir, "settings": dataclasses.asdict(settings),
          "clips": clips,
          "captions": {name: sorted({good[p]["caption"] for p in good if split[p] == name})
                       for name in staged}}
  _write_atomic(os.path.join(out_dir, "dataset.json"), json.dumps(meta, indent=1).encode())
  # Older versions of this dataset (other files or settings) are no longer referenced.
  family = os.path.dirname(os.path.dirname(dataset_dir))
  for other in os.listdir(family):
    if other != name:
      shutil.rmtree(os.path.join(family, other), ignore_errors=True)
  return dataset_dir, clips


def _write_report(out_dir: str, files: Sequence[str], summaries: dict[str, dict[str, Any]],
                  clips: dict[str, int], dataset_dir: str, staged_before: int) -> PrepareReport:
  good = [s for s in summaries.values() if "error" not in s]
  report = PrepareReport(
      files=len(files), clips=clips,
      images=sum(s["kind"] == "image" for s in good),
      videos=sum(s["kind"] == "video" for s in good),
      uncaptioned=sum(not s["caption"] for s in good),
      skipped=[{"path": p, "reason": summaries[p]["error"]} for p in sorted(summaries)
               if "error" in summaries[p]],
      staged_before=staged_before, dataset_dir=dataset_dir)
  _write_atomic(os.path.join(out_dir, "report.json"),
                json.dumps(dataclasses.asdict(report), indent=1).encode())
  return report


class MediaSource:
  """Random access to one split of a prepared dataset: records with `video` uint8
  `[T, H, W, 3]` and every other field of the module docstring. Picklable (Grain workers)."""

  def __init__(self, out_dir: str, split: str):
    path = os.path.join(out_dir, "dataset.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.media_dir={out_dir!r}: no prepared dataset there "
                              "(run `sora-jax prepare-data --media DIR --out "
                              f"{out_dir}` first).")
    with open(path, encoding="utf-8") as f:
      self.meta = json.load(f)
    if split not in self.meta["clips"]:
      raise ValueError(f"data.media_dir={out_dir!r} has no {split!r} split (it has "
                       f"{sorted(self.meta['clips'])}; media.test_fraction makes one).")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.split = split
    self.source = tfds.builder_from_directory(self.meta["dataset_dir"]).as_data_source(split)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.source[index])
    record["video"] = np.stack(record["video"]) if len(record["video"]) else np.zeros(
        (0, 0, 0, 3), np.uint8)
    return record

  def captions(self) -> list[str]:
    """The split's distinct captions (read from `dataset.json`, without decoding video)."""
    return list(self.meta["captions"][self.split])


def load_media_source(out_dir: str, split: str = "train") -> MediaSource:
  """A split of the dataset `prepare_media` wrote to `out_dir`."""
  return MediaSource(out_dir, split)
