"""Fault injection: SIGKILL at random points, SIGTERM, corrupt checkpoints, non-finite steps.

Run on their own with `pytest -m faults`.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import subprocess_env
from sora_jax.train import sources as train_sources
from sora_jax.train import runner
from sora_jax.train.checkpoint import CheckpointError
from sora_jax.train.faults import NumericFault
from sora_jax.train.loop import train

pytestmark = pytest.mark.faults
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _losses(workdir):
  """step -> every loss logged for it (a resumed run logs some steps twice)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for record in map(json.loads, f):
      out.setdefault(record["step"], set()).add(record["loss"])
  return out


def _params(workdir, step=None):
  directory = os.path.join(workdir, "checkpoints")
  step = step or max(int(s) for s in os.listdir(directory) if s.isdigit())
  state = ocp.PyTreeCheckpointer().restore(os.path.join(directory, str(step), "state"))
  return jax.device_get(state["params"]), jax.device_get(state["opt_state"])


def _train_cmd(workdir, data_dir, steps, checkpoint_every=3, keep_checkpoints=2):
  return [sys.executable, "-m", "sora_jax.cli", "train", "--config", "configs/world_tiny.py:test",
          "--workdir", workdir, f"--config.world.data_dir={data_dir}",
          f"--config.train.steps={steps}", "--config.train.log_every=1",
          f"--config.train.checkpoint_every={checkpoint_every}",
          f"--config.train.keep_checkpoints={keep_checkpoints}"]


def _env():
  return subprocess_env()


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_sigkill_at_random_points_resumes_bitwise(data_dir, tmp_path, reference_run):
  """The reference run's config (10 steps, a checkpoint every 2) through the command
  line, on the same 8 simulated devices: killed once at a random moment, restarted until
  done, it logs the losses and ends with the parameters of the uninterrupted run."""
  _, whole, _ = reference_run
  steps, env = 10, subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = _train_cmd(str(tmp_path / "parts"), data_dir, steps, checkpoint_every=2,
                   keep_checkpoints=10)     # as conftest.reference_run
  parts, rng, kills = str(tmp_path / "parts"), random.Random(0), 0
  for _ in range(8):
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    if kills < 1:
      # Kill at a random moment once the run is past start-up (mid-step or mid-save).
      deadline = time.time() + 120
      metrics = os.path.join(parts, "metrics.jsonl")
      start_lines = sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0
      while time.time() < deadline and proc.poll() is None:
        lines = sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0
        if lines > start_lines:
          break
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 1.0))
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        kills += 1
      proc.wait()
      continue
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    if f"Trained to step {steps}" in out:
      break
  assert kills == 1
  whole_losses, part_losses = _losses(whole), _losses(parts)
  assert set(part_losses) == set(whole_losses)
  for step, values in part_losses.items():
    assert values == whole_losses[step], step       # every logged loss, even re-logged ones
  jax.tree.map(np.testing.assert_array_equal, _params(parts, steps), _params(whole, steps))


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(_train_cmd(workdir, data_dir, 100000), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics)
                                        and sum(1 for _ in open(metrics)) >= 4):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  assert "Preempted: saved step" in out
  saved = int(out.split("Preempted: saved step ")[1].split()[0])
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert max(steps) == saved >= 4            # not just the last interval's checkpoint


def _corrupt_truncate(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 16:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_corrupt_checkpoints_fall_back_to_the_newest_good_one(tmp_path, reference_run):
  config, whole, _ = reference_run      # 10 steps, a checkpoint every 2, all kept

  # The same run stopped at 8, then three kinds of damage to checkpoints 8, 6 and 4.
  parts = str(tmp_path / "parts")
  train(config, parts, progress=False, stop_at=8)
  ckpts = os.path.join(parts, "checkpoints")
  _corrupt_truncate(os.path.join(ckpts, "8"))                              # truncated files
  shutil.rmtree(os.path.join(ckpts, "6", "state"))                         # a missing item
  # Another model's state (one kernel of another size) in checkpoint 4.
  state = ocp.PyTreeCheckpointer().restore(os.path.join(ckpts, "4", "state"))
  kernel = state["params"]["dit"]["proj_out"]["kernel"]
  state["params"]["dit"]["proj_out"]["kernel"] = np.zeros(
      kernel.shape[:-1] + (kernel.shape[-1] + 1,), kernel.dtype)
  shutil.rmtree(os.path.join(ckpts, "4", "state"))
  ocp.PyTreeCheckpointer().save(os.path.join(ckpts, "4", "state"), state)

  summary = train(config, parts, progress=False)                           # resumes from 2
  assert summary["history"][0][0] == 3 and summary["step"] == 10
  assert sorted(os.listdir(os.path.join(parts, "checkpoints_invalid"))) == ["4", "6", "8"]
  jax.tree.map(np.testing.assert_array_equal, _params(parts), _params(whole))

  # Nothing restorable: a clear error naming every step, nothing deleted.
  for step in os.listdir(ckpts):
    if step.isdigit():
      _corrupt_truncate(os.path.join(ckpts, step))
  with pytest.raises(CheckpointError, match=r"step 10 .*step 8"):
    train(config, parts, progress=False)


@pytest.mark.slow
def test_non_finite_batches_are_skipped_then_stop_the_run(data_dir, tmp_path, monkeypatch):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir)
  # 10 steps like the reference run: the same compiled step (the run's compilation cache).
  config.train.update(steps=10, log_every=1, checkpoint_every=2, keep_checkpoints=10,
                      max_nonfinite_steps=3)
  real = runner.to_global_batch
  bad_steps, calls = set(), []

  def poisoned(batch, mesh, rules):
    calls.append(None)
    if len(calls) in bad_steps:
      batch = {**batch, "video": np.full_like(batch["video"], np.nan)}
    return real(batch, mesh, rules)

  monkeypatch.setattr(runner, "to_global_batch", poisoned)   # the loop skeleton shards batches

  # One NaN batch (step 3): skipped, parameters untouched, the run goes on.
  bad_steps.update({3})
  workdir = str(tmp_path / "one")
  summary = train(config, workdir, progress=False, stop_at=4)
  assert summary["skipped_steps"] == 1 and np.isfinite(summary["loss"])
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["skipped"] for r in records] == [0, 0, 1, 0]
  assert not np.isfinite(records[2]["loss"]) and np.isfinite(records[3]["loss"])

  # Three in a row (steps 6-8) stop the run with a diagnosis; no checkpoint after step 5
  # (the interval's step 6 and 8 fall inside the fault).
  calls.clear()
  bad_steps.clear()
  bad_steps.update({6, 7, 8})
  workdir = str(tmp_path / "streak")
  with pytest.raises(NumericFault, match=r"3 consecutive non-finite steps \(6 to 8.*last finite "
                                         r"loss .* at step 5"):
    train(config, workdir, progress=False)
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert max(saved) == 4


class _BadExamples:
  """The test world's 64 clips with one bad example of each kind and odd captions.

  Index -> fault: 0 undecodable (raises), 2 zero frames, 4 one channel, 6 an absurd
  width, 8 float pixels; 10 and 12 empty captions; 14 a caption far too long.
  """
  BAD = (0, 2, 4, 6, 8)

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    record = dict(self.source[i])
    video = record["video"]
    if i == 0:
      raise OSError("broken data stream")
    if i == 2:
      record["video"] = video[:0]
    elif i == 4:
      record["video"] = video[..., :1]
    elif i == 6:
      record["video"] = np.zeros((4, 16, 5000, 3), np.uint8)
    elif i == 8:
      record["video"] = video.astype(np.float32)
    elif i in (10, 12):
      record["caption"] = ""
    elif i == 14:
      record["caption"] = " ".join(["a red circle moves left quickly"] * 10)
    return record


@pytest.mark.slow
def test_bad_examples_are_skipped_counted_and_training_goes_on(data_dir, tmp_path,
                                                                monkeypatch, train_source):
  """One epoch (8 batches of 8 over 64 clips) sees each bad example once: each is replaced
  by the next clip and counted; empty and truncated captions are counted."""
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  from sora_jax.models.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  source = _BadExamples(train_source)
  monkeypatch.setattr(train_sources, "training_source", lambda *a, **k: source)
  config = make_test_config(data_dir)
  config.train.update(steps=8, log_every=4, checkpoint_every=8)
  config.data.max_skipped_fraction = 0.1          # 5 of 69 records read are bad
  workdir = str(tmp_path / "run")
  summary = train(config, workdir, progress=False)
  assert summary["step"] == 8 and np.isfinite(summary["loss"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  tokenizer = Tokenizer(os.path.join(workdir, "tokenizer.model"))
  visited = [i + 1 if i in _BadExamples.BAD else i for i in range(len(source))]
  truncated = sum(tokenizer.num_pieces(source[i]["caption"]) >= config.data.text_length
                  for i in visited)
  assert last["data/skipped_records"] == len(_BadExamples.BAD)
  assert last["data/skipped_fraction"] == pytest.approx(5 / 69)
  assert last["data/captions_empty"] == 2
  assert last["data/captions_truncated"] == truncated >= 1
  assert summary["data"] == (f"64 examples; 5 bad records skipped; 2 empty captions "
                             f"(unconditional); {truncated} captions truncated")
  # The same data with a threshold below its bad share stops the run.
  config.data.max_skipped_fraction = 0.05
  from sora_jax.data.sources import DataError  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError, match="records read were bad"):
    train(config, str(tmp_path / "strict"), progress=False)
