"""The console script end to end: train, resume, sample."""

import json
import os
import subprocess
import sys

import imageio.v2 as imageio

from sora_jax import video_io
from sora_jax.provenance import attacks, manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  return _run_module("sora_jax.cli", *args)


def _run_module(module, *args):
  cmd = [sys.executable, "-m", module, *args]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def test_train_resume_and_sample(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  common = ["--config", "configs/world_tiny.py:test", "--workdir", workdir,
            f"--config.world.data_dir={data_dir}"]
  out = _cli("train", *common)
  assert "Trained to step 4" in out
  out = _cli("train", *common, "--config.train.steps=6")
  assert "Trained to step 6" in out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  assert os.path.exists(os.path.join(workdir, "tensorboard"))

  video_path = str(tmp_path / "out.mp4")
  out = _cli("sample", "--workdir", workdir, "--prompt", "a red circle moves left",
             "--out", video_path, "--seed", "3", "--steps", "2", "--cfg-scale", "2.5",
             "--frames", "6", "--height", "16", "--width", "24", "--scale", "2")
  assert "Wrote" in out
  video = video_io.read_video(video_path)
  assert video.shape == (6, 32, 48, 3)

  image_path = str(tmp_path / "frames.png")
  _cli("sample", "--workdir", workdir, "--prompt", "a blue square moves up", "--out", image_path,
       "--steps", "2", "--frames", "2", "--scale", "1")
  assert imageio.imread(image_path).shape == (16, 16 * 2 + 2, 3)   # two frames, a 2-pixel gap

  # The experiments run on any workdir and write their tables.
  out = _run_module("experiments.native_sizes", "--workdir", workdir, "--samples", "4",
                    "--sizes", "4x16x16,2x16x24")
  assert "| 4x16x16 | yes | yes |" in out and "| 2x16x24 | no | no |" in out
  assert os.path.exists(os.path.join(workdir, "native_sizes.json"))
  out = _run_module("experiments.guidance_sweep", "--workdir", workdir, "--samples", "4",
                    "--cfg", "1,3", "--shift", "1", "--steps", "2")
  assert out.count("| 2 |") == 2
  out = _run_module("experiments.shapes_bench", "--workdir", workdir, "--prompts", "4",
                    "--samples-per-prompt", "1", "--steps", "2")
  assert "| ground truth (held-out clips) | 1.000 |" in out
  bench_dir = os.path.join(workdir, "shapes_bench")
  assert {"shapes_bench.json", "shapes_bench.md", "worst.png", "worst.txt",
          "distributions.png"} <= set(os.listdir(bench_dir))
  # The sheets of generated samples the experiments write are signed (and watermarked).
  for sheet in (os.path.join(workdir, "native_sizes", "4x16x16.png"),
                os.path.join(bench_dir, "worst.png")):
    record = manifest.verify(sheet)
    assert record.status in ("trusted", "untrusted"), (sheet, record.status)
  out = _run_module("experiments.provenance_bench", "--workdir", workdir, "--clips", "4",
                    "--train-clips", "4", "--classifier-steps", "2", "--steps", "2",
                    "--scale", "4", "--workers", "1",
                    "--out", str(tmp_path / "provenance" / "bench.json"))
  assert "| combined |" in out and "| re-encoded CRF 28 |" in out
  assert {"bench.json", "bench.md", "bench.png"} <= set(os.listdir(tmp_path / "provenance"))
  out = _run_module("experiments.provenance_bench", "--workdir", workdir, "--clips", "2",
                    "--steps", "2", "--scale", "4", "--workers", "1", "--no-classifier",
                    "--out", str(tmp_path / "watermark_only.json"))
  assert "| combined |" in out and "re-encoded CRF 28" not in out
  assert json.load(open(tmp_path / "watermark_only.json"))["classifier"] == []
  out = _run_module("experiments.watermark_calibration", "--workdir", workdir, "--clips", "2",
                    "--steps", "2", "--scale", "4", "--workers", "1",
                    "--out", str(tmp_path / "calibration.json"))
  calibration = json.load(open(tmp_path / "calibration.json"))
  assert "threshold for <= 1% false positives" in out
  assert calibration["clips"] == 4 and set(calibration["scores"]) == set(attacks.ATTACKS)
  assert calibration["threshold"] >= max(calibration["percentile_99"].values())


def test_vae_sweep_trains_and_evaluates_each_variant(tmp_path):
  out = _run_module("experiments.vae_sweep", "--variants", "lr_2e-3,lr_2e-3_wide_decoder",
                    "--steps", "2", "--eval-every", "2", "--eval-examples", "4",
                    "--eval-batch", "4", "--train-clips", "8", "--log-every", "1",
                    "--out", str(tmp_path / "sweep.json"))
  assert "| lr_2e-3 | 1.29M |" in out and "| lr_2e-3_wide_decoder | 3.66M |" in out
  rows = json.load(open(tmp_path / "sweep.json"))["rows"]
  assert [r["evals"][-1]["step"] for r in rows] == [2, 2]


def test_unknown_override_key_is_refused(tmp_path):
  cmd = [sys.executable, "-m", "sora_jax.cli", "train", "--config", "configs/world_tiny.py:test",
         "--workdir", str(tmp_path / "r"), "--config.train.stepz=3"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "stepz" in result.stderr
