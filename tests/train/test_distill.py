"""`sora-jax distill`: students of the reference run. The teacher stays frozen and sharded
by the student's rules; a student starts as its teacher, resumes, samples one pass per
step (a shortcut student with --steps), and its export round-trips."""

import dataclasses
import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.long_video import student_variant
from sora_jax import configs
from sora_jax.cli import main as cli_main
from sora_jax.data.pipeline import to_global_batch
from sora_jax.diffusion import distillation, step_cache
from sora_jax.interop import tensors
from sora_jax.interop.export import export_run
from sora_jax.models.autoencoder import IdentityAutoencoder
from sora_jax.models.tokenizer import Tokenizer
from sora_jax.parallel.sharding import make_mesh
from sora_jax.provenance import manifest
from sora_jax.sample import Sampler, guided_velocity
from sora_jax.train import long_rollout, optim, workdir as wd
from sora_jax.train.distill import (distill, initial_student, load_teacher, student_config,
                                    teacher_model_config)
from sora_jax.train.distill_step import consistency_examples, distill_loss, make_distill_step
from sora_jax.train.restore import restore_params
from sora_jax.train.step import null_text_states
from sora_jax.train.state import abstract_model, model_shardings, train_state_shardings

from conftest import make_test_config
from helpers import random_model, random_params, run_cli, run_experiment
from test_sharding import _batch

pytestmark = pytest.mark.xdist_group("reference")


def _config(data_dir, **overrides):
  """The students' test config: data 4 x fsdp 2, 4 steps (the end-to-end run and the
  sharded step compile the same program: the run's compilation cache)."""
  return make_test_config(data_dir, **{
      "mesh.data": 4, "mesh.fsdp": 2, "train.steps": 4, "train.log_every": 1,
      "train.checkpoint_every": 2, "distill.base_steps": 8, **overrides})


def _student(teacher, data_dir, mesh, **overrides):
  """`(config, vocab, graphdef, shardings, tx, teacher graph, teacher params, state)`."""
  config = student_config(_config(data_dir, **overrides), teacher)
  vocab = Tokenizer(wd.tokenizer_path(teacher)).vocab_size
  tx = optim.for_run(config)
  graphdef, abstract = abstract_model(config, vocab)
  shardings = train_state_shardings(config, vocab, mesh, tx, abstract=abstract)
  teacher_graph, teacher_params = load_teacher(teacher, config, vocab, mesh)
  state = initial_student(config, vocab, mesh, tx, teacher_params, model=(graphdef, abstract),
                          shardings=shardings)
  return config, vocab, graphdef, shardings, tx, teacher_graph, teacher_params, state


def test_consistency_examples():
  assert [consistency_examples(b, 0.25) for b in (1, 2, 4, 8, 16)] == [0, 1, 1, 2, 4]
  assert consistency_examples(8, 0.0) == 0 and consistency_examples(8, 0.99) == 7


def test_extended_dmd_windows_lie_in_the_rollout():
  """`long_rollout.windows`: 8-block windows of a 20-block rollout start anywhere in 0 ..
  12 (each start about equally often), the remade block lies in its window; with
  `at_start` = 1 every window starts at block 0, with 0.25 a quarter of them plus their
  uniform share (0.25 + 0.75 / 13); a rollout shorter than the clip is refused."""
  start, remade = (np.asarray(a) for a in long_rollout.windows(jax.random.key(0), 6500, 20, 8))
  assert set(start.tolist()) == set(range(13))
  assert np.all((remade >= start) & (remade < start + 8))
  assert np.abs(np.bincount(start) / 6500 - 1 / 13).max() < 0.02
  first, _ = long_rollout.windows(jax.random.key(1), 100, 20, 8, at_start=1.0)
  assert not np.asarray(first).any()
  some, _ = long_rollout.windows(jax.random.key(2), 6500, 20, 8, at_start=0.25)
  assert abs(float(np.mean(np.asarray(some) == 0)) - (0.25 + 0.75 / 13)) < 0.02
  with pytest.raises(ValueError, match="dmd_rollout_blocks=4: a rollout shorter than"):
    long_rollout.windows(jax.random.key(0), 2, 4, 8)


def test_distill_resumes_samples_and_exports(reference_run, data_dir, tmp_path):
  """A shortcut student through the public entry points: two steps, a resume to four
  (metrics of both losses at every step), the CLI sampling it in 4 steps (and refusing
  another solver in one line), its export sampling what the run samples (in 2 steps)."""
  _, teacher, _ = reference_run
  config = _config(data_dir)
  workdir = str(tmp_path / "student")
  first = distill(config, workdir, teacher=teacher, progress=False, stop_at=2)
  assert first["step"] == 2 and first["method"] == "shortcut"
  second = distill(config, workdir, teacher=teacher, progress=False)
  assert second["step"] == 4
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  assert [m["step"] for m in lines] == [1, 2, 3, 4]
  for m in lines:
    assert np.isfinite(m["loss_teacher"]) and np.isfinite(m["loss_consistency"])
  saved = configs.typed(wd.load_config(workdir))
  assert saved.model.step_embedding and saved.distill.teacher == os.path.abspath(teacher)
  assert (saved.sample.steps, saved.sample.solver, saved.sample.shift) == (4, "euler", 1.0)

  out = str(tmp_path / "student.mp4")
  cli_main(["sora-jax", "sample", "--workdir", workdir, "--prompt", "a red circle",
            "--out", out, "--steps", "4"])
  assert os.path.getsize(out) > 0
  with pytest.raises(SystemExit, match="solver='heun'.*uniform Euler steps"):
    cli_main(["sora-jax", "sample", "--workdir", workdir, "--prompt", "a red circle",
              "--out", str(tmp_path / "x.mp4"), "--solver", "heun"])

  # On a shifted grid no diffusers scheduler spaces its steps: refused in one line.
  shifted = str(tmp_path / "shifted")
  shutil.copytree(workdir, shifted)
  shifted_config = wd.load_config(shifted)
  shifted_config.sample.shift = 3.0
  wd.save_config(shifted, shifted_config)
  with pytest.raises(ValueError, match=r"shifted grid \(sample.shift=3\)"):
    export_run(shifted, "diffusers", str(tmp_path / "shifted_export"))

  exported = str(tmp_path / "export")
  export_run(workdir, "safetensors", exported)
  run, export = Sampler.from_workdir(workdir), Sampler.from_workdir(exported)
  prompts, seeds = ["a blue square moving left", "a red circle"], [0, 1]
  np.testing.assert_array_equal(export.generate(prompts, seeds, steps=2, batch_size=2),
                                run.generate(prompts, seeds, steps=2, batch_size=2))

  # The fast-sampling table: the guided teacher, a cached row (its calibration its own,
  # in a copy of the teacher's run) and the student, side by side.
  copy = str(tmp_path / "teacher")
  shutil.copytree(teacher, copy)
  out = run_experiment("experiments.fast_sampling", "--workdir", copy, "--prompts", "2",
                       "--steps", "4", "--dpm-steps", "", "--thresholds", "1.0",
                       "--calibration-prompts", "2", "--students", workdir,
                       "--student-steps", "2", "--out", str(tmp_path / "fast.json"))
  rows = json.load(open(tmp_path / "fast.json", encoding="utf-8"))["rows"]
  ratios = json.load(open(os.path.join(copy, "step_cache.json"), encoding="utf-8"))[
      "euler/4/uniform"]["ratios"]
  skipped = int(step_cache.skip_schedule(ratios, 1.0).sum())
  assert skipped > 0
  assert [(r["transformer_calls"], r["forward_passes"]) for r in rows] == [
      (4, 8), (4 - skipped, 2 * (4 - skipped)), (2, 2)]
  assert rows[2]["compute_vs_teacher"] == 4.0 and "| shortcut student, 2 steps |" in out
  assert "| teacher + step caching, threshold 1 |" in out
  assert all(0.0 <= r["score"] <= 1.0 and r["seconds_per_video"] > 0 for r in rows)


def test_student_step_and_teacher_stay_sharded(reference_run, data_dir, devices):
  """A shortcut student on data 4 x fsdp 2: the teacher's transformer is sharded by the
  student's rules and unchanged by a step; the student starts as the teacher (its step
  input adds zero), and its steps keep the state's shardings, train the transformer and
  leave the frozen text encoder as it was."""
  _, teacher, _ = reference_run
  mesh = make_mesh({"data": 4, "fsdp": 2}, devices=devices)
  config, vocab, graphdef, shardings, tx, teacher_graph, teacher_params, state = _student(
      teacher, data_dir, mesh)
  t = configs.typed(config)
  assert t.model.step_embedding and not t.model.guidance_embedding
  assert "text_encoder" in t.optim.frozen
  teacher_abstract = abstract_model(teacher_model_config(config), vocab)[1]
  expected = model_shardings(teacher_model_config(config), mesh, teacher_abstract)["dit"]
  jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding, s), teacher_params["dit"],
               expected)
  kernel = teacher_params["dit"]["blocks"][0]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.spec[0] == "fsdp"
  assert len({str(s.index) for s in kernel.addressable_shards}) == 2     # two halves

  # The student starts as the teacher.
  student = nnx.merge(graphdef, state["params"]).dit
  teacher_dit = nnx.merge(teacher_graph, teacher_params["dit"])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 4, 16, 16, 3)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
  args = (x, jnp.array([0.3, 0.8]), text, jnp.ones((2, 5), bool))
  np.testing.assert_array_equal(student(*args, step_size=jnp.array([0.25, 0.5])),
                                teacher_dit(*args))

  null_ids = np.array([1] + [0] * (t.data.text_length - 1), np.int32)
  step = make_distill_step(config, graphdef, teacher_graph, teacher_params["dit"], tx,
                           shardings, mesh, IdentityAutoencoder(), null_ids, null_ids != 0)
  before = jax.device_get(state["params"])
  teacher_before = jax.device_get(teacher_params["dit"])
  for i in range(2):      # the first at learning rate 0 (warmup)
    state, metrics = step(state, to_global_batch(_batch(config, i), mesh,
                                                 configs.sharding_rules(config)))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0
  jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding, s), state, shardings)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(step.fixed), teacher_before)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]["text_encoder"]),
               before["text_encoder"])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(state["params"]["dit"]), before["dit"])
  assert changed["step_mlp"]["fc2"]["kernel"] and changed["proj_out"]["kernel"]


def test_guidance_loss_is_the_distance_to_the_guided_teacher(reference_run, data_dir,
                                                             devices):
  """CFG distillation at the start (the student is the teacher) with the scale fixed at w:
  the loss is the mean of |(1 - w)(v_c - v_u)|^2 at the same draws, so 0 at w = 1 and
  4 times at w = 3 what it is at w = 0."""
  _, teacher, _ = reference_run
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  config, _, graphdef, _, _, teacher_graph, teacher_params, state = _student(
      teacher, data_dir, mesh, **{"distill.method": "guidance"})
  t = configs.typed(config)
  null_ids = jnp.array([1] + [0] * (t.data.text_length - 1), jnp.int32)
  batch = {k: jnp.asarray(v) for k, v in _batch(config, 0).items()}
  losses = {}
  for w in (0.0, 1.0, 3.0):
    fixed = dataclasses.replace(t, distill=dataclasses.replace(t.distill, guidance_range=(w, w)))
    losses[w] = float(distill_loss(state["params"], graphdef, teacher_params["dit"],
                                   teacher_graph, batch, jax.random.key(5), config=fixed,
                                   autoencoder=IdentityAutoencoder(), null_ids=null_ids,
                                   null_mask=null_ids != 0)[0])
  assert losses[1.0] < 1e-12 and losses[0.0] > 1e-4
  np.testing.assert_allclose(losses[3.0], 4 * losses[0.0], rtol=1e-4)

  # Cached text (data.cache_text): the batch's text states and the empty caption's, computed
  # once by null_text_states as `distill` does, give the loss the encoder gives.
  student = nnx.merge(graphdef, state["params"])
  cached = {**batch, "text_states": student.encode_text(batch["text_ids"], batch["text_mask"])}
  null_text = null_text_states(config, graphdef, state["params"], np.asarray(null_ids),
                               np.asarray(null_ids) != 0)
  fixed = dataclasses.replace(t, distill=dataclasses.replace(t.distill, guidance_range=(3, 3)))
  loss = distill_loss(state["params"], graphdef, teacher_params["dit"], teacher_graph, cached,
                      jax.random.key(5), config=fixed, autoencoder=IdentityAutoencoder(),
                      null_ids=null_ids, null_mask=null_ids != 0, null_text=null_text)[0]
  np.testing.assert_allclose(float(loss), losses[3.0], rtol=1e-5)


def test_trajectory_loss_is_the_distance_to_the_guided_teachers_steps(reference_run,
                                                                      data_dir, devices):
  """Trajectory distillation at the start (the student is the teacher, so its own rollout
  does not depend on the guidance scale w): with one teacher step per student step the
  target is the guided velocity at the rollout's point, so the loss is the mean of
  |(1 - w)(v_c - v_u)|^2 there: 0 at w = 1 and 4 times at w = 3 what it is at w = 0; with
  two teacher steps, the second step's velocity differs and the loss at w = 1 does not
  vanish."""
  _, teacher, _ = reference_run
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  config, _, graphdef, _, _, teacher_graph, teacher_params, state = _student(
      teacher, data_dir, mesh, **{"distill.method": "trajectory", "distill.steps": 4})
  t = configs.typed(config)
  assert t.model.step_embedding and t.sample.steps == 4 and t.sample.solver == "euler"
  null_ids = jnp.array([1] + [0] * (t.data.text_length - 1), jnp.int32)
  batch = {k: jnp.asarray(v) for k, v in _batch(config, 0).items()}

  def loss(w, teacher_steps):
    fixed = dataclasses.replace(t, distill=dataclasses.replace(
        t.distill, cfg_scale=w, teacher_steps=teacher_steps))
    return float(distill_loss(state["params"], graphdef, teacher_params["dit"], teacher_graph,
                              batch, jax.random.key(5), config=fixed,
                              autoencoder=IdentityAutoencoder(), null_ids=null_ids,
                              null_mask=null_ids != 0)[0])

  losses = {w: loss(w, 1) for w in (0.0, 1.0, 3.0)}
  assert losses[1.0] < 1e-12 and losses[0.0] > 1e-4
  np.testing.assert_allclose(losses[3.0], 4 * losses[0.0], rtol=1e-4)
  assert loss(1.0, 2) > 1e-8


def test_causal_blocks_and_their_times():
  """Blocks of 2 latent frames in 6: before, in and after block 1 (and 0, and 2)."""
  past, current = distillation.block_masks(jnp.array([1, 0, 2]), 6, 2)
  np.testing.assert_array_equal(past, [[1, 1, 0, 0, 0, 0], [0] * 6, [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(current, [[0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0],
                                          [0, 0, 0, 0, 1, 1]])
  times = distillation.causal_frame_times(jnp.array([1, 0, 2]), jnp.array([0.25, 0.5, 0.75]),
                                          6, 2)
  np.testing.assert_array_equal(times, [[0, 0, 0.25, 0.25, 1, 1], [0.5, 0.5, 1, 1, 1, 1],
                                        [0, 0, 0, 0, 0.75, 0.75]])
  kept = distillation.on_block(lambda x: x, current)(jnp.ones((3, 6, 2, 2, 1)))
  np.testing.assert_array_equal(kept[:, :, 0, 0, 0], current)
  with pytest.raises(ValueError, match="do not split into causal blocks of 4"):
    distillation.block_masks(jnp.array([0]), 6, 4)


def test_causal_loss_is_the_distance_to_the_guided_teachers_steps_on_one_block(
    causal_export, data_dir, devices):
  """Causal trajectory distillation at the start (student = teacher), as the trajectory
  test: one teacher step per student step gives |(1 - w)(v_c - v_u)|^2 on the block
  learnt (0 at w = 1, 4 times at w = 3 what it is at w = 0). The block is made from noise,
  never from the clip: the last block of the clip changes nothing; the first, the past of
  every later block, changes the loss of a student that is no longer its teacher."""
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  config, _, graphdef, _, _, teacher_graph, teacher_params, state = _student(
      causal_export, data_dir, mesh, **{"distill.method": "causal", "distill.steps": 2})
  t = configs.typed(config)
  assert t.model.causal_frames == 1 and t.model.step_embedding and t.sample.steps == 2
  null_ids = jnp.array([1] + [0] * (t.data.text_length - 1), jnp.int32)
  batch = {k: jnp.asarray(v) for k, v in _batch(config, 0).items()}

  def loss(w, teacher_steps=1, video=None, params=state["params"]):
    fixed = dataclasses.replace(t, distill=dataclasses.replace(
        t.distill, cfg_scale=w, teacher_steps=teacher_steps))
    return float(distill_loss(params, graphdef, teacher_params["dit"], teacher_graph,
                              {**batch, **({} if video is None else {"video": video})},
                              jax.random.key(5), config=fixed,
                              autoencoder=IdentityAutoencoder(), null_ids=null_ids,
                              null_mask=null_ids != 0)[0])

  losses = {w: loss(w) for w in (0.0, 1.0, 3.0)}
  assert losses[1.0] < 1e-12 and losses[0.0] > 1e-7
  np.testing.assert_allclose(losses[3.0], 4 * losses[0.0], rtol=1e-4)
  video = batch["video"]
  block = t.model.causal_frames * configs.decode_variant(t.model.variant)["patch"][0]
  assert video.shape[1] // block >= 2
  # A student that is not its teacher (random weights, so no zero-initialised gate hides
  # its attention): its own prediction on the block, not only the teacher's guidance gap
  # |v_c - v_u|^2, reads the past, so the first block moves the loss at first order. (At
  # the start, student = teacher, the past moves that gap only through the text's
  # interaction with it: 6e-6 and 3e-4 of the loss with two random draws measured.)
  moved = {**state["params"], "dit": random_params(state["params"]["dit"])}
  base = loss(0.0, params=moved)
  # The last block is never read: the same program on the same values, bit for bit.
  assert loss(0.0, video=video.at[:, -block:].set(-video[:, -block:]), params=moved) == base
  changed = loss(0.0, video=video.at[:, :block].set(-video[:, :block]), params=moved)
  assert abs(changed - base) > 1e-3 * base       # 1.5e-2 measured; rounding: ~1e-7


def test_a_causal_student_learns_after_its_own_past(causal_export, data_dir, devices):
  """`distill.past=student` (Self-Forcing's rollouts): the blocks before the one learnt are
  the student's own, made from noise, so the loss does not read the clip at all (with
  the data's past, the clip's first block changes it); the guidance identity of the
  teacher-forced loss holds (4 times at w = 3 what it is at w = 0), and the
  loss is not the teacher-forced one. A bidirectional teacher's route is refused."""
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  config, _, graphdef, _, _, teacher_graph, teacher_params, state = _student(
      causal_export, data_dir, mesh, **{"distill.method": "causal", "distill.steps": 2,
                                        "distill.past": "student"})
  t = configs.typed(config)
  null_ids = jnp.array([1] + [0] * (t.data.text_length - 1), jnp.int32)
  batch = {k: jnp.asarray(v) for k, v in _batch(config, 0).items()}

  def loss(w, video=None, past="student"):
    fixed = dataclasses.replace(t, distill=dataclasses.replace(
        t.distill, cfg_scale=w, teacher_steps=1, past=past))
    return float(jax.jit(lambda clip: distill_loss(
        state["params"], graphdef, teacher_params["dit"], teacher_graph,
        {**batch, "video": clip}, jax.random.key(5), config=fixed,
        autoencoder=IdentityAutoencoder(), null_ids=null_ids, null_mask=null_ids != 0)[0])(
            batch["video"] if video is None else video))

  losses = {w: loss(w) for w in (0.0, 3.0)}      # |(1 - w)(v_c - v_u)|^2: 0 at w = 1
  assert losses[0.0] > 1e-7
  np.testing.assert_allclose(losses[3.0], 4 * losses[0.0], rtol=1e-4)
  assert loss(0.0, video=-batch["video"]) == losses[0.0]
  teacher_forced = loss(0.0, past="data")
  assert abs(teacher_forced - losses[0.0]) > 1e-5 * losses[0.0]     # float32 noise: 1e-7
  with pytest.raises(ValueError, match="distill.past='student'"):
    configs.validate(_config(data_dir, **{"distill.method": "causal", "distill.past": "student",
                                          "distill.causal_frames": 1}))


def test_a_causal_student_of_a_bidirectional_teacher_learns_its_whole_clip_odes(
    reference_run, data_dir, devices):
  """`distill.causal_frames` (CausVid's route): the student is block-causal, its teacher
  (the bidirectional reference run) is not. No data are read: the loss does not change
  with the clip. With one block as long as the clip (so the mask changes nothing and the
  student starts as its teacher), one student step and one teacher step, the target is the
  guided velocity at the noise: the loss is |(1 - w)(v_c - v_u)|^2 there (0 at w = 1, 4
  times at w = 3 what it is at w = 0). With blocks of one temporal patch the causal mask
  and the teacher's clean past (the end of its ODE, which moves with w) change it."""
  _, teacher, _ = reference_run
  mesh = make_mesh({"data": 1}, devices=devices[:1])

  def setup(causal_frames):
    config, _, graphdef, _, _, teacher_graph, teacher_params, state = _student(
        teacher, data_dir, mesh, **{"distill.method": "causal", "distill.steps": 1,
                                    "distill.causal_frames": causal_frames})
    t = configs.typed(config)
    assert t.model.causal_frames == causal_frames and t.model.step_embedding
    assert configs.typed(teacher_model_config(config)).model.causal_frames == 0
    assert nnx.merge(teacher_graph, teacher_params["dit"]).cfg.causal_frames == 0
    null_ids = jnp.array([1] + [0] * (t.data.text_length - 1), jnp.int32)
    batch = {k: jnp.asarray(v) for k, v in _batch(config, 0).items()}

    def loss(w, video=None):
      fixed = dataclasses.replace(t, distill=dataclasses.replace(
          t.distill, cfg_scale=w, teacher_steps=1))
      return float(distill_loss(state["params"], graphdef, teacher_params["dit"],
                                teacher_graph,
                                {**batch, **({} if video is None else {"video": video})},
                                jax.random.key(5), config=fixed,
                                autoencoder=IdentityAutoencoder(), null_ids=null_ids,
                                null_mask=null_ids != 0)[0])
    return t, batch, loss

  t, batch, loss = setup(1)
  blocked = loss(0.0)
  assert loss(0.0, video=-batch["video"]) == blocked
  clip = batch["video"].shape[1] // configs.decode_variant(t.model.variant)["patch"][0]
  assert clip >= 2
  _, _, loss = setup(clip)
  losses = {w: loss(w) for w in (0.0, 1.0, 3.0)}
  assert losses[1.0] < 1e-12 and losses[0.0] > 1e-7
  np.testing.assert_allclose(losses[3.0], 4 * losses[0.0], rtol=1e-4)
  assert abs(blocked - losses[0.0]) > 1e-3 * losses[0.0]


def test_a_causal_student_distils_and_streams_through_the_command_line(causal_export,
                                                                       reference_run, data_dir,
                                                                       tmp_path):
  """`sora-jax distill --config.distill.method=causal` of a block-causal teacher: a 2-step
  student (its sampling defaults set) that `sora-jax sample --stream` streams one pass per
  step into a signed file and experiments/long_video.py streams beside its teacher; a
  bidirectional teacher is refused in one line without `distill.causal_frames` and makes
  a causal student that streams with it (given for a causal teacher: refused); a DMD
  stage from the first student trains a critic that its export leaves out."""
  workdir = str(tmp_path / "student")
  common = ["--config", "configs/world_tiny.py:test", "--workdir", workdir,
            f"--config.world.data_dir={data_dir}", "--config.distill.method=causal",
            "--config.distill.steps=2", "--config.distill.teacher_steps=2",
            "--config.train.steps=2", "--config.train.checkpoint_every=2"]
  code, out = run_cli("distill", "--teacher", causal_export, *common)
  assert code == 0, out[-3000:]
  saved = configs.typed(wd.load_config(workdir))
  assert saved.model.causal_frames == 1 and saved.model.step_embedding
  assert (saved.sample.steps, saved.sample.solver, saved.distill.method) == (2, "euler",
                                                                             "causal")
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    assert [json.loads(line)["step"] for line in f][-1] == 2
  path = str(tmp_path / "streamed.mp4")
  code, out = run_cli("sample", "--workdir", workdir, "--prompt", "a red circle moves left",
                      "--out", path, "--stream", "--frames", "8", "--scale", "1")
  assert code == 0 and "8/8 frames" in out, out[-3000:]
  generation = manifest.verify(path).generation
  sampler = generation["sampler"]
  sampler = json.loads(sampler) if isinstance(sampler, str) else sampler
  assert generation["mode"] == "stream" and sampler["steps"] == 2
  # A second stage from that student (train.init_from; the DMD stage below, through the
  # command line) starts from the student's parameters, not the teacher's.
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  state = _student(causal_export, data_dir, mesh, **{
      "distill.method": "causal", "distill.steps": 2, "train.init_from": workdir})[-1]
  first = restore_params(workdir, mesh=mesh).params
  for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(first)):
    np.testing.assert_array_equal(got, want)
  _, teacher, _ = reference_run
  bidi = str(tmp_path / "of_bidirectional")
  other = ["--workdir", bidi, *common[4:]]
  code, out = run_cli("distill", "--teacher", teacher, *common[:2], *other)
  assert code != 0 and "is bidirectional" in out.strip().splitlines()[-1]
  code, out = run_cli("distill", "--teacher", causal_export, *common[:2], *other,
                      "--config.distill.causal_frames=1")
  assert code != 0 and "is block-causal" in out.strip().splitlines()[-1]
  # A bidirectional teacher with the student's blocks given: a causal student.
  code, out = run_cli("distill", "--teacher", teacher, *common[:2], *other,
                      "--config.distill.causal_frames=1")
  assert code == 0, out[-3000:]
  saved = configs.typed(wd.load_config(bidi))
  assert saved.model.causal_frames == 1 and saved.distill.causal_frames == 1
  # experiments/long_video.py streams the students beside the causal run (no
  # bidirectional run given).
  # DMD from the ODE stage's student (CausVid's second stage; Self-Forcing: the student's
  # whole clip its own rollout), beside a critic: trained with it, never restored with it.
  dmd = str(tmp_path / "dmd")
  code, out = run_cli("distill", "--teacher", causal_export, *common[:2], "--workdir", dmd,
                      *common[4:], f"--config.train.init_from={workdir}",
                      "--config.distill.method=dmd", "--config.train.steps=1",
                      "--config.train.checkpoint_every=1")
  assert code == 0, out[-3000:]
  saved = configs.typed(wd.load_config(dmd))
  assert saved.model.critic and saved.train.init_from == workdir
  with open(os.path.join(dmd, "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f][-1]
  assert np.isfinite(logged["loss_dmd"]) and logged["loss_critic"] > 0, logged
  # The export is what `restore_params` reads of the run: the student alone.
  exported = str(tmp_path / "dmd_export")
  export_run(dmd, "safetensors", exported)
  with open(os.path.join(exported, "config.json"), encoding="utf-8") as f:
    assert not json.load(f)["model"]["critic"]
  names = tensors.SafetensorsCheckpoint(os.path.join(exported, "model.safetensors")).names()
  assert {name.split(".")[0] for name in names} == {"dit", "text_encoder"}
  out_json = str(tmp_path / "long.json")
  printed = run_experiment("experiments.long_video", "--causal", causal_export, "--student",
                           workdir, "--student", bidi, "--student", exported, "--seconds",
                           "1", "--prompts", "1", "--steps", "3", "--out", out_json)
  assert "| autoregressive, 2-step student |" in printed
  with open(out_json, encoding="utf-8") as f:
    rows = {r["variant"]: r for r in json.load(f)["rows"]}
  students = ["autoregressive, 2-step student",
              "autoregressive, 2-step student of the bidirectional teacher",
              "autoregressive, 2-step student, distribution-matched"]
  assert set(rows) == {"ground truth", "autoregressive", *students}
  assert all(rows[name]["wall_s"] > 0 for name in students)
  # (A stage after the student's own past: its row's name; its step,
  # test_a_causal_student_learns_after_its_own_past.)
  own_past = wd.load_config(workdir)
  own_past.distill.past = "student"
  assert student_variant(own_past) == "autoregressive, 2-step student, after its own past"
  extended = wd.load_config(workdir)
  extended.distill.update(method="dmd", dmd_rollout_blocks=40)
  assert student_variant(extended) == ("autoregressive, 2-step student, distribution-matched "
                                       "on 40-block rollouts")


@pytest.mark.parametrize("causal_frames,rollout", [(0, 0), (1, 0), (1, 9)])
def test_a_dmd_student_and_its_critic_learn_each_from_its_own_loss(reference_run, data_dir,
                                                                   devices, causal_frames,
                                                                   rollout):
  """`distill.method=dmd` of the bidirectional reference run (a bidirectional student, or
  with `distill.causal_frames` a block-causal one, CausVid's route; with
  `distill.dmd_rollout_blocks` its sample a window of a 9-block streamed rollout): the
  critic starts as the teacher (so with the teacher unguided, w = 1, the two scores agree
  and the DMD loss is 0; guided, w = 3, it is not); the DMD loss moves the student's
  transformer and not the critic, the critic's flow loss the critic and not the student;
  no data are read. A rollout shorter than the clip is refused in one line."""
  _, teacher, _ = reference_run
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  config, _, graphdef, _, _, teacher_graph, teacher_params, state = _student(
      teacher, data_dir, mesh, **{"distill.method": "dmd", "distill.steps": 2,
                                  "distill.causal_frames": causal_frames,
                                  "distill.dmd_rollout_blocks": rollout})
  t = configs.typed(config)
  assert t.model.critic and t.model.step_embedding and t.model.causal_frames == causal_frames
  params = state["params"]
  jax.tree.map(np.testing.assert_array_equal, params["critic"], teacher_params["dit"])
  critic = nnx.merge(graphdef, params).critic
  assert critic.cfg.causal_frames == 0 and not critic.cfg.step_embedding
  null_ids = jnp.array([1] + [0] * (t.data.text_length - 1), jnp.int32)
  batch = {k: jnp.asarray(v) for k, v in _batch(config, 0).items()}

  @jax.jit
  def losses(w, video):
    fixed = dataclasses.replace(t, distill=dataclasses.replace(t.distill, cfg_scale=w))

    def parts(p):
      metrics = distill_loss(p, graphdef, teacher_params["dit"], teacher_graph,
                             {**batch, "video": video}, jax.random.key(5), config=fixed,
                             autoencoder=IdentityAutoencoder(), null_ids=null_ids,
                             null_mask=null_ids != 0)[1]
      return metrics["loss_dmd"], metrics["loss_critic"]
    return parts(params), jax.jacrev(parts)(params)

  (dmd, critic_loss), _ = losses(1.0, batch["video"])
  assert float(dmd) < 1e-10 and float(critic_loss) > 1e-3
  (dmd, critic_loss), (dmd_grads, critic_grads) = losses(3.0, batch["video"])
  assert float(dmd) > 1e-9
  norm = lambda tree: float(optax.tree.norm(tree))
  assert norm(dmd_grads["dit"]) > 0 and norm(dmd_grads["critic"]) == 0
  assert norm(critic_grads["critic"]) > 0 and norm(critic_grads["dit"]) == 0
  (again, _), _ = losses(3.0, -batch["video"])
  assert float(again) == float(dmd)
  if rollout:
    short = dataclasses.replace(t, distill=dataclasses.replace(t.distill, dmd_rollout_blocks=1))
    with pytest.raises(ValueError, match="dmd_rollout_blocks=1: a rollout shorter than"):
      distill_loss(params, graphdef, teacher_params["dit"], teacher_graph, batch,
                   jax.random.key(5), config=short, autoencoder=IdentityAutoencoder(),
                   null_ids=null_ids, null_mask=null_ids != 0)


def test_students_sample_in_one_pass(data_dir):
  """guided_velocity of a student is one transformer call with its inputs: the guidance
  scale (CFG distillation) and the solver's step (a shortcut student), here one model
  with both."""
  rng = np.random.default_rng(2)
  text = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
  mask, null = jnp.ones((2, 5), bool), jnp.zeros((1, 5, 32))
  x, t = jnp.asarray(rng.standard_normal((2, 4, 16, 16, 3)), jnp.float32), jnp.array([0.5, 0.5])
  config = make_test_config(data_dir, **{"model.guidance_embedding": True,
                                         "model.step_embedding": True})
  model = nnx.merge(*random_model(config, 24))
  velocity = guided_velocity(model, text, mask, null, jnp.ones((1, 5), bool), None,
                             cfg_scale=3.0, image_scale=1.0, interval=(0.0, 1.0),
                             step_size=0.25)
  full = lambda w, d: model.dit(x, t, text, mask, guidance=jnp.full((2,), w),
                                step_size=jnp.full((2,), d))
  want = full(3.0, 0.25)
  np.testing.assert_allclose(velocity(x, t), want, rtol=1e-5, atol=1e-6)
  for other in (full(4.0, 0.25), full(3.0, 0.5)):      # both inputs matter
    assert float(jnp.abs(other - want).max()) > 1e-4


def test_student_config_refusals(reference_run, data_dir, tmp_path):
  _, teacher, _ = reference_run
  with pytest.raises(ValueError, match="no run or export there"):
    student_config(make_test_config(data_dir), str(tmp_path / "nothing"))
  adapters = make_test_config(data_dir)
  adapters.lora = configs.defaults("lora", rank=4)
  with pytest.raises(ValueError, match="lora.rank"):
    student_config(adapters, teacher)
  with pytest.raises(ValueError, match="data.grouping='pack'"):
    student_config(make_test_config(data_dir, native=True), teacher)
  config = student_config(make_test_config(data_dir, **{"distill.steps": 3}), teacher)
  with pytest.raises(ValueError, match="distill.steps=3 must be a power of two"):
    configs.validate(config)
  with pytest.raises(ValueError, match="distill.causal_frames=1: the causal block"):
    configs.validate(make_test_config(data_dir, **{"distill.causal_frames": 1}))
  # A critic belongs to a DMD student alone; DMD's noise levels lie inside (0, 1).
  with pytest.raises(ValueError, match="model.critic: the critic of a distill.method='dmd'"):
    configs.validate(make_test_config(data_dir, **{"model.critic": True}))
  with pytest.raises(ValueError, match=r"distill.dmd_times=\(0.0, 0.5\)"):
    configs.validate(make_test_config(data_dir, **{"distill.method": "dmd",
                                                   "distill.dmd_times": (0.0, 0.5)}))
  with pytest.raises(ValueError, match=r"distill.dmd_window_at_start=1.5 must be in \[0, 1\]"):
    configs.validate(make_test_config(data_dir, **{"distill.dmd_window_at_start": 1.5}))
  with pytest.raises(ValueError, match="distill.dmd_rollout_blocks=8: the streamed rollout"):
    configs.validate(make_test_config(data_dir, **{"distill.method": "dmd",
                                                   "distill.dmd_rollout_blocks": 8}))
  assert not configs.typed(student_config(make_test_config(data_dir), teacher)).model.critic
  shortcut = student_config(make_test_config(data_dir, **{"distill.shift": 3.0}), teacher)
  with pytest.raises(ValueError, match="a shortcut student's grid is uniform"):
    configs.validate(shortcut)
  # 0 (the default guidance, and a trajectory student's shift) read the teacher's sampling.
  own = configs.typed(wd.load_config(teacher)).sample
  shifted = configs.typed(student_config(make_test_config(data_dir, **{
      "distill.method": "trajectory", "distill.shift": 0.0}), teacher))
  assert (shifted.distill.shift, shifted.distill.cfg_scale) == (own.shift, own.cfg_scale)
  assert (shifted.sample.shift, shifted.sample.cfg_scale) == (own.shift, own.cfg_scale)


def test_a_scanned_rematerialised_student_and_teacher_distil_like_looped_ones(data_dir):
  """Trajectory distillation runs the student's own rollout and the teacher's steps inside
  lax loops; with the blocks under NNX's scan and rematerialisation (the large presets'
  layout) its loss and gradient are the looped models' at the same weights."""
  from helpers import stack_blocks  # pylint: disable=g-import-not-at-top
  configs_of = {}
  for scanned in (False, True):
    layout = {"model.depth": 2, "model.scan_layers": scanned,
              "model.remat": "full" if scanned else "none"}
    student = make_test_config(data_dir, **layout, **{
        "model.step_embedding": True, "distill.method": "trajectory", "distill.steps": 2,
        "distill.teacher_steps": 2, "distill.cfg_scale": 3.0})
    configs_of[scanned] = (student, make_test_config(data_dir, **layout))
  # One draw of the weights, in the loop's layout; the scanned models get them stacked.
  student_weights = random_model(configs_of[False][0], 24, seed=1)[1]
  teacher_weights = random_model(configs_of[False][1], 24, seed=2)[1]
  losses, grads = [], []
  for scanned in (False, True):
    config, teacher_config = configs_of[scanned]
    graphdef = abstract_model(config, 24)[0]
    teacher_graphdef = abstract_model(teacher_config, 24)[0]
    stacked = stack_blocks if scanned else (lambda tree: tree)
    params = {**student_weights, "dit": stacked(student_weights["dit"])}
    teacher_params = {**teacher_weights, "dit": stacked(teacher_weights["dit"])}
    teacher_graph = nnx.split(nnx.merge(teacher_graphdef, teacher_params).dit, nnx.Param)[0]
    null_ids = jnp.array([1] + [0] * (config.data.text_length - 1), jnp.int32)
    batch = {k: jnp.asarray(v) for k, v in _batch(config, 0).items()}

    @jax.jit
    def loss_and_grad(p, teacher_dit):
      return jax.value_and_grad(lambda q: distill_loss(
          q, graphdef, teacher_dit, teacher_graph, batch, jax.random.key(5),
          config=configs.typed(config), autoencoder=IdentityAutoencoder(), null_ids=null_ids,
          null_mask=null_ids != 0)[0])(p)

    loss, grad = loss_and_grad(params, teacher_params["dit"])
    losses.append(float(loss))
    grads.append(grad["dit"] if scanned else stack_blocks(grad["dit"]))
  assert losses[0] > 1e-6
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads[1], grads[0])
