"""Checkpoints restore the exact state, and a resumed run continues exactly."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from sora_jax import configs
from sora_jax.parallel.sharding import make_mesh
from sora_jax.train import optim, workdir as wd
from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.loop import train
from sora_jax.train.state import abstract_train_state, create_train_state, train_state_shardings


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _restore(workdir, step=None):
  """The train state of `workdir`'s checkpoint `step` (None: the latest), on one device."""
  config = wd.load_config(workdir)
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  vocab = __import__("sora_jax.models.tokenizer", fromlist=["Tokenizer"]).Tokenizer(
      wd.tokenizer_path(workdir)).vocab_size
  tx = optim.make_optimizer(config.optim, config.train.steps)
  target = abstract_train_state(train_state_shardings(config, vocab, mesh, tx), config, vocab, tx)
  ckpt = Checkpointer(wd.checkpoint_dir(workdir), keep=5, every=1)
  state = ckpt.restore(ckpt.latest_step() if step is None else step, target)
  ckpt.close()
  return jax.device_get(state)


def test_save_restore_round_trip(config, devices, tmp_path):
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=devices)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  _, state, shardings = create_train_state(config, 24, mesh, tx)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, every=1)
  assert ckpt.save(3, state)
  ckpt.wait()
  # Restore onto the sharded mesh, and onto one device.
  for target_mesh in (mesh, make_mesh({"data": 1}, devices=devices[:1])):
    target = abstract_train_state(train_state_shardings(config, 24, target_mesh, tx),
                                  config, 24, tx)
    restored = ckpt.restore(3, target)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    leaf = restored["params"]["dit"]["patch_embed"]["kernel"]
    assert leaf.sharding.mesh.devices.size == target_mesh.devices.size
  ckpt.close()


def _resume_matches_the_whole_run(config, whole, parts, stop=4, end=6):
  """Trains `config` in `parts` to step `stop` ("preempted", a checkpoint step), then
  resumes it to step `end`: its losses and state equal the uninterrupted run `whole` up
  to step `end`."""
  first = train(config, parts, progress=False, stop_at=stop)
  assert first["step"] == stop
  second = train(config, parts, progress=False, stop_at=end)  # resumes from checkpoint `stop`
  assert second["step"] == end and second["history"][0][0] == stop + 1
  assert _losses(parts) == {s: v for s, v in _losses(whole).items() if s <= end}
  jax.tree.map(np.testing.assert_array_equal, _restore(parts), _restore(whole, end))


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_interrupted_run_resumes_exactly(reference_run, tmp_path):
  config, whole, _ = reference_run
  config = configs.from_json(configs.to_json(config))
  config.train.async_checkpoints = True
  _resume_matches_the_whole_run(config, whole, str(tmp_path / "parts"))


@pytest.mark.slow
def test_interrupted_run_of_native_sizes_resumes_exactly(data_dir, tmp_path):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, native=True)
  config.train.update(steps=4, log_every=1, checkpoint_every=2, async_checkpoints=True)
  whole = str(tmp_path / "whole")
  train(config, whole, progress=False)
  _resume_matches_the_whole_run(config, whole, str(tmp_path / "parts"), stop=2, end=4)


def test_workdir_of_another_experiment_is_refused(config, tmp_path):
  workdir = str(tmp_path / "run")
  wd.save_config(workdir, config)
  other = configs.from_json(configs.to_json(config))
  other.model.variant = "Pico/1x4x4"
  try:
    wd.save_config(workdir, other)
  except ValueError as e:
    assert "model" in str(e) and "another experiment" in str(e)
  else:
    raise AssertionError("expected a ValueError")


def test_runs_saved_before_a_key_existed_still_resume(config, tmp_path):
  """A workdir whose config.json predates `world.holdout` is the same experiment as a
  config that leaves it empty, and another one when the config holds something out."""
  workdir = str(tmp_path / "run")
  wd.save_config(workdir, config)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    stored = json.load(f)
  del stored["world"]["holdout"]
  with open(path, "w") as f:
    json.dump(stored, f)
  wd.save_config(workdir, config)                    # accepted
  held = configs.from_json(configs.to_json(config))
  held.world.holdout = ("red circle",)
  with pytest.raises(ValueError, match="world"):
    wd.save_config(workdir, held)


@pytest.mark.slow
def test_a_workdir_of_the_previous_layout_resumes_and_samples(data_dir, tmp_path):
  """`tests/fixtures/workdir_0_1`: 2 steps of `configs/world_tiny.py:test` written by
  sora_jax 0.1.0 before the layered rewrite (commit 596a1d5, one device, its data cached
  elsewhere): it resumes to step 3 on this session's mesh and samples."""
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  from sora_jax.sample import Sampler  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "old")
  shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "fixtures", "workdir_0_1"),
                  workdir)
  sampler = Sampler.from_workdir(workdir)
  assert sampler.step == 2
  video = sampler.generate(["a red circle moves left"], [0], steps=2)
  assert video.shape == (1, 4, 16, 16, 3) and video.dtype == np.uint8

  # The test config of then: Pico's two blocks (model.depth 0: the variant's).
  config = make_test_config(data_dir, **{"model.depth": 0})
  config.train.update(steps=3, checkpoint_every=2, keep_checkpoints=2, async_checkpoints=False)
  summary = train(config, workdir, progress=False)
  assert summary["step"] == 3 and summary["history"][0][0] == 3 and np.isfinite(summary["loss"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]


def test_a_run_starts_from_weights_of_the_other_blocks_layout(data_dir, tokenizer, tmp_path):
  """`train.init_from` across `model.scan_layers`: an export of a looped model starts a
  scanned run with its blocks stacked, and an export of a scanned one a looped run with
  them split per layer; the weights are the same either way."""
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  from helpers import random_model, stack_blocks, write_export  # pylint: disable=g-import-not-at-top
  from sora_jax.train.restore import initial_params  # pylint: disable=g-import-not-at-top
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  looped = make_test_config(data_dir, **{"model.depth": 2})
  scanned = make_test_config(data_dir, **{"model.depth": 2, "model.scan_layers": True})
  _, weights = random_model(looped, tokenizer.vocab_size)
  stacked = {**weights, "dit": stack_blocks(weights["dit"])}
  for source, params, target, want in ((looped, weights, scanned, stacked),
                                       (scanned, stacked, looped, weights)):
    export = write_export(str(tmp_path / f"from_{source.model.scan_layers}"), source, tokenizer,
                          params)
    got = initial_params(export, target, tokenizer.vocab_size, mesh)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
