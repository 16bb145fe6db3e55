"""A folder of real media files (written by ffmpeg here) prepared into a TFDS dataset.

One folder holds h264 / vp9 / mpeg4 videos, an odd size, a portrait video with rotation
metadata, a variable frame rate, an audio track, a two-scene file, a GIF, images, and
broken files (zero bytes, a truncated mp4, text named .mp4, a video too small to crop);
one preparation must report the bad ones and keep every good one. Decoded frames are
compared with the frames ffmpeg itself extracts.
"""

import json
import os
import shutil
import subprocess

import imageio_ffmpeg
import jax
import numpy as np
import pytest

from sora_jax.data import folder, media
from sora_jax.data.clips import ClipSpec, cut_clips
from sora_jax.data.resize import ResizePolicy

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
FPS = 8
CUT = 1.3   # seconds: where scenes.mp4 switches from testsrc to mandelbrot
SETTINGS = folder.MediaSettings(fps=FPS, clips=ClipSpec(frames=4, min_frames=4, stride=4),
                                resize=ResizePolicy("crop", 16, 16))

# name -> ffmpeg arguments after `-y -v error` (inputs, filters, codec), output last.
VIDEOS = {
    "h264.mp4": "-f lavfi -i testsrc=size=64x48:rate=24:duration=2 -c:v libx264 "
                "-pix_fmt yuv420p",
    "vp9.webm": "-f lavfi -i mandelbrot=size=64x48:rate=25 -t 2 -c:v libvpx-vp9 -b:v 300k",
    "mpeg4_odd.avi": "-f lavfi -i testsrc=size=317x239:rate=25:duration=1 -c:v mpeg4 -q:v 2",
    "audio.mkv": "-f lavfi -i testsrc=size=64x48:rate=24:duration=1 -f lavfi "
                 "-i sine=frequency=440:duration=1 -c:v libx264 -pix_fmt yuv420p -c:a aac "
                 "-shortest",
    # 30 fps for 1 s, then 10 fps for 1 s.
    "vfr.mp4": "-f lavfi -i testsrc=size=64x48:rate=30:duration=2 -vf "
               "select='lt(n\\,30)+not(mod(n\\,3))',setpts='if(lt(N\\,30)\\,N/30\\,1+(N-30)/10)/TB' "
               "-fps_mode vfr -c:v libx264 -pix_fmt yuv420p",
    "sub/scenes.mp4": f"-f lavfi -i testsrc=size=64x48:rate=24:duration={CUT} -f lavfi "
                      "-i mandelbrot=size=64x48:rate=24 -filter_complex "
                      "[1]trim=duration=1.2,setpts=PTS-STARTPTS[m];[0][m]concat=n=2:v=1[v] "
                      "-map [v] -c:v libx264 -pix_fmt yuv420p",
    "anim.gif": "-f lavfi -i testsrc=size=48x40:rate=10:duration=1",
    "tiny.mp4": "-f lavfi -i testsrc=size=8x8:rate=8:duration=1 -c:v libx264 -pix_fmt yuv444p",
}
BAD = {"zero.mp4": "empty file", "truncated.mp4": "not a readable video",
       "sub/notes.mp4": "not a readable video", "tiny.mp4": "smaller than 16x16"}


def ffmpeg(*args: str) -> None:
  subprocess.run([FFMPEG, "-y", "-v", "error", *args], check=True)


def ffmpeg_frames(path: str) -> np.ndarray:
  """Every frame as ffmpeg decodes it (autorotated, at the stream's own timestamps)."""
  probe = media.probe(path)
  raw = subprocess.run([FFMPEG, "-v", "error", "-i", path, "-fps_mode", "passthrough", "-f",
                        "rawvideo", "-pix_fmt", "rgb24", "-"], check=True,
                       capture_output=True).stdout
  return np.frombuffer(raw, np.uint8).reshape(-1, probe.height, probe.width, 3)


def write_media(root: str) -> None:
  os.makedirs(os.path.join(root, "sub", "pictures"))
  for name, args in VIDEOS.items():
    ffmpeg(*args.split(), os.path.join(root, name))
  # Portrait: a landscape stream shown rotated by 90 degrees (display matrix metadata).
  ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=24:duration=1", "-c:v", "libx264",
         "-pix_fmt", "yuv420p", os.path.join(root, "landscape.tmp.mp4"))
  ffmpeg("-display_rotation", "90", "-i", os.path.join(root, "landscape.tmp.mp4"), "-c", "copy",
         os.path.join(root, "portrait.mov"))
  os.remove(os.path.join(root, "landscape.tmp.mp4"))
  ffmpeg("-f", "lavfi", "-i", "testsrc=size=40x40", "-frames:v", "1",
         os.path.join(root, "sub/pictures/square.png"))
  ffmpeg("-f", "lavfi", "-i", "mandelbrot=size=50x36", "-frames:v", "1",
         os.path.join(root, "sub/pictures/wide.jpg"))
  with open(os.path.join(root, "h264.mp4"), "rb") as f:
    data = f.read()
  with open(os.path.join(root, "truncated.mp4"), "wb") as f:
    f.write(data[:len(data) // 2])
  open(os.path.join(root, "zero.mp4"), "wb").close()
  with open(os.path.join(root, "sub/notes.mp4"), "w", encoding="utf-8") as f:
    f.write("not a video\n")
  with open(os.path.join(root, "sub/scenes.txt"), "w", encoding="utf-8") as f:
    f.write("a test card, then a fractal\n")
  with open(os.path.join(root, "captions.csv"), "w", encoding="utf-8") as f:
    f.write("path,caption\nh264.mp4,a test card\nvp9.webm,a fractal zoom\n"
            "sub/pictures/square.png,a square test card\n")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("media"))
  write_media(root)
  return root


@pytest.fixture(scope="module")
def prepared(media_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prepared"))
  report = folder.prepare_media(media_dir, out, SETTINGS, os.path.join(media_dir, "captions.csv"),
                                workers=2, progress=False)
  return out, report


def records_by_source(out):
  source = folder.load_media_source(out)
  by_source = {}
  for i in range(len(source)):
    record = source[i]
    by_source.setdefault(record["source"].decode(), []).append(record)
  return {k: sorted(v, key=lambda r: float(r["start"])) for k, v in by_source.items()}


def test_bad_files_are_reported_and_every_good_file_is_present(prepared, media_dir):
  out, report = prepared
  reasons = {item["path"]: item["reason"] for item in report.skipped}
  assert set(reasons) == set(BAD)
  for path, reason in BAD.items():
    assert reason in reasons[path], (path, reasons[path])
  good = set(folder.find_media(media_dir)) - set(BAD)
  assert set(records_by_source(out)) == good
  assert report.images == 2 and report.videos == len(good) - 2
  with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
    assert {s["path"] for s in json.load(f)["skipped"]} == set(BAD)


def test_clips_have_the_right_times_sizes_and_captions(prepared):
  out, report = prepared
  records = records_by_source(out)
  h264 = records["h264.mp4"]
  assert [float(r["start"]) for r in h264] == [0.0, 0.5, 1.0, 1.5]   # 2 s at 8 fps, 4 frames
  for r in h264:
    assert r["video"].shape == (4, 16, 16, 3) and r["video"].dtype == np.uint8
    assert float(r["fps"]) == FPS and float(r["duration"]) == 0.5
    assert (int(r["orig_height"]), int(r["orig_width"])) == (48, 64)
    assert r["caption"] == b"a test card"
  assert records["sub/scenes.mp4"][0]["caption"] == b"a test card, then a fractal"  # sidecar
  assert records["audio.mkv"][0]["caption"] == b""                                   # none
  assert report.uncaptioned == len(records) - 4   # 3 from the CSV, 1 sidecar
  odd = records["mpeg4_odd.avi"][0]
  assert (int(odd["orig_height"]), int(odd["orig_width"])) == (239, 317)
  portrait = records["portrait.mov"][0]
  assert (int(portrait["orig_height"]), int(portrait["orig_width"])) == (64, 48)
  assert float(portrait["aspect_ratio"]) == pytest.approx(0.75)
  for name in ("sub/pictures/square.png", "sub/pictures/wide.jpg"):
    (image,) = records[name]
    assert image["video"].shape == (1, 16, 16, 3) and int(image["num_frames"]) == 1
  # The VFR file lasts 2 s whatever its frame rate: 4 clips at 8 fps.
  assert [float(r["start"]) for r in records["vfr.mp4"]] == [0.0, 0.5, 1.0, 1.5]
  assert all(float(r["motion"]) > 0 for r in h264)


def test_no_clip_spans_the_scene_cut(prepared):
  out, _ = prepared
  clips = records_by_source(out)["sub/scenes.mp4"]
  assert {int(r["scene"]) for r in clips} == {0, 1}
  for r in clips:
    times = float(r["start"]) + np.arange(int(r["num_frames"])) / FPS
    assert (times < CUT).all() or (times >= CUT).all(), times
  # Scene 0: clips at 0 and 0.5 (frames at 1.0-1.25 are too few); scene 1 from 1.375 s.
  assert [float(r["start"]) for r in clips] == [0.0, 0.5, 1.375, 1.875]


@pytest.mark.parametrize("name", ["h264.mp4", "vp9.webm", "mpeg4_odd.avi", "portrait.mov",
                                  "vfr.mp4", "anim.gif"])
def test_decoded_frames_match_ffmpeg(media_dir, name):
  """Frame k (time k / 8 s) is the frame ffmpeg shows at that time: PSNR >= 30 dB and a
  mean error under 2 levels of 255 (PyAV's and ffmpeg's YUV -> RGB conversions round
  differently at the sharp chroma edges of the test card)."""
  path = os.path.join(media_dir, name)
  times, frames = media.read_frames(path, FPS)
  reference = ffmpeg_frames(path)
  if name == "vfr.mp4":
    source_times = np.concatenate([np.arange(30) / 30, 1 + np.arange(10) / 10])
  else:
    rate = media.probe(path).fps
    source_times = np.arange(len(reference)) / rate
  assert len(reference) == len(source_times)
  np.testing.assert_allclose(times, np.arange(len(times)) / FPS)
  assert times[-1] < source_times[-1] + 1 / FPS
  for t, frame in zip(times, frames):
    shown = reference[np.searchsorted(source_times, t + 1e-6) - 1]
    assert frame.shape == shown.shape
    error = frame.astype(np.float64) - shown
    psnr = 10 * np.log10(255**2 / max(np.mean(error**2), 1e-10))
    assert np.abs(error).mean() < 2 and psnr >= 30, (name, t, np.abs(error).mean(), psnr)


def test_seeking_gives_the_same_frames_as_decoding_from_the_start(media_dir):
  path = os.path.join(media_dir, "h264.mp4")
  times, frames = media.read_frames(path, FPS)
  later_times, later = media.read_frames(path, FPS, start=1.0, duration=0.5)
  np.testing.assert_allclose(later_times, [1.0, 1.125, 1.25, 1.375])
  np.testing.assert_array_equal(later, frames[8:12])


def test_audio_is_ignored_and_probed(media_dir):
  info = media.probe(os.path.join(media_dir, "audio.mkv"))
  assert info.has_audio and info.kind == "video" and info.codec == "h264"


def test_resize_policies():
  crop = ResizePolicy("crop", 16, 16)
  assert crop.sizes(48, 64) == ((16, 21), (16, 16))
  with pytest.raises(ValueError, match="upscale"):
    crop.sizes(8, 8)
  assert ResizePolicy("crop", 16, 16, upscale=True).sizes(8, 8) == ((16, 16), (16, 16))
  native = ResizePolicy("native", 32, 32, grid=8)
  (rh, rw), (oh, ow) = native.sizes(239, 317)
  assert oh % 8 == 0 and ow % 8 == 0 and abs(oh * ow - 1024) < 400
  assert abs(ow / oh - 317 / 239) < 0.3
  assert native.sizes(16, 24) == ((16, 24), (16, 24))                 # never upscaled
  with pytest.raises(ValueError, match="aspect"):
    native.sizes(10, 100)
  frame = np.zeros((239, 317, 3), np.uint8)
  assert native(frame).shape == (oh, ow, 3)


def test_clip_windows_strides_and_tails():
  frames = [(k / FPS, np.full((4, 4, 3), 100, np.uint8)) for k in range(10)]
  spec = ClipSpec(frames=4, min_frames=2, stride=3, scene_cuts=False)
  starts = [(c.start * FPS, len(c.frames)) for c in cut_clips(frames, spec)]
  assert starts == [(0, 4), (3, 4), (6, 4)]   # frame 9 is in a window already
  # A stride longer than the window skips frames; the tail keeps uncovered frames only.
  spec = ClipSpec(frames=3, min_frames=2, stride=5, scene_cuts=False)
  assert [(c.start * FPS, len(c.frames)) for c in cut_clips(frames, spec)] == [(0, 3), (5, 3)]
  spec = ClipSpec(frames=4, min_frames=2, stride=4, scene_cuts=False)
  assert [(c.start * FPS, len(c.frames)) for c in cut_clips(frames, spec)] == [
      (0, 4), (4, 4), (8, 2)]


def test_rerun_skips_staged_files_and_new_files_are_added(media_dir, prepared, tmp_path):
  out, report = prepared
  copy = str(tmp_path / "prepared")
  shutil.copytree(out, copy)
  again = folder.prepare_media(media_dir, copy, SETTINGS,
                               os.path.join(media_dir, "captions.csv"), workers=1,
                               progress=False)
  assert again.staged_before == report.files and again.clips == report.clips
  assert again.dataset_dir.replace(copy, out) == report.dataset_dir
  extra = str(tmp_path / "more")
  shutil.copytree(media_dir, extra)
  shutil.copy(os.path.join(extra, "h264.mp4"), os.path.join(extra, "copy.mp4"))
  shutil.copytree(out, str(tmp_path / "grown"))
  grown = folder.prepare_media(extra, str(tmp_path / "grown"), SETTINGS, workers=1,
                               progress=False)
  assert grown.clips["train"] == report.clips["train"] + 4
  # The dataset it replaced is gone; the new one is complete.
  family = os.path.dirname(os.path.dirname(grown.dataset_dir))
  assert os.listdir(family) == [os.path.basename(os.path.dirname(grown.dataset_dir))]


def test_a_failed_write_leaves_the_previous_dataset_whole(media_dir, prepared, tmp_path,
                                                          monkeypatch):
  out, report = prepared
  copy = str(tmp_path / "prepared")
  shutil.copytree(out, copy)
  extra = str(tmp_path / "more")
  shutil.copytree(media_dir, extra)
  shutil.copy(os.path.join(extra, "vp9.webm"), os.path.join(extra, "vp9_copy.webm"))
  builder = folder._builder_class()
  real = builder._generate_examples

  def crash(self, files):
    for i, item in enumerate(real(self, files)):
      if i == 5:
        raise KeyboardInterrupt("killed while writing")
      yield item

  monkeypatch.setattr(builder, "_generate_examples", crash)
  with pytest.raises(KeyboardInterrupt):
    folder.prepare_media(extra, copy, SETTINGS, workers=1, progress=False)
  monkeypatch.undo()
  source = folder.load_media_source(copy)          # still the old, complete dataset
  assert len(source) == report.clips["train"]
  assert source[0]["video"].shape[1:] == (16, 16, 3)


@pytest.mark.slow
def test_prepare_train_resume_sample_through_the_cli(prepared, tmp_path):
  """The user's path: a prepared folder -> `sora-jax train` -> resume -> `sora-jax sample`,
  with a self-conditioning model (`model.self_condition`: trained with its first pass,
  sampled feeding its estimates back)."""
  from sora_jax import cli  # pylint: disable=g-import-not-at-top
  from sora_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  out, _ = prepared
  config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "world_tiny.py")
  workdir = str(tmp_path / "run")
  for steps in (2, 4):    # the second call resumes from step 2
    cli.main(["sora-jax", "train", "--config", f"{config}:test", "--workdir", workdir,
              f"--config.data.media_dir={out}", f"--config.train.steps={steps}",
              "--config.model.self_condition=true"])
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=5, every=1,
                              async_save=False)
  assert list(checkpointer.manager.all_steps()) == [2, 4]
  checkpointer.close()
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f]
  assert [m["step"] for m in logged] == [2, 4]
  assert all(m["data/skipped_records"] == 0 for m in logged)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model"]["self_condition"] is True
  video = str(tmp_path / "sample.mp4")
  cli.main(["sora-jax", "sample", "--workdir", workdir, "--prompt", "a test card", "--out",
            video])
  frames = media.read_frames(video, FPS)[1]      # written upscaled for viewing
  assert frames.shape[0] == 4 and frames.shape[1] == frames.shape[2]


def test_prepare_data_command_reports_bad_files(media_dir, tmp_path, capsys):
  from sora_jax import cli  # pylint: disable=g-import-not-at-top
  config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "world_tiny.py")
  cli.main(["sora-jax", "prepare-data", "--media", media_dir, "--out", str(tmp_path / "d"),
            "--config", f"{config}:test", "--workers", "1", "--captions",
            os.path.join(media_dir, "captions.csv")])
  printed = capsys.readouterr().out
  assert "skipped 4 of 14 files" in printed
  for path in BAD:
    assert f"  {path}: " in printed
  with pytest.raises(SystemExit, match="no such directory"):
    cli.main(["sora-jax", "prepare-data", "--media", str(tmp_path / "none"), "--out",
              str(tmp_path / "e")])


def test_captions_from_jsonl_csv_and_sidecars(tmp_path):
  from sora_jax.data import captions  # pylint: disable=g-import-not-at-top
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "a"))
  with open(os.path.join(root, "c.jsonl"), "w", encoding="utf-8") as f:
    f.write(json.dumps({"path": "a/x.mp4", "caption": " a cat "}) + "\n\n")
    f.write(json.dumps({"path": os.path.join(root, "y.png"), "caption": "a dog"}) + "\n")
  with open(os.path.join(root, "a", "z.txt"), "w", encoding="utf-8") as f:
    f.write("a bird\n")
  table = captions.load_captions(os.path.join(root, "c.jsonl"), root)
  assert table == {"a/x.mp4": "a cat", "y.png": "a dog"}        # absolute paths made relative
  assert captions.caption_for("a/z.mp4", root, table) == "a bird"
  assert captions.caption_for("a/w.mp4", root, table) == ""
  with open(os.path.join(root, "bad.jsonl"), "w", encoding="utf-8") as f:
    f.write('{"path": "a.mp4"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    captions.load_captions(os.path.join(root, "bad.jsonl"), root)
  with open(os.path.join(root, "bad.csv"), "w", encoding="utf-8") as f:
    f.write("file,text\n")
  with pytest.raises(ValueError, match="'path' and 'caption'"):
    captions.load_captions(os.path.join(root, "bad.csv"), root)


def test_native_policy_keeps_aspect_on_the_patch_grid_for_bucketing(media_dir, tmp_path,
                                                                   tokenizer):
  """`resize=native`: every clip keeps its source's aspect ratio on a 4-pixel grid, and
  bucketing reads the sizes from the records' fields and batches them."""
  from sora_jax.data.bucketing import BucketSpec, clip_size, make_bucketed_dataset  # pylint: disable=g-import-not-at-top
  settings = folder.MediaSettings(
      fps=FPS, clips=ClipSpec(frames=4, min_frames=4, stride=4),
      resize=ResizePolicy("native", 24, 24, grid=4))
  out = str(tmp_path / "native")
  report = folder.prepare_media(media_dir, out, settings, workers=1, progress=False)
  # The 8x8 video fits the native policy as it is (never upscaled, on the grid).
  assert {s["path"] for s in report.skipped} == set(BAD) - {"tiny.mp4"}
  source = folder.load_media_source(out)
  sizes = set()
  for i in range(len(source)):
    record = source[i]
    t, h, w = clip_size(record)
    assert record["video"].shape[:3] == (t, h, w) and h % 4 == 0 and w % 4 == 0
    assert abs(w / h - float(record["aspect_ratio"])) < 0.25       # within the grid rounding
    assert h * w <= 24 * 24
    sizes.add((t, h, w))
  assert len(sizes) >= 3       # landscape, portrait, square and images differ
  buckets = sorted(sizes)
  spec = BucketSpec.make(buckets, (1, 4, 4), tokens_per_batch=4 * max(
      t * h * w // 16 for t, h, w in buckets))
  batch = next(iter(make_bucketed_dataset(source, tokenizer=tokenizer, text_length=16,
                                          spec=spec, seed=0, process_index=0,
                                          process_count=1)))
  assert batch["video"].shape[1:4] in [tuple(b) for b in buckets]


def test_encode_dataset_of_a_prepared_folder_with_a_wan_vae(prepared, tmp_path):
  """`encode-dataset` reads a prepared folder (clips fitted to the world size) and encodes
  it with a Wan VAE directory; training sources then read the latents back."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from sora_jax import cli  # pylint: disable=g-import-not-at-top
  from sora_jax.data.latents import load_latent_source  # pylint: disable=g-import-not-at-top
  from sora_jax.train.sources import latents_description  # pylint: disable=g-import-not-at-top
  from sora_jax.data.pipeline import normalise_video  # pylint: disable=g-import-not-at-top
  from sora_jax.data.resize import fit_clip  # pylint: disable=g-import-not-at-top
  from sora_jax.train.sources import training_source  # pylint: disable=g-import-not-at-top
  from sora_jax.train.autoencoders import make_autoencoder  # pylint: disable=g-import-not-at-top
  import world_tiny  # pylint: disable=g-import-not-at-top
  out, _ = prepared
  torch.manual_seed(0)
  vae_dir = str(tmp_path / "vae")
  diffusers.AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                             latents_std=[1.0] * 4).save_pretrained(vae_dir)
  latents_dir = str(tmp_path / "latents")
  config_file = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "world_tiny.py")
  overrides = {"world.frames": 5, "world.height": 16, "world.width": 16,
               "data.media_dir": out, "autoencoder.name": "wan", "autoencoder.path": vae_dir}
  cli.main(["sora-jax", "encode-dataset", "--config", f"{config_file}:test", "--out", latents_dir]
           + [f"--config.{k}={v}" for k, v in overrides.items()])
  config = world_tiny.get_config("test")
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  config.data.latents_dir = latents_dir
  latents = training_source(config)
  clips = folder.load_media_source(out)
  assert len(latents) == len(clips)
  autoencoder = make_autoencoder(config.autoencoder)
  record = latents[0]
  video = normalise_video(fit_clip(clips[int(record["index"])]["video"], (5, 16, 16)))
  assert record["latent"].shape == (2, 2, 2, 4)
  np.testing.assert_allclose(record["latent"], jax.jit(autoencoder.encode)(video[None])[0],
                             atol=1e-5)
  assert load_latent_source(latents_dir, latents_description(config), "train") is not None
