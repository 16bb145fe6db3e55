"""Wan 2.1 image-to-video: the transformer's image branch and conditioning channels, and
the CLIP vision encoder, against tiny random diffusers / transformers models; a tiny I2V
directory imported with `sora-jax import-wan` samples what WanImageToVideoPipeline does."""

import os

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import cli
from sora_jax.interop import tensors, wan
from sora_jax.interop.load import load_clip_vision, load_wan_transformer, module_params
from sora_jax.models.vision import preprocess
from sora_jax.sample import Sampler, initial_noise

from helpers import (PIPELINE_LAYERS, compiled, make_torch_model, relative_error, save_tiny_wan,
                     tiny_wan_transformer)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs",
                      "wan2_1_t2v.py")
# Wan's attention takes the last 512 context tokens as text, the rest as image.
TEXT_TOKENS = 512
PROMPT = "a red circle moves left"
IMAGE = dict(in_channels=12, out_channels=4, image_dim=16, added_kv_proj_dim=24)


def _i2v_inputs(image_tokens, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
  cond = rng.standard_normal((2, 3, 4, 4, 8)).astype(np.float32)
  text = rng.standard_normal((2, TEXT_TOKENS, 20)).astype(np.float32)
  image = rng.standard_normal((2, image_tokens, 16)).astype(np.float32)
  return x, cond, text, image


def _torch_i2v(model, x, cond, t, text, image, first_last=False):
  """diffusers' call; first-last-frame models take each image's states as a batch row."""
  inputs = np.moveaxis(np.concatenate([x, cond], -1), -1, 1).copy()
  if first_last:
    image = image.reshape(2 * image.shape[0], image.shape[1] // 2, image.shape[2])
  with torch.no_grad():
    out = model(torch.from_numpy(inputs), torch.from_numpy(t), torch.from_numpy(text),
                encoder_hidden_states_image=torch.from_numpy(image), return_dict=False)[0]
  return np.moveaxis(out.numpy(), 1, -1)


@pytest.mark.parametrize("first_last", [False, True])
def test_image_branch_matches_diffusers(tmp_path, first_last):
  """I2V (257-style image tokens) and FLF2V (a position table over both images' tokens)."""
  tokens = 10 if first_last else 5
  extra = dict(pos_embed_seq_len=tokens) if first_last else {}
  model, path = make_torch_model(tmp_path, **IMAGE, **extra)
  ours = load_wan_transformer(path)
  assert (ours.cfg.in_channels, ours.cfg.cond_channels, ours.cfg.image_width) == (4, 8, 16)
  assert ours.cfg.image_positions == (tokens if first_last else 0)
  x, cond, text, image = _i2v_inputs(tokens)
  mask = np.ones((2, TEXT_TOKENS), bool)
  call = compiled()
  for timestep in (0.0, 612.0):
    t = np.full((2,), timestep, np.float32)
    expected = _torch_i2v(model, x, cond, t, text, image, first_last)
    got = call(ours, jnp.asarray(x), jnp.asarray(t / 1000.0), jnp.asarray(text), jnp.asarray(mask),
               conditioning=jnp.asarray(cond), image=jnp.asarray(image))
    chex.assert_shape(got, x.shape)
    assert relative_error(got, expected) < 1e-4, timestep
  # The image matters, and the export writes back what diffusers loaded.
  other = call(ours, jnp.asarray(x), jnp.asarray(t / 1000.0), jnp.asarray(text), jnp.asarray(mask),
               conditioning=jnp.asarray(cond), image=jnp.asarray(image[::-1].copy()))
  assert relative_error(other, expected) > 1e-3
  exported = tensors.to_their_tensors(module_params(ours), wan.transformer_mapping(ours.cfg))
  for name, value in model.state_dict().items():
    np.testing.assert_allclose(exported[name], value.numpy(), rtol=0, atol=0, err_msg=name)
  assert wan.diffusers_config_from_dit(ours.cfg)["in_channels"] == 12


def test_image_branch_needs_its_image(tmp_path):
  _, path = make_torch_model(tmp_path, **IMAGE)
  ours = load_wan_transformer(path)
  x, cond, text, _ = _i2v_inputs(5)
  with pytest.raises(ValueError, match="image branch"):
    ours(jnp.asarray(x), jnp.full((2,), 0.5), jnp.asarray(text),
         jnp.ones((2, TEXT_TOKENS), bool), conditioning=jnp.asarray(cond))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A tiny random CLIP vision model (ViT-H's layout: gelu, penultimate states) and its
  image processor, saved by transformers."""
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
      image_size=32, patch_size=8, hidden_act="gelu")
  model = transformers.CLIPVisionModel(config).eval()
  root = tmp_path_factory.mktemp("clip")
  model.save_pretrained(str(root / "image_encoder"))
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                              crop_size={"height": 32, "width": 32})
  processor.save_pretrained(str(root / "image_processor"))
  return model, processor, root


def test_clip_penultimate_states_match_transformers(clip_dir):
  model, _, root = clip_dir
  ours = load_clip_vision(str(root / "image_encoder"), processor_dir=str(root / "image_processor"))
  assert ours.cfg.depth == 2
  pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    expected = model(pixel_values=torch.from_numpy(pixels),
                     output_hidden_states=True).hidden_states[-2].numpy()
  got = ours(jnp.asarray(np.moveaxis(pixels, 1, -1)))
  chex.assert_shape(got, (2, 17, 32))
  assert relative_error(got, expected) < 1e-4


def test_clip_preprocessing_matches_the_image_processor(clip_dir):
  """An image of the crop size passes through the resize unchanged on both sides (exact);
  a larger one is resized by PIL's bicubic filter there and jax's here (close)."""
  _, processor, root = clip_dir
  ours = load_clip_vision(str(root / "image_encoder"), processor_dir=str(root / "image_processor"))
  rng = np.random.default_rng(0)
  for shape, tolerance in (((32, 32, 3), 1e-5), ((48, 40, 3), 0.01)):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    expected = processor(images=[image], return_tensors="np")["pixel_values"]
    got = preprocess(jnp.asarray(image[None] / 255.0, jnp.float32), ours.cfg)
    chex.assert_shape(got, (1, 32, 32, 3))
    assert np.abs(np.asarray(got) - np.moveaxis(expected, 1, -1)).mean() < tolerance, shape


@pytest.mark.parametrize("first_last", [False, True])
def test_import_and_sample_match_the_i2v_pipeline(clip_dir, tmp_path, capsys, first_last):
  """Image-to-video (the first frame given) and first-last-frame (both ends given): the
  image encoder, the mask and latent conditioning channels and the image branch,
  through `import-wan` and `Sampler.generate`, against WanImageToVideoPipeline; then
  `sora-jax sample --image --last-image` writes a signed video."""
  clip_model, processor, _ = clip_dir
  torch.manual_seed(0)
  extra = dict(pos_embed_seq_len=2 * 17) if first_last else {}
  transformer = tiny_wan_transformer(num_layers=PIPELINE_LAYERS, in_channels=12, out_channels=4,
                                     image_dim=32, added_kv_proj_dim=24, **extra)
  model_dir = save_tiny_wan(tmp_path, "WanImageToVideoPipeline", transformer=transformer,
                            image_encoder=clip_model, image_processor=processor)
  out = str(tmp_path / "imported")
  cli.main(["sora-jax", "import-wan", "--model-dir", model_dir, "--out", out,
            "--config", CONFIG + ":tiny", "--config.data.text_length=512"])
  rng = np.random.default_rng(3)
  first, last = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  given = np.zeros((1, 9, 32, 32, 3), np.uint8)
  given_frames = np.zeros((1, 9), bool)
  given[0, 0], given_frames[0, 0] = first, True
  if first_last:
    given[0, -1], given_frames[0, -1] = last, True
  sampler = Sampler.from_workdir(out)
  with pytest.raises(ValueError, match="generates from an image"):
    sampler.generate([PROMPT], [7], steps=1)
  ours = sampler.generate([PROMPT], [7], given_video=given, given_frames=given_frames,
                          steps=3, cfg_scale=2.0, solver="euler", shift=3.0, batch_size=1)

  pipe = diffusers.WanImageToVideoPipeline.from_pretrained(model_dir)
  noise = np.asarray(initial_noise(np.array([7], np.int32), (3, 4, 4, 4)))
  PIL = pytest.importorskip("PIL.Image")
  with torch.no_grad():
    theirs = pipe(image=PIL.fromarray(first), prompt=PROMPT, negative_prompt="", num_frames=9,
                  height=32, width=32, num_inference_steps=3, guidance_scale=2.0,
                  last_image=PIL.fromarray(last) if first_last else None,
                  max_sequence_length=TEXT_TOKENS, output_type="np",
                  latents=torch.from_numpy(np.moveaxis(noise, -1, 1).copy())).frames
  assert ours.shape == theirs.shape == (1, 9, 32, 32, 3)
  assert np.abs(ours / 255.0 - theirs).max() <= 1 / 255 + 1e-4
  assert ours.std() > 2

  if not first_last:     # the command line once, with both flags
    return
  paths = []
  for name, image in (("first.png", first), ("last.png", last)):
    paths.append(str(tmp_path / name))
    PIL.fromarray(image).save(paths[-1])
  cli.main(["sora-jax", "sample", "--workdir", out, "--prompt", PROMPT, "--image", paths[0],
            "--last-image", paths[1], "--out", str(tmp_path / "out.mp4"), "--steps", "2", "--height", "32",
            "--width", "32"])
  printed = capsys.readouterr().out
  assert "C2PA manifest signed" in printed and "(5 frames of 32x32)" in printed
