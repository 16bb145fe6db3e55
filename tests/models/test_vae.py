"""The causal video VAE: shapes, causality, images, chunked = whole, tiles, KL, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vae_world_tiny  # configs/, on the path through tests/conftest.py
from helpers import compiled
from sora_jax import configs
from sora_jax.models import vae as vae_lib
from sora_jax.models.discriminator import (PatchDiscriminator3d, hinge_discriminator_loss,
                                           hinge_generator_loss)

SMALL = dict(latent_channels=4, channels=(8, 16, 16))
# The model's methods, each compiled as one program (helpers.compiled).
encode, decode = compiled("encode"), compiled("decode")
encode_chunked, decode_chunked = compiled("encode_chunked", (1,)), compiled("decode_chunked", (1,))


def make_vae(**overrides) -> vae_lib.VideoVAE:
  kw = {"compression": (4, 8, 8), "patch": 2, **SMALL, **overrides}
  return vae_lib.build_vae(vae_lib.VAEConfig(**kw), nnx.Rngs(0))


def video(frames=9, height=16, width=16, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (2, frames, height, width, 3),
                            minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("compression,channels,patch,factorized", [
    ((4, 8, 8), (8, 16, 16, 16), 1, False),    # the Wan 2.1 layout: three stages, no patch
    ((4, 8, 8), (8, 16, 16), 2, True),
    ((4, 4, 4), (8, 16, 16), 1, True),
])
def test_latent_shapes_follow_the_compression(compression, channels, patch, factorized):
  model = make_vae(compression=compression, channels=channels, patch=patch,
                   factorized=factorized)
  ft = compression[0]
  x = video(frames=1 + 2 * ft)
  mean, logvar = encode(model, x)
  expected = model.config.latent_shape(1 + 2 * ft, 16, 16)
  chex.assert_shape([mean, logvar], (2,) + expected)
  assert expected == (3, 16 // compression[1], 16 // compression[2], 4)
  chex.assert_type([mean, logvar], jnp.float32)
  recon = decode(model, mean)
  chex.assert_shape(recon, x.shape)
  chex.assert_tree_all_finite(recon)


@pytest.mark.parametrize("shortcuts", [False, True])
@pytest.mark.parametrize("frame", [0, 1, 4, 5, 8])
def test_encoder_and_decoder_are_causal(frame, shortcuts):
  """Changing frame k changes no latent before k's chunk; a latent changes no earlier frame."""
  model = make_vae(shortcuts=shortcuts)
  x = video()
  mean, _ = encode(model, x)
  changed, _ = encode(model, x.at[:, frame].add(0.5))
  first_affected = 0 if frame == 0 else 1 + (frame - 1) // 4
  diff = np.abs(np.asarray(changed - mean)).max(axis=(0, 2, 3, 4))      # per latent frame
  np.testing.assert_array_equal(diff[:first_affected], 0.0)
  assert diff[first_affected] > 0
  # Decoder: latent frame j affects no pixel frame before 1 + 4 (j - 1).
  for j in range(mean.shape[1]):
    out = decode(model, mean.at[:, j].add(1.0)) - decode(model, mean)
    per_frame = np.abs(np.asarray(out)).max(axis=(0, 2, 3, 4))
    first = 0 if j == 0 else 1 + 4 * (j - 1)
    np.testing.assert_array_equal(per_frame[:first], 0.0)
    assert per_frame[first] > 0


@pytest.mark.parametrize("shortcuts", [False, True])
def test_an_image_is_a_one_frame_video(shortcuts):
  model = make_vae(shortcuts=shortcuts)
  x = video()
  image_mean, _ = encode(model, x[:, :1])
  video_mean, _ = encode(model, x)
  chex.assert_shape(image_mean, (2, 1, 2, 2, 4))
  np.testing.assert_allclose(image_mean, video_mean[:, :1], atol=1e-5)
  chex.assert_shape(decode(model, image_mean), (2, 1, 16, 16, 3))
  np.testing.assert_allclose(decode(model, image_mean), decode(model, video_mean)[:, :1],
                             atol=1e-5)


@pytest.mark.parametrize("factorized,shortcuts", [(False, False), (True, False), (True, True)])
def test_chunked_encode_and_decode_equal_whole(factorized, shortcuts):
  model = make_vae(factorized=factorized, shortcuts=shortcuts)
  x = video(frames=17)
  mean, logvar = encode(model, x)
  for chunk in (4, 8, 16):
    m, lv = encode_chunked(model, x, chunk)
    np.testing.assert_allclose(m, mean, atol=1e-5)
    np.testing.assert_allclose(lv, logvar, atol=1e-5)
  whole = decode(model, mean)
  for chunk in (1, 2, 4):
    np.testing.assert_allclose(decode_chunked(model, mean, chunk), whole, atol=1e-5)


def test_chunked_encoding_runs_under_jit_in_one_chunk_of_memory():
  """The scanned chunks compile to one loop body: memory of a chunk, not the video."""
  model = make_vae()
  graphdef, state = nnx.split(model)
  x = video(frames=257)

  def enc(state, x):
    return nnx.merge(graphdef, state).encode_chunked(x, 4)[0]

  def whole(state, x):
    return nnx.merge(graphdef, state).encode(x)[0]

  chunked_mem = jax.jit(enc).lower(state, x).compile().memory_analysis()
  whole_mem = jax.jit(whole).lower(state, x).compile().memory_analysis()
  np.testing.assert_allclose(jax.jit(enc)(state, x), jax.jit(whole)(state, x), atol=1e-5)
  if chunked_mem is not None and whole_mem is not None:
    assert chunked_mem.temp_size_in_bytes < whole_mem.temp_size_in_bytes


def test_tile_starts_cover_with_overlap():
  assert vae_lib.tile_starts(64, 64, 16) == [0]
  starts = vae_lib.tile_starts(100, 32, 8)
  assert starts[0] == 0 and starts[-1] == 100 - 32
  for a, b in zip(starts, starts[1:]):
    assert 0 < b - a <= 32 - 8


def test_tiled_apply_blends_a_local_function_exactly():
  """For a position-wise function, blending overlapping tiles gives the whole result."""
  x = video(frames=1, height=40, width=56)
  fn = lambda v: jnp.tanh(v) * 2.0
  out = vae_lib.tiled_apply(fn, x, tile=16, overlap=8, scale=1)
  np.testing.assert_allclose(out, fn(x), atol=1e-6)
  # Downsampling by 4 (block means): tiles aligned to the blocks give the same again.
  pool = lambda v: v.reshape(v.shape[0], v.shape[1], v.shape[2] // 4, 4, v.shape[3] // 4, 4,
                             3).mean((3, 5))
  np.testing.assert_allclose(vae_lib.tiled_apply(pool, x, tile=16, overlap=8, scale=1 / 4),
                             pool(x), atol=1e-6)


def test_tiled_encode_with_one_tile_equals_encode():
  model = make_vae()
  x = video(frames=5, height=32, width=32)
  z = encode(model, x)[0]
  np.testing.assert_allclose(vae_lib.tiled_encode(model, x, tile=32, overlap=8), z, atol=1e-5)
  np.testing.assert_allclose(vae_lib.tiled_decode(model, z, tile=4, overlap=2),
                             decode(model, z), atol=1e-5)
  tiled = vae_lib.tiled_encode(model, video(frames=5, height=32, width=48), tile=16, overlap=8)
  chex.assert_shape(tiled, (2, 2, 4, 6, 4))


def test_kl_matches_the_closed_form_in_float64():
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(3, 2, 2, 2, 4)), rng.normal(size=(3, 2, 2, 2, 4))
  expected = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).reshape(3, -1).sum(-1)
  np.testing.assert_allclose(vae_lib.kl_divergence(jnp.asarray(mean, jnp.float32),
                                                   jnp.asarray(logvar, jnp.float32)),
                             expected, rtol=1e-5)


def test_resampling_shortcuts_average_and_repeat():
  """With their convolutions zeroed, Downsample averages 2x2 pixels and causal frame pairs
  (the first frame alone) and Upsample repeats: the parameter-free shortcut paths."""
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 4, 4, 3))
  with nnx.use_eager_sharding(False):
    down = vae_lib.Downsample(3, time=True, space=True, rngs=nnx.Rngs(0), shortcut=True)
    up = vae_lib.Upsample(3, time=True, space=True, rngs=nnx.Rngs(0), shortcut=True)
  for module in (down, up):
    nnx.update(module, jax.tree.map(jnp.zeros_like, nnx.state(module, nnx.Param)))
  pooled = np.asarray(x).reshape(1, 5, 2, 2, 2, 2, 3).mean((3, 5))        # [1, 5, 2, 2, 3]
  expected = np.concatenate([pooled[:, :1], pooled[:, 1:].reshape(1, 2, 2, 2, 2, 3).mean(2)],
                            axis=1)
  np.testing.assert_allclose(down(x)[0], expected, atol=1e-6)
  out, _ = up(jnp.asarray(expected))
  repeated = np.repeat(np.repeat(np.repeat(expected, 2, 1)[:, 1:], 2, 2), 2, 3)
  np.testing.assert_allclose(out, repeated, atol=1e-6)


def test_latent_normalisation_round_trips():
  model = make_vae()
  model.latent_mean[...] = jnp.arange(4.0)
  model.latent_std[...] = jnp.arange(1.0, 5.0)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 2, 2, 4))
  np.testing.assert_allclose(model.denormalise(model.normalise(z)), z, atol=1e-6)
  np.testing.assert_allclose(model.normalise(z)[..., 1], (z[..., 1] - 1.0) / 2.0, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(compression=(3, 8, 8)), "power of two"),
    (dict(compression=(4, 8, 4)), "height and width"),
    (dict(compression=(4, 16, 16), patch=1, channels=(8, 16, 16)), "stages"),
    (dict(patch=3), "vae.patch"),
    (dict(patch=2, decoder_channels=(16, 32)), "decoder_channels"),
    (dict(compression=(4, 4, 4), residual_stages=True), "needs vae.resample='wan'"),
    (dict(residual_stages=True, resample="wan", norm="l2", channels=(8, 24, 24, 24)),
     "input width of level 1"),
])
def test_bad_vae_configs_name_the_key(kwargs, match):
  with pytest.raises(ValueError, match=match):
    vae_lib.VAEConfig(**{**SMALL, **kwargs})


def test_a_wider_decoder_keeps_the_encoder_and_the_shapes():
  narrow, wide = make_vae(shortcuts=True), make_vae(shortcuts=True, decoder_channels=(16, 32, 32))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(wide.decoder) > count(narrow.decoder)
  assert count(wide.encoder) == count(narrow.encoder)
  x = video()
  mean, _ = encode(wide, x)
  chex.assert_shape(decode(wide, mean), x.shape)
  # From a config file's `vae` section (empty = the encoder's widths).
  config = vae_world_tiny.get_config()
  assert configs.vae_config(config).decoder_channels is None
  config.vae.decoder_channels = (64, 128, 128)
  assert configs.vae_config(config).decoder_channels == (64, 128, 128)


def test_bad_video_shapes_are_refused():
  model = make_vae()
  with pytest.raises(ValueError, match="1 \\+ k \\* 4 frames"):
    encode(model, video(frames=8))
  with pytest.raises(ValueError, match="divisible by 8"):
    encode(model, video(frames=5, height=12))
  with pytest.raises(ValueError, match="chunk_frames"):
    encode_chunked(model, video(frames=9), 3)


def test_patch_discriminator_and_hinge_losses():
  with nnx.use_eager_sharding(False):
    disc = PatchDiscriminator3d(3, 8, 3, rngs=nnx.Rngs(0))
  logits = disc(video(frames=9, height=32, width=32))
  chex.assert_shape(logits, (2, 5, 4, 4, 1))
  real, fake = np.array([0.5, 2.0, -1.0]), np.array([-2.0, 0.3, 1.5])
  np.testing.assert_allclose(hinge_discriminator_loss(real, fake),
                             np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
  np.testing.assert_allclose(hinge_generator_loss(fake), -fake.mean())
