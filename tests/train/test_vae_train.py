"""VAE training end to end: losses, resume, latent statistics through the checkpoint, the
discriminator's start step, and the reconstruction metrics."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vae_world_tiny
import world_tiny
from helpers import run_cli
from sora_jax import configs
from sora_jax.data.pipeline import normalise_video
from sora_jax.data.world import SPLIT_SEEDS, render_example
from sora_jax.evaluation.reconstruction import psnr_ssim, summarise
from sora_jax.parallel.sharding import make_mesh
from sora_jax.train.vae_loop import EVAL_FILE, STATS_FILE, load_vae, start_vae_state, train_vae
from sora_jax.train.vae_step import (abstract_vae_state, create_vae_state, make_vae_train_step,
                                     noisy_reconstruction, vae_state_shardings)


def vae_config(data_dir, **overrides):
  config = vae_world_tiny.get_config("test")
  config.world.data_dir = data_dir
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
@pytest.mark.xdist_group("vae")
def test_train_vae_resumes_exactly_and_saves_latent_statistics(data_dir, tmp_path,
                                                               trained_test_vae):
  config = vae_config(data_dir, **{"train.log_every": 1})
  (whole, printed), split = trained_test_vae, str(tmp_path / "split")
  train_vae(config, split, progress=False, stop_at=2, evaluate=False)
  summary = train_vae(config, split, progress=False)
  assert _losses(whole) == _losses(split)
  assert summary["step"] == 4 and np.isfinite(summary["loss"])
  assert f"Trained the VAE to step 4 (last loss {summary['loss']:.4f})" in printed

  # Latent statistics: in the final checkpoint, in latent_stats.json, and recomputable.
  vae, _ = load_vae(whole)
  with open(os.path.join(whole, STATS_FILE)) as f:
    stats = json.load(f)
  np.testing.assert_allclose(vae.latent_mean[...], stats["latent_mean"], rtol=1e-6)
  np.testing.assert_allclose(vae.latent_std[...], stats["latent_std"], rtol=1e-6)
  assert not np.allclose(stats["latent_std"], 1.0)
  split_vae, _ = load_vae(split)
  np.testing.assert_array_equal(split_vae.latent_mean[...], vae.latent_mean[...])

  # Held-out evaluation and side-by-side videos.
  with open(os.path.join(whole, EVAL_FILE)) as f:
    report = json.load(f)
  assert report["examples"] == config.eval.num_examples
  assert len(report["psnr_per_frame"]) == config.world.frames
  assert summary["eval"]["psnr"] == pytest.approx(report["psnr"])
  assert (f"Held-out reconstructions ({config.eval.num_examples} clips): "
          f"PSNR {report['psnr']:.2f} dB") in printed
  recon_dir = os.path.join(whole, "reconstructions")
  assert sorted(os.listdir(recon_dir)) == ["contact_sheet.png", "reconstruction_00.mp4",
                                           "reconstruction_01.mp4"]


@pytest.mark.slow
@pytest.mark.xdist_group("vae")
def test_tiling_experiment_on_the_trained_vae(tmp_path, trained_test_vae, capsys):
  from experiments import vae_tiling  # pylint: disable=g-import-not-at-top
  workdir = trained_test_vae[0]
  out = str(tmp_path / "tiling.json")
  vae_tiling.main(["--vae", workdir, "--tiles", "16:8", "--out", out])
  with open(out) as f:
    rows = json.load(f)["rows"]
  assert [r["tile"] for r in rows] == [16]
  assert all(r["frame"] == [32, 32] and np.isfinite(r["decode_psnr_vs_whole"]) for r in rows)
  assert "tiled decode vs whole" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.xdist_group("vae")
def test_vae_shapes_scores_reconstructions_beside_the_clips(tmp_path, data_dir,
                                                             trained_test_vae, capsys):
  """`experiments.vae_shapes`: ShapesBench of the test VAE's reconstructions (4 clips in
  calls of 3: one padded) beside the held-out clips; a pixel config is refused."""
  from experiments import vae_shapes  # pylint: disable=g-import-not-at-top
  tiny = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "world_tiny.py:test")
  config = ["--config", tiny, f"--config.world.data_dir={data_dir}",
            "--config.world.frames=5", "--config.autoencoder.name=vae",
            f"--config.autoencoder.workdir={trained_test_vae[0]}"]
  out = str(tmp_path / "vae_shapes.json")
  vae_shapes.main([*config, "--clips", "4", "--batch", "3", "--out", out])
  with open(out) as f:
    truth, decoded = json.load(f)["rows"]
  assert truth["videos"].startswith("ground truth") and decoded["videos"] == "VAE reconstructions"
  assert truth["count"] == truth["colour"] == 1.0 and truth["psnr_db"] is None
  assert 0 <= decoded["count"] <= 1 and decoded["unprompted_detections"] >= 0
  assert 5 < decoded["psnr_db"] < 60
  assert "| VAE reconstructions |" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_info:
    vae_shapes.main(config[:3])           # the test config's autoencoder: pixels
  assert exit_info.value.code == 2 and "'identity'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.xdist_group("vae")
def test_exported_vae_reads_like_its_run(tmp_path, trained_test_vae, data_dir, capsys):
  """`sora-jax export --to orbax-params` of a VAE run: parameters and statistics alone,
  loaded like the run (`load_vae`, `autoencoder.workdir`); other formats are refused."""
  from sora_jax.cli import main as cli_main  # pylint: disable=g-import-not-at-top
  workdir, out = trained_test_vae[0], str(tmp_path / "vae_export")
  cli_main(["sora-jax", "export", "--workdir", workdir, "--to", "orbax-params", "--out", out])
  assert "Wrote" in capsys.readouterr().out
  with open(os.path.join(out, "export.json")) as f:
    assert json.load(f)["step"] == 4
  for name in (STATS_FILE, EVAL_FILE, "config.json"):
    assert os.path.isfile(os.path.join(out, name))
  size = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d)
                       for f in fs)
  run_checkpoint = os.path.join(workdir, "checkpoints", "4")
  assert size(os.path.join(out, "checkpoints")) < 0.6 * size(run_checkpoint)  # no optimiser
  (vae, _), (exported, _) = load_vae(workdir), load_vae(out)
  video = np.random.default_rng(0).uniform(-1, 1, (1, 5, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(exported.decode(exported.encode(video)[0]),
                                vae.decode(vae.encode(video)[0]))
  np.testing.assert_array_equal(exported.latent_std[...], vae.latent_std[...])
  # What the demo does first with a latent config (`run_demo` then trains on it, as any
  # latent run; tests/train/test_latent_training.py): the training clips encoded once into
  # <workdir>/latents by the export, named in the config it trains with. (Training and
  # sampling the demo here too cost 10 s of the suite's budget.)
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  from sora_jax.data.latents import load_latent_source  # pylint: disable=g-import-not-at-top
  from sora_jax.demo import with_encoded_latents  # pylint: disable=g-import-not-at-top
  from sora_jax.train.sources import latents_description  # pylint: disable=g-import-not-at-top
  demo = str(tmp_path / "demo")
  pixels = make_test_config(data_dir, **{"world.frames": 5})
  assert with_encoded_latents(pixels, demo) is pixels and not os.path.exists(demo)
  latent = make_test_config(data_dir, **{"world.frames": 5, "autoencoder.name": "vae",
                                         "autoencoder.workdir": out})
  encoded = with_encoded_latents(latent, demo)
  assert f"Latents of the training clips in {demo}/latents" in capsys.readouterr().out
  assert encoded.data.latents_dir == os.path.join(demo, "latents") and not latent.data.latents_dir
  source = load_latent_source(encoded.data.latents_dir, latents_description(encoded), "train")
  assert len(source) == latent.world.num_train and source[0]["latent"].shape == (2, 2, 2, 4)
  for argv, message in (([ "--to", "safetensors", "--out", str(tmp_path / "st")],
                         "is a VAE run: it exports with --to=orbax-params"),
                        (["--to", "orbax-params", "--out", out], "exists")):
    with pytest.raises(SystemExit, match=message):
      cli_main(["sora-jax", "export", "--workdir", workdir, *argv])


@pytest.mark.slow
@pytest.mark.xdist_group("vae")
def test_attribute_share_of_pixels_and_latents(tmp_path, data_dir, trained_test_vae):
  """`experiments.attribute_share`: colour, shape and motion shares sum to one per space;
  a clip's variants differ only in colour and shape."""
  from experiments import attribute_share  # pylint: disable=g-import-not-at-top
  tiny = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "world_tiny.py:test")
  out = str(tmp_path / "share.json")
  attribute_share.main(["--config", tiny, "--config.world.frames=5", "--vae",
                        trained_test_vae[0], "--clips", "3", "--out", out])
  with open(out) as f:
    pixels, latents = json.load(f)["rows"]
  assert pixels["shape"] == [5, 16, 16, 3] and latents["shape"] == [2, 2, 2, 4]
  for row in (pixels, latents):
    shares = row["colour_share"] + row["shape_share"] + row["motion_share"]
    assert shares == pytest.approx(1.0) and 0 < row["shape_share"] < 1
    assert 0 <= row["shape_share_at_noise"] <= row["shape_share"]
  world = configs.world_config(vae_world_tiny.get_config("test"))
  videos = attribute_share.variant_clips(world, 2, seed=0)
  chex.assert_shape(videos, (2, len(world.colours), len(world.shapes), 5, 16, 16, 3))
  objects = (videos != np.asarray(world.background, np.uint8)).any(-1)
  np.testing.assert_array_equal(np.broadcast_to(objects[:, :1], objects.shape), objects)
  assert not np.array_equal(objects[:, 0, 0], objects[:, 0, 1])
  # Pure data: the study's shares of hand-made values.
  values = np.zeros((2, 2, 2, 1))
  values[:, 1] += 1.0                           # colour 1 adds 1: only colour varies
  assert attribute_share.shares(values)["colour_share"] == pytest.approx(1.0)


@pytest.mark.slow
def test_vae_step_on_a_sharded_mesh_matches_one_device(data_dir, devices):
  """With the discriminator on (from step 1): step 0 on a data x fsdp mesh equals step 0 on
  one device and leaves the discriminator alone; on step 1 the discriminator learns."""
  config = vae_config(data_dir, **{"vae_loss.disc_weight": 0.5, "vae_loss.disc_start": 1,
                                   "vae_loss.disc_channels": 4, "vae_loss.disc_layers": 2})
  rng = np.random.default_rng(0)
  batch = {"video": rng.uniform(-1, 1, (8, 5, 16, 16, 3)).astype(np.float32)}
  results, initial = [], None
  for layout in ({"data": 2, "fsdp": 2}, {"data": 1}):
    config.mesh.update(data=layout.get("data", 1), fsdp=layout.get("fsdp", 1), tensor=1)
    n = int(np.prod(list(layout.values())))
    mesh = make_mesh(layout, devices=devices[:n])
    if initial is None:
      state, shardings = create_vae_state(config, mesh)
      initial = jax.device_get(state)
    else:   # the same initial state, moved (one initialisation compiled, not two)
      shardings = vae_state_shardings(config, mesh)
      state = jax.device_put(initial, shardings)
    step = make_vae_train_step(config, shardings, mesh)
    before = jax.device_get(state["disc_params"])
    state, metrics = step(state, jax.device_put(batch))     # step 0 < disc_start
    results.append((jax.device_get(state["params"]), float(metrics["loss"])))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["disc_params"]), before)
    assert np.isfinite(metrics["disc_loss"]) and np.isfinite(metrics["gen_adv_loss"])
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), results[0][0],
               results[1][0])
  state, metrics = step(state, batch)                       # step 1: the discriminator learns
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(state["disc_params"]), before)
  # Every kernel moves (the head's bias may not: its hinge gradients can cancel exactly).
  assert changed["head"]["kernel"] and all(c["kernel"] for c in changed["convs"].values())


def test_the_vae_steps_optimiser_numbers_are_inputs_of_its_program(data_dir, devices):
  """Two VAE runs (with a discriminator) differing in both optimisers' learning rates,
  warmups, betas, weight decays and clips, and in the number of steps, lower to one
  program."""
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  batch = {"video": jax.ShapeDtypeStruct((8, 5, 16, 16, 3), jnp.float32)}
  texts = []
  for lr, disc_lr, steps in ((4e-3, 2e-4, 4), (1e-3, 5e-4, 9)):
    config = vae_config(data_dir, **{"vae_loss.disc_weight": 0.5, "vae_loss.disc_channels": 4,
                                     "vae_loss.disc_layers": 2, "train.steps": steps})
    config.optim.update(lr=lr, warmup_steps=steps // 2, b1=lr * 100, weight_decay=lr,
                        grad_clip=lr * 1000)
    config.disc_optim.update(lr=disc_lr, warmup_steps=1, b2=1.0 - disc_lr, weight_decay=disc_lr)
    shardings = vae_state_shardings(config, mesh)
    step = make_vae_train_step(config, shardings, mesh)
    texts.append(step.lower(abstract_vae_state(config, shardings), batch).as_text())
  assert texts[0] == texts[1]


def test_bad_vae_config_values_fail_before_compiling(data_dir):
  with pytest.raises(ValueError, match="world size"):
    configs.validate_vae(vae_config(data_dir, **{"world.frames": 6}))
  with pytest.raises(ValueError, match="vae_loss.kl_weight"):
    configs.validate_vae(vae_config(data_dir, **{"vae_loss.kl_weight": -1.0}))
  with pytest.raises(ValueError, match="data.batch_size"):
    configs.validate_vae(vae_config(data_dir, **{"data.batch_size": 3}), num_devices=8)
  with pytest.raises(ValueError, match="train.microbatches=2: the VAE's step"):
    configs.validate_vae(vae_config(data_dir, **{"train.microbatches": 2}))


def test_psnr_and_ssim_per_frame():
  rng = np.random.default_rng(0)
  ref = rng.uniform(-1, 1, (3, 4, 16, 16, 3)).astype(np.float32)
  noisy = ref + rng.normal(0, 0.05, ref.shape).astype(np.float32)
  psnr, ssim = psnr_ssim(ref, noisy)
  chex.assert_shape([psnr, ssim], (3, 4))
  a, b = (ref + 1) / 2, np.clip((noisy + 1) / 2, 0, 1)
  expected = 10 * np.log10(1 / np.square(a.astype(np.float64) - b).mean(axis=(2, 3, 4)))
  np.testing.assert_allclose(psnr, expected, rtol=1e-4)
  _, same = psnr_ssim(ref, ref)
  np.testing.assert_allclose(same, 1.0, atol=1e-5)
  assert np.all(np.asarray(ssim) < 1.0)
  summary = summarise(np.asarray(psnr), np.asarray(ssim))
  assert summary["psnr_first_frame"] == pytest.approx(expected[:, 0].mean(), rel=1e-4)
  assert len(summary["ssim_per_frame"]) == 4


@pytest.mark.xdist_group("vae")
def test_a_fine_tune_starts_from_its_vae_and_refuses_another_architecture(
    data_dir, trained_test_vae, devices, tmp_path):
  source, _ = trained_test_vae
  # With a discriminator (which the source had not): it alone is drawn, beside the
  # source's weights and a new optimiser.
  config = vae_config(data_dir, **{"train.init_from": source, "vae_loss.latent_noise": 0.5,
                                   "vae_loss.disc_weight": 0.5, "vae_loss.disc_channels": 4,
                                   "vae_loss.disc_layers": 2})
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  shardings = vae_state_shardings(config, mesh)
  state = start_vae_state(config, mesh, shardings)
  vae, _ = load_vae(source)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]),
               nnx.to_pure_dict(nnx.state(vae, nnx.Param)))
  np.testing.assert_array_equal(state["stats"]["latent_std"], vae.latent_std[...])
  assert int(state["step"]) == 0 and not any(
      np.any(np.asarray(m)) for m in jax.tree.leaves(state["opt_state"]))
  assert all(np.std(np.asarray(k)) > 0 for k in jax.tree.leaves(state["disc_params"])
             if np.ndim(k) == 5)      # drawn convolution kernels
  assert jax.tree.structure(state) == jax.tree.structure(shardings)   # every part, laid out
  assert all(x.sharding.is_equivalent_to(s, x.ndim)
             for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(state)))
  # The fine-tune with noisy latents through the command line (its noise: the test below).
  vae_test = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "vae_world_tiny.py:test")
  code, out = run_cli("train-vae", "--config", vae_test,
                      "--workdir", str(tmp_path / "tuned"), f"--config.world.data_dir={data_dir}",
                      f"--config.train.init_from={source}", "--config.vae_loss.latent_noise=0.5",
                      "--config.train.steps=1")
  assert code == 0 and "Trained the VAE to step 1" in out, out[-2000:]
  other = vae_config(data_dir, **{"train.init_from": source, "vae.latent_channels": 8})
  with pytest.raises(ValueError, match="differ from this config's vae"):
    start_vae_state(other, mesh, None)      # refused before any state is built


def test_noisy_reconstruction_adds_noise_scaled_by_each_channels_spread():
  """Decoded latents = posterior sample + u * latent_noise * spread[c] * N(0, 1), u ~ U(0, 1)
  per clip: with a posterior of no variance, (z - mean) / spread[c] has the std
  latent_noise / sqrt(3) in every channel, and each clip's own scale."""
  spread = np.array([0.5, 2.0, 10.0], np.float32)
  mean = np.random.default_rng(0).normal(size=(4096, 1, 1, 2, 3)).astype(np.float32) * spread

  class Encoder:   # the VAE's interface, decoding to the latent itself
    encode = staticmethod(lambda video: (jnp.asarray(mean), jnp.full(mean.shape, -30.0)))
    decode = staticmethod(lambda z: z)

  z, got_mean, _ = noisy_reconstruction(Encoder, jnp.zeros((4096, 1, 1, 1, 3)),
                                        jax.random.PRNGKey(0), 0.6)
  np.testing.assert_array_equal(got_mean, mean)
  ratio = (np.asarray(z) - mean) / np.std(mean, axis=(0, 1, 2, 3))
  np.testing.assert_allclose(ratio.std(axis=(0, 1, 2, 3)), 0.6 / np.sqrt(3), rtol=0.05)
  per_clip = ratio.reshape(4096, -1).std(axis=1)
  assert per_clip.min() < 0.1 and per_clip.max() > 0.45


def test_the_shipped_vae_reconstructs_held_out_clips_as_recorded():
  """The VAE shipped for the latent configs (`checkpoints/vae_world_tiny`, its README) loads
  with this code and reconstructs the world's first held-out clips (rendered as the test
  split renders them) at the PSNR recorded when it was shipped; the latent config
  validates on it as it stands (no override)."""
  vae, config = load_vae(world_tiny.SHIPPED_VAE)
  with open(os.path.join(world_tiny.SHIPPED_VAE, "reference.json"), encoding="utf-8") as f:
    record = json.load(f)
  world = configs.world_config(config)
  videos = np.stack([normalise_video(render_example(world, SPLIT_SEEDS["test"] + i)["video"])
                     for i in range(record["clips"])])
  chex.assert_shape(videos, (record["clips"], 9, 32, 32, 3))
  reconstruct = nnx.jit(lambda vae, video: vae.decode(vae.encode(video)[0]))
  psnr, _ = psnr_ssim(jnp.asarray(videos), reconstruct(vae, jnp.asarray(videos)))
  assert float(psnr.mean()) == pytest.approx(record["psnr_db"], abs=0.05)
  configs.validate(world_tiny.get_config("latent"))
