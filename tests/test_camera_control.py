"""Explicit camera control: Plücker rays against their definition, the transformer's
zero-initialised camera input, the training loss, the pipeline and `sample --camera`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_model, run_cli, write_export
from sora_jax import configs
from sora_jax.data import camera
from sora_jax.data.pipeline import DecodeAndTokenize
from sora_jax.data.world import render_example
from sora_jax.provenance import manifest
from sora_jax.train.state import abstract_model, build_model


def _camera_config(data_dir, **overrides):
  import world_camera  # pylint: disable=g-import-not-at-top
  config = world_camera.get_config("test")
  config.world.data_dir = data_dir
  config.model.camera_control = True
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_plucker_rays_are_the_rays_through_the_pixel_centres():
  packed = camera.named_camera("zoom_in:0.1", 3, 6, 8)
  rays = np.asarray(camera.plucker_rays(packed, 6, 8))
  assert rays.shape == (3, 6, 8, 6)
  for f in range(3):
    k = packed[f, :9].reshape(3, 3).astype(np.float64)
    e = packed[f, 9:].reshape(3, 4).astype(np.float64)
    origin = -e[:, :3].T @ e[:, 3] / 6.0                      # in units of min(H, W)
    for y, x in ((0, 0), (5, 7), (2, 3)):
      d = e[:, :3].T @ np.linalg.inv(k) @ np.asarray([x + 0.5, y + 0.5, 1.0])
      d /= np.linalg.norm(d)
      np.testing.assert_allclose(rays[f, y, x], np.concatenate([np.cross(origin, d), d]),
                                 atol=1e-5)
  # A pan moves the origin (the moments change), a zoom narrows the directions.
  pan = np.asarray(camera.plucker_rays(camera.named_camera("pan_left:0.1", 2, 6, 8), 6, 8))
  assert np.abs(pan[1, ..., :3] - pan[0, ..., :3]).max() > 1e-3
  np.testing.assert_allclose(pan[1, ..., 3:], pan[0, ..., 3:], atol=1e-6)
  assert np.abs(rays[2, 0, 0, 3]) < np.abs(rays[0, 0, 0, 3])
  with pytest.raises(ValueError, match="MOTION"):
    camera.named_camera("dolly:0.1", 2, 6, 8)
  # A pixel model's input is the rays; a latent model's stacks each latent position's
  # block of them (2 frames x 2x2 pixels here; frame 0 repeated for the causal first).
  np.testing.assert_array_equal(camera.camera_input(packed, 6, 8), rays)
  five = camera.named_camera("pan_left:0.1", 5, 6, 8)
  pixel = np.asarray(camera.plucker_rays(five, 6, 8))
  folded = np.asarray(camera.camera_input(five, 6, 8, temporal=2, spatial=2))
  assert folded.shape == (3, 3, 4, camera.camera_channels(2, 2))
  for t, frames in ((0, [0, 0]), (1, [1, 2]), (2, [3, 4])):
    for y, x in ((0, 0), (2, 3), (1, 2)):
      want = pixel[frames][:, 2 * y:2 * y + 2, 2 * x:2 * x + 2]          # [2, 2, 2, 6]
      np.testing.assert_array_equal(folded[t, y, x], want.reshape(-1))
  with pytest.raises(ValueError, match="do not fold"):
    camera.camera_input(camera.named_camera("static", 4, 6, 8), 6, 8, temporal=2, spatial=2)


@pytest.mark.parametrize("spec", ["static", "pan_left:0.07", "pan_down:0.05", "zoom_in:0.1"])
def test_camera_positions_are_the_world_points_the_tokens_see(spec):
  """`embeddings.camera_positions` against float64 numpy: each token's pixels taken to the
  world plane (`camera.frame_to_world` of the camera's path), averaged over its patch, in
  patch units; a still camera gives the grid, zero rays (no camera) too."""
  from sora_jax.models import embeddings  # pylint: disable=g-import-not-at-top
  frames, height, width, patch = 4, 16, 24, (2, 4, 8)
  motion, _, speed = spec.partition(":")
  centre, zoom = camera.camera_path(motion, float(speed or 0), frames, height, width)
  rays = camera.plucker_rays(camera.named_camera(spec, frames, height, width), height, width)
  got = np.asarray(embeddings.camera_positions(jnp.stack([rays, jnp.zeros_like(rays)]), patch))
  grid = embeddings.grid_positions((2, 4, 3))
  assert got.shape == (2, len(grid), 3)
  world = np.stack([np.stack(camera.frame_to_world(centre[f].astype(np.float64),
                                                   float(zoom[f]), height, width), -1)
                    for f in range(frames)])                                 # [T, H, W, 2]
  expected = world.reshape(2, 2, 4, 4, 3, 8, 2).mean((1, 3, 5)).reshape(-1, 2)
  expected = expected / np.asarray([4.0, 8.0]) - 0.5
  np.testing.assert_allclose(got[0, :, 0], grid[:, 0])
  np.testing.assert_allclose(got[0, :, 1:], expected, atol=1e-4)
  np.testing.assert_allclose(got[1], grid)                   # no camera: the patch grid
  if motion == "static":
    np.testing.assert_allclose(got[0], grid, atol=1e-4)


def _sample_panning_left(export: str, out: str) -> None:
  """`sora-jax sample --camera pan_left:0.07` of an export: it writes `out`, whose signed
  generation record names the camera."""
  code, printed = run_cli("sample", "--workdir", export, "--prompt", "the camera pans left",
                          "--out", out, "--camera", "pan_left:0.07", "--steps", "2",
                          "--scale", "1")
  assert code == 0, printed[-2000:]
  assert manifest.verify(out).generation["camera"] == "pan_left:0.07"


def test_camera_rope_leaves_a_still_camera_alone_and_places_a_moving_one(data_dir, tokenizer,
                                                                         tmp_path):
  config = _camera_config(data_dir, **{"model.camera_rope": True})
  configs.validate(config)
  graphdef, params = random_model(config, tokenizer.vocab_size, seed=1)
  model = nnx.merge(graphdef, params)
  plain = nnx.merge(abstract_model(_camera_config(data_dir), tokenizer.vocab_size)[0], params)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 4, 16, 16, 3)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(1, 5, model.dit.cfg.text_width)), jnp.float32)
  mask, t = jnp.ones((1, 5), bool), jnp.asarray([0.5])
  run = nnx.jit(lambda m, camera: m(x, t, text, mask, camera=camera))
  still = camera.plucker_rays(camera.named_camera("static", 4, 16, 16), 16, 16)[None]
  pan = camera.plucker_rays(camera.named_camera("pan_left:0.1", 4, 16, 16), 16, 16)[None]
  np.testing.assert_allclose(run(model.dit, still), run(plain.dit, still), atol=1e-5)
  np.testing.assert_allclose(run(model.dit, None), run(plain.dit, None), atol=1e-5)
  assert np.abs(np.asarray(run(model.dit, pan) - run(plain.dit, pan))).max() > 1e-3
  # Through the command line: the key travels with the run's config into the sampler.
  export = write_export(str(tmp_path / "export"), config, tokenizer,
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  from sora_jax.train import workdir as wd  # pylint: disable=g-import-not-at-top
  assert wd.load_config(export).model.camera_rope
  _sample_panning_left(export, str(tmp_path / "pan.mp4"))
  bad = _camera_config(data_dir, **{"model.camera_rope": True, "model.camera_control": False})
  with pytest.raises(ValueError, match="model.camera_rope .* needs model.camera_control"):
    configs.validate(bad)


def test_the_camera_input_starts_at_zero_and_then_steers(data_dir, tokenizer):
  config = _camera_config(data_dir)
  dit = nnx.merge(*random_model(config, tokenizer.vocab_size, seed=1)).dit
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 4, 16, 16, 3)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(1, 5, dit.cfg.text_width)), jnp.float32)
  mask = jnp.ones((1, 5), bool)
  t = jnp.asarray([0.5])
  rays = camera.plucker_rays(camera.named_camera("pan_left:0.07", 4, 16, 16), 16, 16)[None]
  run = nnx.jit(lambda m, camera: m(x, t, text, mask, camera=camera))
  with_camera, without = run(dit, rays), run(dit, None)
  assert np.abs(np.asarray(with_camera - without)).max() > 1e-3     # random weights steer
  np.testing.assert_allclose(run(dit, jnp.zeros_like(rays)), without, atol=1e-6)
  fresh = build_model(config, tokenizer.vocab_size, nnx.Rngs(0)).dit
  kernel = nnx.state(fresh, nnx.Param)["camera_proj"]["kernel"]
  assert not np.asarray(kernel[...]).any()                           # zero-initialised


def test_training_sees_the_camera_and_drops_it_for_some_clips(data_dir, tokenizer):
  from sora_jax.models.autoencoder import IdentityAutoencoder  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import flow_loss  # pylint: disable=g-import-not-at-top
  config = _camera_config(data_dir, **{"flow.caption_dropout": 0.0})
  configs.validate(config)
  world = configs.world_config(config)
  examples = [render_example(world, 100 + i) for i in range(4)]
  decode = DecodeAndTokenize(tokenizer, config.data.text_length, camera=True)
  rows = [decode.map(e) for e in examples]
  np.testing.assert_array_equal(rows[0]["camera"], camera.pack_camera(
      examples[0]["intrinsics"], examples[0]["extrinsics"]))
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows]))
           for k in ("video", "text_ids", "text_mask", "camera")}
  # Random weights: a fresh model's zero gates would stop every gradient before the camera.
  graphdef, params = random_model(config, tokenizer.vocab_size, seed=2)
  null_ids, null_mask = tokenizer.encode([""], config.data.text_length)

  def loss(params):
    return flow_loss(params, graphdef, batch, jax.random.PRNGKey(0), config=config,
                     autoencoder=IdentityAutoencoder(), null_ids=null_ids[0],
                     null_mask=null_mask[0])[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  assert np.abs(np.asarray(grads["dit"]["camera_proj"]["kernel"])).max() > 0
  with pytest.raises(ValueError, match="record without a camera"):
    DecodeAndTokenize(tokenizer, 16, camera=True).map(render_example(
        configs.world_config(config).__class__(frames=4, height=16, width=16), 1))
  bad = _camera_config(data_dir)
  bad.world.camera = ()
  with pytest.raises(ValueError, match="model.camera_control needs a camera world"):
    configs.validate(bad)
  cached = _camera_config(data_dir, **{"data.latents_dir": "/tmp/latents"})
  with pytest.raises(ValueError, match="cached latents keep no camera path"):
    configs.validate(cached)


@pytest.fixture(scope="module")
def camera_export(data_dir, tokenizer, tmp_path_factory):
  """A random model with camera control, exported (what `sora-jax export` writes)."""
  config = _camera_config(data_dir)
  _, params = random_model(config, tokenizer.vocab_size, seed=3, scale=0.1)
  return write_export(str(tmp_path_factory.mktemp("camera")), config, tokenizer, params)


def test_sample_with_a_camera_path(camera_export, tmp_path):
  export = camera_export
  _sample_panning_left(export, str(tmp_path / "pan.mp4"))
  path = str(tmp_path / "path.json")
  intrinsics, extrinsics = camera.camera_matrices(*camera.camera_path("zoom_in", 0.05, 4,
                                                                      16, 16), 16, 16)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"intrinsics": intrinsics.tolist(), "extrinsics": extrinsics.tolist()}, f)
  code, printed = run_cli("sample", "--workdir", export, "--prompt", "a red circle", "--out",
                          str(tmp_path / "zoom.mp4"), "--camera-path", path, "--steps", "2")
  assert code == 0 and os.path.exists(tmp_path / "zoom.mp4"), printed[-2000:]
  code, printed = run_cli("sample", "--workdir", export, "--prompt", "a red circle", "--out",
                          str(tmp_path / "x.mp4"), "--camera", "pan_left:fast")
  assert code != 0 and "is not a number" in printed.strip().splitlines()[-1]
  code, printed = run_cli("sample", "--workdir", export, "--prompt", "a red circle", "--out",
                          str(tmp_path / "x.mp4"), "--camera-path", path, "--frames", "2")
  assert code != 0 and "expected intrinsics [2, 3, 3]" in printed.strip().splitlines()[-1]


def test_camera_bench_sets_text_beside_explicit_control(camera_export, tmp_path):
  from helpers import run_experiment  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "bench.json")
  printed = run_experiment("experiments.camera_bench", "--workdir", camera_export,
                           "--prompts", "4", "--steps", "2", "--explicit", "--out", out)
  assert "| model, text | all | 4 |" in printed
  assert "| model, text + camera path | all | 4 |" in printed
  written = json.load(open(out))
  truth = [r for r in written["rows"] if r["variant"] == "ground truth"]
  assert truth[0]["camera_ok"] == 1.0
  assert [v["variant"] for v in written["videos"]] == (["model, text"] * 4
                                                       + ["model, text + camera path"] * 4)
  assert all(r["path_error_px"] is None or r["path_error_px"] < 0.5 for r in truth)
