"""The Wan presets (configs/wan2_1_t2v.py, configs/wan2_2.py) describe the published
architectures: the config.json values of Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers and
Wan-AI/Wan2.2-{TI2V-5B,T2V-A14B}-Diffusers, checked without weights."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import wan2_1_t2v
import wan2_2
from sora_jax import configs
from sora_jax.interop import umt5, wan, wan_vae
from sora_jax.models.dit import DiffusionTransformer

TRANSFORMER = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16,
                   out_channels=16, text_dim=4096, freq_dim=256, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
PUBLISHED = {"1.3B": dict(TRANSFORMER, num_attention_heads=12, ffn_dim=8960, num_layers=30),
             "14B": dict(TRANSFORMER, num_attention_heads=40, ffn_dim=13824, num_layers=40),
             "ti2v-5B": dict(TRANSFORMER, num_attention_heads=24, ffn_dim=14336, num_layers=30,
                             in_channels=48, out_channels=48)}
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                num_heads=64, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, feed_forward_proj="gated-gelu")
VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
           temperal_downsample=[False, True, True])
VAE_22 = dict(VAE, base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
              patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16)


@pytest.mark.parametrize("size,params", [("1.3B", (1.2e9, 1.6e9)), ("14B", (13e9, 15e9))])
def test_presets_are_the_published_architectures(size, params):
  config = wan2_1_t2v.get_config(size)
  ours = configs.dit_config(config, text_width=4096, in_channels=16)
  theirs = wan.dit_config_from_diffusers(PUBLISHED[size], scan_layers=ours.scan_layers,
                                         remat=ours.remat)
  assert ours == theirs
  text = configs.text_encoder_config(config, vocab_size=256000)   # umt5-xxl's spiece pieces
  assert text == umt5.text_encoder_config_from_hf(UMT5_XXL)
  vae = wan_vae.vae_config_from_diffusers(VAE)
  assert vae.compression == (4, 8, 8) and vae.latent_channels == 16
  assert vae.channels == (96, 192, 384, 384)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: DiffusionTransformer(ours, rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert params[0] < count < params[1], count


def test_scan_and_remat_are_layout_only():
  ours = configs.dit_config(wan2_1_t2v.get_config("1.3B"), text_width=4096, in_channels=16)
  assert dataclasses.replace(ours, scan_layers=False, remat="none") == (
      wan.dit_config_from_diffusers(PUBLISHED["1.3B"]))


@pytest.mark.parametrize("preset,published,params", [
    ("ti2v-5B", "ti2v-5B", (4.5e9, 5.5e9)), ("t2v-A14B", "14B", (13e9, 15e9))])
def test_wan22_presets_are_the_published_architectures(preset, published, params):
  config = wan2_2.get_config(preset)
  channels = PUBLISHED[published]["in_channels"]
  ours = configs.dit_config(config, text_width=4096, in_channels=channels)
  assert ours == wan.dit_config_from_diffusers(PUBLISHED[published], scan_layers=ours.scan_layers,
                                               remat=ours.remat)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: DiffusionTransformer(ours, rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert params[0] < count < params[1], count
  if preset == "ti2v-5B":      # Wan 2.2's VAE: 4x16x16 to 48 channels, a wider decoder
    vae = wan_vae.vae_config_from_diffusers(VAE_22)
    assert vae.compression == (4, 16, 16) and vae.latent_channels == 48 and vae.patch == 2
    assert vae.channels == (160, 320, 640, 640) and vae.residual_stages
    assert vae.decoder_channels == (256, 512, 1024, 1024)
    assert vae.latent_shape(121, 704, 1280) == (31, 44, 80, 48)
  else:
    assert config.model.boundary == 0.875 and config.sample.cfg_scale_low == 3.0
