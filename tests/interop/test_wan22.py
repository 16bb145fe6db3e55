"""Wan 2.2. A14B: two experts switched by the noise level. Tiny random T2V and I2V
directories (a high-noise `transformer`, a low-noise `transformer_2`, `boundary_ratio`)
imported with `sora-jax import-wan` sample what WanPipeline / WanImageToVideoPipeline
sample, each expert at its own guidance; the T2V import exports back. TI2V-5B: the
residual VAE, a flow time per token and the replaced first frame, from text alone and
from text and an image, against the same pipelines."""

import json
import os

import numpy as np
import pytest

from sora_jax import cli
from sora_jax.interop import tensors
from sora_jax.sample import Sampler, initial_noise

from helpers import (PIPELINE_LAYERS, add_peft_adapter, save_diffusers_lora, save_tiny_wan,
                     tiny_wan_transformer)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs",
                      "wan2_1_t2v.py")
PROMPT = "a red circle moves left"
# 3 steps at shift 3 run at flow times 1, 0.86 and 0.67: a boundary of 0.9 gives the
# first step to the high-noise expert and the others to the low-noise one.
BOUNDARY = 0.9


def _inputs(size: int, channels: int, image_to_video: bool) -> tuple[dict, dict]:
  """`(ours, theirs)`: `Sampler.generate`'s given frames and the pipeline's arguments for
  9 frames of `size`x`size` whose latents are `[3, 4, 4, channels]` (the directory's VAE),
  from the same starting noise, 3 steps at guidance 2; with `image_to_video`, the same
  random first frame on both sides."""
  noise = np.asarray(initial_noise(np.array([7], np.int32), (3, 4, 4, channels)))
  theirs = dict(num_frames=9, height=size, width=size, num_inference_steps=3,
                guidance_scale=2.0, max_sequence_length=16, output_type="np",
                latents=torch.from_numpy(np.moveaxis(noise, -1, 1).copy()))
  if not image_to_video:
    return {}, theirs
  image = np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8)
  given = np.zeros((1, 9, size, size, 3), np.uint8)
  given[0, 0] = image
  theirs["image"] = PIL.fromarray(image)
  return dict(given_video=given, given_frames=np.arange(9)[None] == 0), theirs


@pytest.mark.parametrize("image_to_video", [False, True])
def test_expert_switch_matches_the_pipeline(tmp_path, image_to_video):
  torch.manual_seed(0)
  channels = dict(in_channels=12, out_channels=4) if image_to_video else {}
  experts = {name: tiny_wan_transformer(num_layers=PIPELINE_LAYERS, **channels)
             for name in ("transformer", "transformer_2")}
  pipeline = "WanImageToVideoPipeline" if image_to_video else "WanPipeline"
  model_dir = save_tiny_wan(tmp_path, pipeline, boundary_ratio=BOUNDARY, **experts)
  out = str(tmp_path / "imported")
  cli.main(["sora-jax", "import-wan", "--model-dir", model_dir, "--out", out,
            "--config", CONFIG + ":tiny"])
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model"]["boundary"] == BOUNDARY
  sampler = Sampler.from_workdir(out)
  extra, common = _inputs(32, 4, image_to_video)
  common["guidance_scale_2"] = 3.0
  ours = sampler.generate([PROMPT], [7], frames=9, height=32, width=32, steps=3, cfg_scale=2.0,
                          cfg_scale_low=3.0, solver="euler", shift=3.0, batch_size=1, **extra)
  pipe = getattr(diffusers, pipeline).from_pretrained(model_dir)
  with torch.no_grad():
    theirs = pipe(prompt=PROMPT, negative_prompt="", **common).frames
  assert ours.shape == theirs.shape == (1, 9, 32, 32, 3)
  assert np.abs(ours / 255.0 - theirs).max() <= 1 / 255 + 1e-4
  # Both experts matter: with the low-noise expert at the high one's guidance it differs.
  other = sampler.generate([PROMPT], [7], frames=9, height=32, width=32, steps=3,
                           cfg_scale=2.0, cfg_scale_low=2.0, solver="euler", shift=3.0,
                           batch_size=1, **extra)
  assert np.abs(other.astype(int) - ours).max() > 2
  if image_to_video:
    return
  exported = str(tmp_path / "exported")
  cli.main(["sora-jax", "export", "--workdir", out, "--to", "diffusers", "--out", exported])
  with open(os.path.join(exported, "model_index.json"), encoding="utf-8") as f:
    assert json.load(f)["boundary_ratio"] == BOUNDARY
  again = diffusers.WanPipeline.from_pretrained(exported)
  for mine, theirs in zip(again.transformer_2.state_dict().values(),
                          pipe.transformer_2.state_dict().values()):
    np.testing.assert_array_equal(mine.numpy(), theirs.numpy())

  # A LoRA pair, one file per expert: --lora into the high-noise expert, --lora-low into
  # the low-noise one, as diffusers fuses them (load_into_transformer_2 for the second).
  files = {}
  for name, component, seed in (("high", "transformer", 1), ("low", "transformer_2", 2)):
    source = getattr(pipe, component)
    add_peft_adapter(source, seed=seed, name=name)
    files[name] = save_diffusers_lora(source, tmp_path / name, name=name)
    source.delete_adapters(name)
  merged = str(tmp_path / "merged")
  cli.main(["sora-jax", "export", "--workdir", out, "--to", "diffusers", "--out", merged,
            "--lora", files["high"], "--lora-low", files["low"]])
  pipe.load_lora_weights(files["high"], adapter_name="high")
  pipe.load_lora_weights(files["low"], adapter_name="low", load_into_transformer_2=True)
  pipe.fuse_lora(components=["transformer", "transformer_2"], lora_scale=1.0)
  pipe.unload_lora_weights()
  for component in ("transformer", "transformer_2"):
    fused = getattr(pipe, component).state_dict()
    written = tensors.SafetensorsCheckpoint(os.path.join(merged, component))
    for name in written.names():
      np.testing.assert_allclose(written.read(name), fused[name].numpy(), rtol=1e-5, atol=1e-6,
                                 err_msg=f"{component}: {name}")


def test_per_token_times_match_diffusers(tmp_path):
  """Wan 2.2 TI2V's per-token timesteps (`timestep [B, N]`: the given first latent frame at
  t = 0): the modulation per token, against `WanTransformer3DModel`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sora_jax.interop.load import load_wan_transformer  # pylint: disable=g-import-not-at-top
  from helpers import make_torch_model, relative_error  # pylint: disable=g-import-not-at-top
  model, path = make_torch_model(tmp_path)
  ours = load_wan_transformer(path)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
  text = rng.standard_normal((2, 7, 20)).astype(np.float32)
  tokens = 3 * 2 * 2                                   # patch 1x2x2
  times = np.full((2, tokens), 700.0, np.float32)
  times[:, :4] = 0.0                                   # the first latent frame's tokens
  times[1] = rng.uniform(0, 1000, tokens)
  with torch.no_grad():
    expected = model(torch.from_numpy(np.moveaxis(x, -1, 1).copy()), torch.from_numpy(times),
                     torch.from_numpy(text), return_dict=False)[0].numpy()
  got = ours(jnp.asarray(x), jnp.asarray(times / 1000.0), jnp.asarray(text),
             jnp.ones((2, 7), bool))
  assert relative_error(got, np.moveaxis(expected, 1, -1)) < 1e-4
  # The same time on every token is the per-example call.
  same = ours(jnp.asarray(x), jnp.full((2, tokens), 0.7), jnp.asarray(text), jnp.ones((2, 7), bool))
  plain = ours(jnp.asarray(x), jnp.full((2,), 0.7), jnp.asarray(text), jnp.ones((2, 7), bool))
  np.testing.assert_allclose(same, plain, rtol=1e-5, atol=1e-5)


# Wan 2.2 TI2V-5B's layout (residual VAE, 2x2 pixel patches, 4x16x16, a wider decoder),
# narrow: a 64x64 video of 9 frames diffuses as 3 x 4 x 4 latents of 8 channels.
TI2V_VAE = dict(base_dim=4, decoder_base_dim=6, z_dim=8, dim_mult=[1, 2, 2, 2],
                num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
                latents_mean=[0.1, -0.2, 0.3, 0.0, 0.2, -0.1, 0.0, 0.1],
                latents_std=[1.5, 0.5, 2.0, 1.0, 0.8, 1.2, 1.0, 0.7])


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
  """A tiny TI2V directory (`expand_timesteps`) and its import."""
  root = tmp_path_factory.mktemp("ti2v")
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKLWan(**TI2V_VAE).eval()
  model_dir = save_tiny_wan(root, vae=vae, expand_timesteps=True,
                            transformer=tiny_wan_transformer(num_layers=PIPELINE_LAYERS,
                                                             in_channels=8, out_channels=8))
  out = str(root / "imported")
  cli.main(["sora-jax", "import-wan", "--model-dir", model_dir, "--out", out,
            "--config", CONFIG + ":tiny"])
  return model_dir, out


@pytest.mark.parametrize("image_to_video", [False, True])
def test_ti2v_matches_the_pipeline(ti2v, image_to_video):
  model_dir, out = ti2v
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["conditioning"]["scheme"] == "replace"
  sampler = Sampler.from_workdir(out)
  extra, common = _inputs(64, 8, image_to_video)
  ours = sampler.generate([PROMPT], [7], frames=9, height=64, width=64, steps=3, cfg_scale=2.0,
                          solver="euler", shift=3.0, batch_size=1, **extra)
  pipeline = diffusers.WanImageToVideoPipeline if image_to_video else diffusers.WanPipeline
  pipe = pipeline.from_pretrained(model_dir)
  assert pipe.config.expand_timesteps
  with torch.no_grad():
    theirs = pipe(prompt=PROMPT, negative_prompt="", **common).frames
  assert ours.shape == theirs.shape == (1, 9, 64, 64, 3)
  assert np.abs(ours / 255.0 - theirs).max() <= 1 / 255 + 1e-4
  assert ours.std() > 2
  if image_to_video:
    return
  with pytest.raises(ValueError, match="model with two experts"):   # one transformer here
    Sampler.from_workdir(out, loras_low=[("low.safetensors", 1.0)])
  exported = str(os.path.dirname(out) + "/exported")
  cli.main(["sora-jax", "export", "--workdir", out, "--to", "diffusers", "--out", exported])
  again = diffusers.WanPipeline.from_pretrained(exported)
  assert again.config.expand_timesteps and again.vae.config.is_residual
  for mine, theirs in zip(again.vae.state_dict().values(), pipe.vae.state_dict().values()):
    np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
