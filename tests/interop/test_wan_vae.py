"""Wan 2.1's and Wan 2.2's VAEs: sora_jax's VideoVAE loaded from a tiny randomly
initialised diffusers `AutoencoderKLWan` encodes and decodes like it; export round trips."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compiled, edit_model_config

from sora_jax.interop import export, tensors
from sora_jax.interop.load import load_wan_vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.5, 2.0, 1.0])


def make_torch_vae(tmp_path, **overrides):
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLWan(**{**TINY, **overrides}).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("gamma"):            # norms' gains away from 1
        p.mul_(1 + 0.3 * torch.rand_like(p))
      elif name.endswith("bias"):
        p.add_(0.05 * torch.randn_like(p))
  path = str(tmp_path / "vae")
  model.save_pretrained(path)
  return model, path


def to_torch(x):
  return torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())


def from_torch(x):
  return np.moveaxis(x.detach().numpy(), 1, -1)


def relative_error(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# Wan 2.1's own layout (4x8x8: two temporal stages), at a width of 4 channels.
WAN_LAYOUT = dict(base_dim=4, dim_mult=[1, 2, 2, 2], temperal_downsample=[False, True, True])
# Wan 2.2's residual VAE (TI2V-5B: 4x16x16, 2x2 pixel patches, a wider decoder), narrow.
WAN22_LAYOUT = dict(base_dim=4, decoder_base_dim=6, dim_mult=[1, 2, 2, 2],
                    temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                    in_channels=12, out_channels=12, scale_factor_spatial=16)


@pytest.mark.parametrize("frames,height,width,layout", [
    (1, 8, 12, {}), (9, 16, 24, WAN_LAYOUT), (9, 32, 32, WAN22_LAYOUT)])
def test_encode_decode_match_diffusers(tmp_path, frames, height, width, layout):
  model, path = make_torch_vae(tmp_path, **layout)
  vae = load_wan_vae(path)
  ft, fs = vae.config.compression[:2]
  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, (2, frames, height, width, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(to_torch(video)).latent_dist
  encode, decode, encode_chunked, decode_chunked = map(
      compiled, ("encode", "decode", "encode_chunked", "decode_chunked"))
  mean, logvar = encode(vae, jnp.asarray(video))
  chex.assert_shape(mean, (2, 1 + (frames - 1) // ft, height // fs, width // fs, 4))
  assert relative_error(mean, from_torch(posterior.mean)) < 1e-4
  assert relative_error(logvar, from_torch(posterior.logvar)) < 1e-4
  if layout.get("is_residual"):   # chunk by chunk (its shortcuts pad odd chunks) the same
    np.testing.assert_allclose(encode_chunked(vae, jnp.asarray(video))[0], mean, atol=1e-5)
  latent = rng.standard_normal(mean.shape).astype(np.float32)
  with torch.no_grad():
    expected = from_torch(model.decode(to_torch(latent)).sample)
  decoded = decode(vae, jnp.asarray(latent))
  chex.assert_shape(decoded, video.shape)
  assert relative_error(decoded, expected) < 1e-4
  # chunked decoding (one latent frame at a time, as diffusers does) gives the same
  np.testing.assert_allclose(decode_chunked(vae, jnp.asarray(latent)), decoded, atol=1e-5)
  np.testing.assert_allclose(vae.normalise(mean),
                             (mean - np.array(TINY["latents_mean"])) / np.array(TINY["latents_std"]),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", [{}, WAN22_LAYOUT])
def test_export_round_trip(tmp_path, layout):
  model, path = make_torch_vae(tmp_path, **layout)
  vae = load_wan_vae(path)
  out = str(tmp_path / "exported")
  export.save_wan_vae(vae, out)
  original, again = tensors.SafetensorsCheckpoint(path), tensors.SafetensorsCheckpoint(out)
  assert again.names() == original.names()
  for name in original.names():
    np.testing.assert_array_equal(again.read(name), original.read(name), err_msg=name)
  reloaded = diffusers.AutoencoderKLWan.from_pretrained(out).eval()
  assert list(reloaded.config.latents_std) == pytest.approx(TINY["latents_std"])
  video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
  with torch.no_grad():   # the same tensors (above); torch's kernels may differ in the last bit
    np.testing.assert_allclose(reloaded.encode(video).latent_dist.mean,
                               model.encode(video).latent_dist.mean, rtol=1e-5, atol=1e-6)


def test_mismatched_vae_names_the_tensor(tmp_path):
  _, path = make_torch_vae(tmp_path)
  edit_model_config(path, base_dim=16)
  with pytest.raises(tensors.CheckpointMismatch, match=r"wrong shape: encoder\.conv_in\.weight"):
    load_wan_vae(path)
