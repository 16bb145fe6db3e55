"""The sampler is deterministic per seed and honours the requested shape."""

import chex
import numpy as np
import pytest
from flax import nnx

from helpers import random_params
from sora_jax.models.model import build_model
from sora_jax.sample import Sampler
from sora_jax.train.state import abstract_model


@pytest.fixture(scope="module")
def sampler(data_dir, tokenizer):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir)
  model = build_model(config, tokenizer.vocab_size, nnx.Rngs(0))
  # Random (not zero-initialised) weights, so the output depends on prompt and seed.
  params = random_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), seed=7, scale=0.1)
  graphdef, _ = abstract_model(config, tokenizer.vocab_size)
  return Sampler(config, tokenizer, graphdef, params)


def test_sampler_is_deterministic_per_seed(sampler):
  prompts = ["a red circle moves left", "a blue square moves up"]
  a = sampler.generate(prompts, [1, 2])
  b = sampler.generate(prompts, [1, 2])
  np.testing.assert_array_equal(a, b)
  chex.assert_shape(a, (2, 4, 16, 16, 3))
  chex.assert_type(a, np.uint8)
  c = sampler.generate(prompts, [3, 2])
  assert not np.array_equal(c[0], a[0])
  np.testing.assert_array_equal(c[1], a[1])
  # The same (prompt, seed) gives the same video alone or in a batch.
  alone = sampler.generate(prompts[1:], [2])
  np.testing.assert_allclose(alone[0].astype(int), a[1].astype(int), atol=1)


def test_sampler_follows_requested_shape_and_guidance(sampler):
  video = sampler.generate(["a green triangle moves down"], [0], frames=6, height=8, width=24,
                           steps=2, cfg_scale=1.0)
  chex.assert_shape(video, (1, 6, 8, 24, 3))
  guided = sampler.generate(["a green triangle moves down"], [0], frames=6, height=8, width=24,
                            steps=2, cfg_scale=3.0)
  assert not np.array_equal(video, guided)


def test_sampler_rejects_sizes_off_the_patch_grid(sampler):
  with pytest.raises(ValueError, match="height=10"):
    sampler.generate(["a red circle moves left"], [0], height=10)


def test_native_size_model_samples_any_size_including_images(data_dir, tokenizer):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, native=True)
  model = build_model(config, tokenizer.vocab_size, nnx.Rngs(0))
  params = random_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), seed=2, scale=0.1)
  graphdef, _ = abstract_model(config, tokenizer.vocab_size)
  sampler = Sampler(config, tokenizer, graphdef, params)
  for size in [(1, 16, 24), (4, 24, 8), (3, 8, 32)]:   # an image, a trained size, an untrained one
    video = sampler.generate(["a red circle moves left"], [0], frames=size[0], height=size[1],
                             width=size[2], steps=2)
    chex.assert_shape(video, (1, *size, 3))
  assert len(sampler._compiled) == 3   # one compiled sampler per shape  # pylint: disable=protected-access
