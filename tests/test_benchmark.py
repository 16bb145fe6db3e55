"""The benchmarks run on CPU at tiny sizes and report what they measure: the train step's
throughput, the side-by-side with diffusers, the GPU measurement's every section."""

import json
import os

import numpy as np
import pytest

from helpers import run_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch):
  monkeypatch.chdir(ROOT)   # the experiments read configs/ relative to the repository


@pytest.mark.slow
def test_benchmark_train_reports_throughput_and_mfu(tmp_path):
  out = str(tmp_path / "bench.json")
  printed = run_experiment("experiments.benchmark_train", "--config",
                           "configs/world_tiny.py:test", "--steps", "2", "--warmup", "1",
                           "--out", out)
  assert "MFU" in printed
  (ours,) = json.load(open(out))["rows"]
  assert ours["step_s"] > 0 and ours["tokens_per_step"] == 8 * 2 * 4 * 4
  assert 0 < ours["mfu"] <= 1.5   # against a measured CPU matmul rate, so not a hard bound
  assert ours["flops_per_step"] > 0 and ours["memory_bytes"] > 0


@pytest.mark.slow
def test_versus_diffusers_agrees_with_diffusers_and_times_both(tmp_path):
  out = str(tmp_path / "versus.json")
  # (Both sides' train steps run in the device_bench test below.)
  printed = run_experiment("experiments.versus_diffusers", "--sizes", "tiny", "--repeats", "1",
                           "--parts", "forward,sampling", "--sampling-steps", "3",
                           "--sampling-repeats", "1", "--out", out)
  assert "median of rounds" in printed
  forward, sampling = json.load(open(out))["rows"]
  assert forward["rel_error"] < 1e-5                   # same weights, same inputs
  assert sampling["max_pixel_error"] < 1e-4            # the same video from WanPipeline
  assert sampling["parts_s"]["sora_jax"]["decode_s"] > 0
  for row in (forward, sampling):
    assert row["sora_jax"]["median_ms"] > 0 and row["diffusers"]["median_ms"] > 0
    assert row["speedup"] > 0 and row["sora_jax"]["repeats"] == row["diffusers"]["repeats"]


@pytest.mark.slow
def test_device_bench_measures_every_section_at_a_tiny_size(tmp_path):
  """The GPU measurement's code, run whole on CPU at a tiny size so that it cannot rot:
  every section measured on both sides, the table and JSON written."""
  run_experiment("experiments.device_bench", "--tiny", "--out-dir", str(tmp_path),
                 "--tokens", "32k", "--train-steps", "1", "--sampling-steps", "2",
                 "--student-steps", "2", "--budget-s", "3600")
  results = json.load(open(tmp_path / "device_bench.json"))
  assert results["ceilings"]["bf16_matmul_tflops"] > 0
  for side in ("torch", "sora_jax"):
    train = results[f"train_32k_{side}"]
    assert train["step_ms"] > 0 and train["tokens"] == 2 * 4 * 4, train
    assert 0 < train["mfu"] and train["tokens_per_s"] > 0
    sampling = results[f"sampling_{side}"]
    assert sampling["transformer_s"] > 0 and sampling["end_to_end_s"] > 0, sampling
  cached = results["sampling_sora_jax_cached"]       # 2 steps: the second reuses the first
  assert cached["transformer_calls"] == 1 and cached["transformer_s"] > 0, cached
  one_pass = results["sampling_sora_jax_one_pass_2"]    # the students' compute: one pass
  assert one_pass["forward_passes"] == 2 and one_pass["end_to_end_s"] > 0, one_pass
  stream = results["stream_sora_jax"]      # the block-causal twin, a latent frame a chunk
  assert stream["frames"] == 1 + 4 * (stream["chunks"] - 1) and stream["frames_per_s"] > 0
  assert stream["first_frames_s"] > 0 and stream["last_chunk_s"] > 0, stream
  table = open(tmp_path / "device_bench.md").read()
  assert "not measured" not in table and table.count("| sora_jax |") == 8
  attention = results["attention"]["cudnn_attention"]   # the XLA reference here: on CPU
  assert attention["rel_error"] < 1e-2 and attention["forward_backward_ms"] > 0, attention
  assert not attention["calls_cudnn_kernel"]


def test_device_bench_marks_what_the_budget_left_out(tmp_path):
  run_experiment("experiments.device_bench", "--tiny", "--out-dir", str(tmp_path),
                 "--sections", "ceilings", "--budget-s", "0")
  results = json.load(open(tmp_path / "device_bench.json"))
  assert results["ceilings"]["not_measured"] == "time budget"


@pytest.mark.slow
def test_benchmark_data_reports_pipeline_against_the_train_step(tmp_path):
  out = str(tmp_path / "data.json")
  printed = run_experiment("experiments.benchmark_data", "--config",
                           "configs/world_tiny.py:test", "--files", "4", "--scale", "2",
                           "--batches", "2", "--steps", "2", "--workers", "0,1", "--out", out)
  assert "decoded / consumed" in printed
  rows = {r["stage"]: r for r in json.load(open(out))["rows"]}
  consumed = rows["train step (consumes)"]["clips_per_s"]
  for stage in ("input pipeline, 0 Grain workers", "input pipeline, 1 Grain worker"):
    assert rows[stage]["ratio"] == rows[stage]["clips_per_s"] / consumed > 0
  assert rows["prepare-data, 1 process"]["detail"].endswith("12 clips")   # 4 videos x 3


@pytest.mark.slow
def test_scaling_study_reports_score_and_loss_against_flops(tmp_path, data_dir):
  workdir = str(tmp_path / "scaling")
  run_experiment("experiments.scaling", "--config", "configs/world_tiny.py:test",
                 f"--config.world.data_dir={data_dir}", "--widths", "32,64", "--budgets", "2,4",
                 "--prompts", "2", "--samples_per_prompt", "1", "--workdir", workdir)
  rows = json.load(open(os.path.join(workdir, "scaling.json")))["rows"]
  assert [(r["width"], r["steps"]) for r in rows] == [(32, 2), (32, 4), (64, 2), (64, 4)]
  for a, b in zip(rows[::2], rows[1::2]):      # FLOPs grow with steps, params with width
    assert b["flops"] == 2 * a["flops"] > 0
  assert rows[2]["params"] > rows[0]["params"] and rows[2]["flops"] > rows[0]["flops"]
  assert all(0 <= r["score"] <= 1 and np.isfinite(r["loss"]) for r in rows)
  assert os.path.exists(os.path.join(workdir, "scaling.png"))


def test_aot_vs_maxdiffusion_names_what_is_missing(tmp_path, capsys):
  """The side-by-side needs a MaxDiffusion checkout: without one, or with a directory that
  is not one, it stops with one line naming the problem (exit 2) before compiling."""
  from experiments import aot_vs_maxdiffusion  # pylint: disable=g-import-not-at-top
  for argv, message in (([], "--maxdiffusion PATH"),
                        (["--maxdiffusion", str(tmp_path)], "not a MaxDiffusion checkout"),
                        (["--maxdiffusion", str(tmp_path), "--remat", "most"], "--remat"),
                        (["--maxdiffusion", str(tmp_path), "--steps=3"], "unrecognized")):
    with pytest.raises(SystemExit) as exit_info:
      aot_vs_maxdiffusion.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.xdist_group("reference")
def test_lora_study_compares_ranks_with_full_fine_tuning(tmp_path, data_dir, reference_run):
  """The study from an existing base (the reference run): a rank-2 LoRA and a full
  fine-tune, their costs and ShapesBench split by the held-out combination."""
  out = str(tmp_path / "study")
  printed = run_experiment(
      "experiments.lora_study", "--out", out, "--base", reference_run[1], "--preset", "test",
      "--data-dir", data_dir, "--holdout", "red circle", "--steps", "2", "--clips", "16",
      "--ranks", "2", "--prompts", "4", "--sample-steps", "2")
  assert "| lora r2 |" in printed and "| full fine-tuning |" in printed
  rows = {r["variant"]: r for r in json.load(open(os.path.join(out, "lora_study.json")))["rows"]}
  assert set(rows) == {"base", "full fine-tuning", "lora r2"}
  lora, full = rows["lora r2"], rows["full fine-tuning"]
  assert 0 < lora["trainable_params"] < full["trainable_params"] / 10
  assert lora["optimizer_bytes"] < full["optimizer_bytes"] / 10
  assert lora["checkpoint_bytes"] < full["checkpoint_bytes"]
  for row in rows.values():
    assert 0.0 <= row["score"] <= 1.0


def test_watermark_speed_times_both_forms_and_checks_them_equal(tmp_path):
  out = run_experiment("experiments.watermark_speed", "--clips", "1", "--out",
                       str(tmp_path / "speed.json"))
  result = json.load(open(tmp_path / "speed.json", encoding="utf-8"))
  assert result["outputs_equal"] and "outputs equal: True" in out
  assert [r["form"] for r in result["rows"]] == ["complex products (before)",
                                                  "real products (now)"]
  assert all(r["embed_ms"] > 0 and r["detect_ms"] > 0 for r in result["rows"])
