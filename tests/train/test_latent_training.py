"""Latent diffusion: the transformer trains on VAE latents (encoded on the fly or cached by
encode-dataset), and the sampler decodes them back to pixels."""

import numpy as np
import pytest

from conftest import make_test_config
from sora_jax import configs
from sora_jax.cli import main as cli_main
from sora_jax.data.latents import load_latent_source
from sora_jax import prompting
from sora_jax.data.pipeline import DecodeAndTokenize, normalise_video, to_uint8
from sora_jax.data.world import load_world_source
from sora_jax.models.autoencoder import VAEAutoencoder
from sora_jax.train.autoencoders import make_autoencoder
from sora_jax.train.sources import latents_description
from sora_jax.sample import Sampler
from sora_jax.train import workdir as wd
from sora_jax.train.loop import train

# One worker runs the tests of the trained test VAE (a session fixture), so it is trained once.
pytestmark = pytest.mark.xdist_group("vae")


@pytest.fixture(scope="module")
def vae_dir(trained_test_vae):
  return trained_test_vae[0]


def latent_config(data_dir, vae_dir, **overrides):
  """The tiny DiT on the test VAE's latents: 5 frames of 16x16 -> [2, 2, 2, 4], 1x1x1 patches."""
  return make_test_config(data_dir, **{
      "world.frames": 5, "autoencoder.name": "vae", "autoencoder.workdir": vae_dir,
      "model.variant": "Pico/1x1x1", **overrides})


@pytest.mark.slow
def test_latent_dataset_holds_what_on_the_fly_encoding_gives(data_dir, vae_dir, tmp_path,
                                                            tokenizer):
  config = latent_config(data_dir, vae_dir)
  out = str(tmp_path / "latents")
  cli_main(["sora-jax", "encode-dataset", "--config", "configs/world_tiny.py:test", "--out", out,
            f"--config.world.data_dir={data_dir}", "--config.world.frames=5",
            "--config.autoencoder.name=vae", f"--config.autoencoder.workdir={vae_dir}",
            "--config.model.variant=Pico/1x1x1"])
  latents = load_latent_source(out, latents_description(config), "train")
  pixels = load_world_source(configs.world_config(config), "train", data_dir)
  assert len(latents) == len(pixels) == config.world.num_train
  autoencoder = make_autoencoder(config.autoencoder)
  assert isinstance(autoencoder, VAEAutoencoder)
  decode = DecodeAndTokenize(tokenizer, config.data.text_length)
  for k in (0, 7, len(latents) - 1):
    cached = decode.map(latents[k])
    fresh = decode.map(pixels[int(latents[k]["index"])])
    assert cached["latent"].shape == (2, 2, 2, 4)
    np.testing.assert_allclose(cached["latent"], autoencoder.encode(fresh["video"][None])[0],
                               atol=1e-5)
    np.testing.assert_array_equal(cached["text_ids"], fresh["text_ids"])
  # (Training on cached latents: tests/interop/test_wan_pipeline.py, Wan's VAE.)


@pytest.mark.slow
def test_latent_dit_trains_on_the_fly_and_samples_pixels(data_dir, vae_dir, tmp_path):
  workdir = str(tmp_path / "run")
  summary = train(latent_config(data_dir, vae_dir), workdir, progress=False)
  assert np.isfinite(summary["loss"])
  sampler = Sampler.from_workdir(workdir)
  assert sampler.graphdef is not None
  videos = sampler.generate(["a red circle moves left", "a blue square moves up"], [0, 1])
  assert videos.shape == (2, 5, 16, 16, 3)
  assert wd.load_config(workdir).autoencoder.workdir == vae_dir
  image = sampler.generate(["a red circle"], [0], frames=1)
  assert image.shape == (1, 1, 16, 16, 3)

  # Image-to-video in latent space: the given frame comes back as the VAE reconstructs it
  # (latent 0 is frame 0 alone, and the causal decoder's frame 0 sees only latent 0).
  frame = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
  animated = prompting.image_to_video(sampler, ["a red circle moves left"], frame, [0])
  assert animated.shape == (1, 5, 16, 16, 3)
  vae = sampler.autoencoder
  recon = to_uint8(np.asarray(vae.decode(vae.encode(normalise_video(frame[:, None])))))
  assert np.abs(animated[:, 0].astype(int) - recon[:, 0]).max() <= 1

  # Given frames after a generated one (a backward extension: the last 4 frames, latent 1,
  # which the causal decoder renders partly from the generated latent 0): reconstruction
  # guidance pulls their decoding from the window towards the autoencoder's own
  # reconstruction of them (of the window as the sampler encodes it: the free frame holds
  # the first given one). (This VAE trained 4 steps: its gain, and so the stable weight,
  # differs from a trained one's; see configs/world_tiny.py.)
  clip = videos[:1]
  window = np.concatenate([clip[:, :1], clip[:, :4]], axis=1)
  recon = to_uint8(np.asarray(vae.decode(vae.encode(normalise_video(window)))))

  def given_error(weight):
    out = prompting.extend(sampler, ["a red circle moves left"], clip, [0], context=4,
                           direction="backward", handover=True, given_guidance=weight)
    assert out.shape == (1, 6, 16, 16, 3)
    return np.abs(out[:, 1:5].astype(float) - clip[:, :4]).mean()   # the window's decoding

  own = np.abs(recon[:, 1:5].astype(float) - clip[:, :4]).mean()
  unguided, guided = given_error(0.0), given_error(300.0)
  assert guided - own < 0.5 * (unguided - own), (own, guided, unguided)
  compiled = sampler.compiled_shapes        # the weight is the compiled sampler's input
  assert own < given_error(150.0) < unguided and sampler.compiled_shapes == compiled


def test_latent_configs_are_checked_before_compiling(data_dir, vae_dir, tmp_path):
  with pytest.raises(ValueError, match="autoencoder.workdir"):
    configs.validate(latent_config(data_dir, str(tmp_path / "none")))
  with pytest.raises(ValueError, match="does not fit the autoencoder"):
    configs.validate(latent_config(data_dir, vae_dir, **{"world.frames": 4}))
  with pytest.raises(ValueError, match="patch size 4 does not divide the latent height 2"):
    configs.validate(latent_config(data_dir, vae_dir, **{"model.variant": "Pico/1x4x4"}))
  with pytest.raises(ValueError, match="data.grouping"):
    configs.validate(latent_config(data_dir, vae_dir, **{"data.grouping": "pack"}))
  with pytest.raises(FileNotFoundError, match="encode-dataset"):
    load_latent_source(str(tmp_path / "empty"),
                       latents_description(latent_config(data_dir, vae_dir)), "train")

