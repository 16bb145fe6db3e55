"""The console script end to end: train, sample, the experiments on the run; one dialect."""

import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import jax
import numpy as np
import pytest

from sora_jax import cli, video_io
from helpers import run_cli, run_experiment, subprocess_env
from sora_jax.provenance import attacks, manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  """The console script's output, run in this process (the boundary is tested once, in
  `test_the_console_script_runs`)."""
  code, out = run_cli(*args)
  assert code == 0, out[-3000:]
  return out


def _run_process(module, *args):
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def test_the_console_script_runs():
  """The installed `sora-jax` entry point, as a separate process: usage and one error."""
  script = os.path.join(os.path.dirname(sys.executable), "sora-jax")
  command = [script] if os.path.exists(script) else [sys.executable, "-m", "sora_jax.cli"]
  result = subprocess.run(command + ["--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0 and "sora-jax train" in result.stdout
  result = subprocess.run(command + ["verify", "missing.mp4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 5 and "no such file" in result.stdout


@pytest.mark.slow
def test_train_sample_and_the_experiments(data_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  workdir = str(tmp_path / "run")
  common = ["--config", "configs/world_tiny.py:test", "--workdir", workdir,
            f"--config.world.data_dir={data_dir}"]
  # (Resuming through the console script: tests/data/test_media.py.)
  # 10 steps like the reference run (conftest): the same compiled step, read from the
  # run's compilation cache.
  out = _cli("train", *common, "--config.train.steps=10")
  assert "Trained to step 10" in out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "8"]
  assert os.path.exists(os.path.join(workdir, "tensorboard"))

  # Step caching calibrated through the command line (at the run's clip size), then a
  # sample that uses it at another size.
  out = _cli("calibrate-cache", "--workdir", workdir, "--prompts", "2", "--steps", "4",
             "--solver", "euler")
  assert "Calibrated step caching for euler/4/uniform on 2 prompts" in out
  assert "euler/4/uniform" in json.load(open(os.path.join(workdir, "step_cache.json")))
  video_path = str(tmp_path / "out.mp4")
  out = _cli("sample", "--workdir", workdir, "--prompt", "a red circle moves left",
             "--out", video_path, "--seed", "3", "--steps", "4", "--solver", "euler",
             "--cache-threshold", "1.0", "--cfg-scale", "2.5", "--frames", "6", "--height",
             "16", "--width", "24", "--scale", "2")
  assert "Wrote" in out
  video = video_io.read_video(video_path)
  assert video.shape == (6, 32, 48, 3)

  image_path = str(tmp_path / "frames.png")
  _cli("sample", "--workdir", workdir, "--prompt", "a blue square moves up", "--out", image_path,
       "--steps", "2", "--frames", "2", "--scale", "1", "--shift", "2", "--schedule", "uniform",
       "--eta", "0.5")
  assert imageio.imread(image_path).shape == (16, 16 * 2 + 2, 3)   # two frames, a 2-pixel gap

  # The experiments run on any workdir and write their tables.
  out = run_experiment("experiments.native_sizes", "--workdir", workdir, "--samples", "4",
                    "--sizes", "4x16x16,2x16x24")
  assert "| 4x16x16 | yes | yes |" in out and "| 2x16x24 | no | no |" in out
  assert os.path.exists(os.path.join(workdir, "native_sizes.json"))
  out = run_experiment("experiments.guidance_sweep", "--workdir", workdir, "--samples", "4",
                    "--cfg", "1,3,5", "--shift", "1", "--steps", "2")
  assert out.count("| 2 |") == 3
  # cfg 1 (no unconditional pass) and the other scales: two programs for three settings.
  sweep = json.load(open(os.path.join(workdir, "guidance_sweep.json")))
  assert sweep["compiled_programs"] == 2 and len(sweep["rows"]) == 3
  out = run_experiment("experiments.shapes_bench", "--workdir", workdir, "--prompts", "4",
                    "--samples-per-prompt", "1", "--steps", "2")
  assert "| ground truth (held-out clips) | 1.000 |" in out
  out = run_experiment("experiments.shape_fidelity", "--workdir", workdir, "--clips", "2",
                       "--strengths", "0.5,1", "--steps", "2")
  rows = json.load(open(os.path.join(workdir, "shape_fidelity.json")))["rows"]
  assert [r["strength"] for r in rows] == [0.5, 1.0] and rows[1]["start_time"] == 1.0
  assert all(0 <= r["source_shape_kept"] <= 1 and np.isfinite(r["psnr_db"]) for r in rows)
  assert "| swapped caption's shape taken |" in out
  blur_json = str(tmp_path / "blur_ceiling.json")
  out = run_experiment("experiments.blur_ceiling", "--config", "configs/world_tiny.py:test",
                       f"--config.world.data_dir={data_dir}", "--sigmas", "1", "--clips", "4",
                       "--workdir", workdir, "--prompts", "2", "--cfg-scale", "3",
                       "--out", blur_json)
  blur = json.load(open(blur_json))
  assert [r["sigma"] for r in blur["rows"]] == [0.0, 1.0] and blur["rows"][0]["softness"] == 0
  (run,) = blur["runs"]
  assert run["videos"] == workdir and run["softness"] >= 0 and run["cfg_scale"] == 3
  assert "| squares squarer than circles (p) |" in out
  assert "| blur of equal softness (px) |" in out
  bench_dir = os.path.join(workdir, "shapes_bench")
  assert {"shapes_bench.json", "shapes_bench.md", "worst.png", "worst.txt",
          "distributions.png"} <= set(os.listdir(bench_dir))
  # The sheets of generated samples the experiments write are signed (and watermarked).
  for sheet in (os.path.join(workdir, "native_sizes", "4x16x16.png"),
                os.path.join(bench_dir, "worst.png")):
    record = manifest.verify(sheet)
    assert record.status in ("trusted", "untrusted"), (sheet, record.status)
  # (The fast-sampling table: tests/train/test_distill.py, with a student.)
  out = run_experiment("experiments.provenance_bench", "--workdir", workdir, "--clips", "2",
                    "--train-clips", "2", "--classifier-steps", "2", "--steps", "2",
                    "--scale", "2", "--workers", "1",
                    "--out", str(tmp_path / "provenance" / "bench.json"))
  assert "| combined |" in out and "| re-encoded CRF 28 |" in out
  assert {"bench.json", "bench.md", "bench.png"} <= set(os.listdir(tmp_path / "provenance"))
  out = run_experiment("experiments.watermark_calibration", "--workdir", workdir, "--clips", "2",
                    "--steps", "2", "--scale", "2", "--workers", "1",
                    "--out", str(tmp_path / "calibration.json"))
  calibration = json.load(open(tmp_path / "calibration.json"))
  assert "threshold for <= 1% false positives" in out
  assert calibration["clips"] == 4 and set(calibration["scores"]) == set(attacks.ATTACKS)
  assert calibration["threshold"] >= max(calibration["percentile_99"].values())


@pytest.mark.slow
def test_vae_sweep_trains_and_evaluates_a_variant(tmp_path):
  # A separate process with one device, as the sweep runs on a GPU: its batches (8 clips,
  # eval 4) do not divide over this session's 8 simulated devices. One variant (each is
  # the same loop over a different config; the suite's time is better spent elsewhere), on
  # the test config (--tiny: 47 s against 28 s for the whole process here).
  out = _run_process("experiments.vae_sweep", "--tiny", "--variants", "lr_2e-3",
                    "--steps", "2", "--eval-every", "2", "--eval-examples", "4",
                    "--eval-batch", "4", "--train-clips", "8", "--log-every", "1",
                    "--out", str(tmp_path / "sweep.json"))
  assert "| lr_2e-3 | 0.08M |" in out
  rows = json.load(open(tmp_path / "sweep.json"))["rows"]
  assert [r["evals"][-1]["step"] for r in rows] == [2]


def test_compiled_programs_are_kept_between_processes(tmp_path, monkeypatch):
  """The console script's compilation cache: the environment's directory when it names one,
  else under XDG_CACHE_HOME (~/.cache); none when SORA_JAX_COMPILATION_CACHE=0. `main`
  puts it in the environment before a command imports JAX (and its processes inherit it)."""
  assert cli.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/c"}) == "/c"
  assert cli.compilation_cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/sora_jax/jit"
  assert cli.compilation_cache_dir({}) == os.path.expanduser("~/.cache/sora_jax/jit")
  assert cli.compilation_cache_dir({"SORA_JAX_COMPILATION_CACHE": "0",
                                    "JAX_COMPILATION_CACHE_DIR": "/c"}) is None
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  code, _ = run_cli("train", "--help")
  assert code == 0
  assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "sora_jax" / "jit")
  # This process's JAX keeps the tests' own cache (conftest), set before JAX was imported.
  assert jax.config.jax_compilation_cache_dir == os.environ.get("SORA_JAX_TEST_CACHE_DIR")


def test_unknown_override_key_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  code, out = run_cli("train", "--config", "configs/world_tiny.py:test",
                    "--workdir", str(tmp_path / "r"), "--config.train.stepz=3")
  assert code != 0
  assert "stepz" in out


def test_microbatches_that_do_not_split_the_batch_are_refused(data_dir, tmp_path, monkeypatch):
  """`--config.train.microbatches` through the console script's `train`: a count that does
  not split the batch over the batch shards is one line naming the key, before any step."""
  monkeypatch.chdir(ROOT)
  code, out = run_cli("train", "--config", "configs/world_tiny.py:test", "--workdir",
                      str(tmp_path / "r"), f"--config.world.data_dir={data_dir}",
                      "--config.train.microbatches=3")
  assert code != 0
  assert out.strip().splitlines()[-1] == (
      "sora-jax train: data.batch_size=8 must divide by train.microbatches x mesh.data x "
      "mesh.fsdp = 3 x 8.")
  assert not os.path.exists(tmp_path / "r" / "checkpoints")


# One dialect: every command answers --help, and user errors are one line ---------------

@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_answers_help(command):
  code, out = run_cli(command, "--help")
  assert code == 0 and out.startswith(f"usage: sora-jax {command}"), out
  if command in ("train", "demo", "train-vae", "encode-dataset", "prepare-data", "import-wan"):
    assert "--config" in out and "--config.SECTION.KEY=VALUE" in out


def test_top_level_help_lists_every_command():
  code, out = run_cli("--help")
  assert code == 0 and all(f"  {name} " in out for name in cli.COMMANDS)


@pytest.mark.parametrize("argv, code, expected", [
    (("sample", "--workdir", "/missing/run", "--prompt", "x", "--out", "o.mp4"), 1,
     "sora-jax sample: /missing/run/config.json not found"),
    (("export", "--workdir", "/missing/run", "--to", "safetensors", "--out", "/tmp/none"), 1,
     "sora-jax export: /missing/run/config.json not found"),
    (("train", "--config", "configs/world_tiny.py:test", "--workdir", "w",
      "--config.train.stepz=3"), 2,
     '--config.train.stepz: train has no key "stepz" (did you mean "steps"?); its keys: '),
    (("train", "--config", "configs/world_tiny.py:test", "--workdir", "w",
      "--config.optim.nonsense=1"), 2, 'optim has no key "nonsense"; its keys: b1, b2,'),
    (("train", "--config", "configs/world_tiny.py:test", "--workdir", "w",
      "--config.nonsense.a=1"), 2, 'the config has no key "nonsense"; its keys: autoencoder,'),
    (("train", "--config", "configs/world_tiny.py:test", "--workdir", "w",
      "--config.model.guidance_embedding=true"), 1,
     "sora-jax train: model.guidance_embedding: the guidance-scale input of a student"),
    (("train", "--config", "configs/world_tiny.py:test", "--workdir", "w",
      "--config.train.steps=abc"), 2, "invalid literal for int()"),
    (("train", "--config", "configs/none.py", "--workdir", "w"), 2,
     "--config configs/none.py: no such file"),
    (("train", "--config", "configs/world_tiny.py:bogus", "--workdir", "w",
      "--config.train.steps=3"), 2,
     "error: --config configs/world_tiny.py:bogus: configs/world_tiny.py: unknown arg 'bogus'"),
    (("train", "--config", "configs/world_tiny.py:test", "--workdir", "w", "--bogus", "3"), 2,
     "unrecognized arguments: --bogus 3"),
    (("train", "--workdir", "w"), 2, "the following arguments are required: --config"),
    (("prepare-data", "--media", "/missing/media", "--out", "o"), 1,
     "sora-jax prepare-data: --media /missing/media: no such directory"),
    (("import-wan", "--model-dir", "/missing/wan", "--out", "o", "--config",
      "configs/wan2_1_t2v.py:1.3B"), 1, "sora-jax import-wan: '/missing/wan' lacks"),
    (("plan", "--config", "configs/world_tiny.py:test", "--topology", "v9x:2x2"), 1,
     "sora-jax plan: --topology 'v9x:2x2': expected <chip>:<AxB[xC]>"),
    (("bogus",), 1, "sora-jax: unknown command 'bogus'"),
])
def test_user_errors_end_in_one_line_and_a_nonzero_exit(argv, code, expected, monkeypatch):
  monkeypatch.chdir(ROOT)
  got, out = run_cli(*argv)
  assert got == code and expected in out, out
  assert "Traceback" not in out
  if code == 1:
    assert len(out.strip().splitlines()) == 1, out


def test_verify_and_detect_name_a_file_they_cannot_read(tmp_path):
  notes = tmp_path / "notes.txt"
  notes.write_text("not media")
  code, out = run_cli("verify", str(notes))
  assert code == manifest.EXIT_CODES["unreadable"] == 5
  assert out.startswith("not a media file that can be read") and "Traceback" not in out
  code, out = run_cli("verify", str(tmp_path / "missing.mp4"))
  assert code == 5 and "no such file" in out
  code, out = run_cli("detect", str(notes))
  assert code == 1 and out.startswith("sora-jax detect: ") and len(out.strip().splitlines()) == 1


def test_overrides_reach_sections_a_config_leaves_at_their_defaults(monkeypatch):
  """The world configs hold every section a diffusion run reads, `lora` at rank 0 among
  them, so `--config.lora.rank=R` turns LoRA on for any of them."""
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  from sora_jax.cli.args import config_parser, parse_with_config  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(ROOT)
  for arg in ("test", "", "latent"):
    _, config = parse_with_config(config_parser("sora-jax train", ""), [
        "--config", f"configs/world_tiny.py:{arg}", "--workdir", "w", "--config.lora.rank=4"])
    assert configs.typed(config).lora.rank == 4
