"""Step caching (`sora_jax.diffusion.step_cache`, the sampler's cached velocity): the skip
rule on a hand-computed sequence, calibration ratios, and a cached sampler against the
same steps computed by hand through the transformer."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_model
from sora_jax.diffusion import flow, step_cache

from sora_jax.sample import Sampler, initial_noise, sample_from_text_states


def test_skip_schedule_follows_the_rule_by_hand():
  ratios = [1.0, 0.9, 0.95, 1.0, 1.02, 0.8, 1.0, 1.0, 1.0, 1.0]
  # 0, 1: retained (the first 20%). 2: ratio .95, error .05 -> skip; 3: ratio .95, error
  # .10 -> skip; 4: ratio .969, error .131 > .12 -> compute; 5: ratio .8, error .2 ->
  # compute; 6, 7: error 0 -> skip; 8: two skipped in a row -> compute; 9: skip.
  want = [False, False, True, True, False, False, True, True, False, True]
  np.testing.assert_array_equal(step_cache.skip_schedule(ratios, 0.12), want)
  assert not step_cache.skip_schedule(ratios, 0.0).any()                  # 0: off
  assert step_cache.skip_schedule(ratios, 0.12, max_skips=0).sum() == 0
  with pytest.raises(ValueError, match="threshold"):
    step_cache.skip_schedule(ratios, -1.0)


def test_magnitude_ratios_average_the_runs():
  np.testing.assert_allclose(step_cache.magnitude_ratios([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]]),
                             [1.0, 1.5, 1.5])
  with pytest.raises(ValueError, match="finite"):
    step_cache.magnitude_ratios([[1.0, np.nan]])


@pytest.fixture(scope="module")
def model_and_sampler(data_dir, tokenizer):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir)
  config.sample.batch_size = 2
  graphdef, params = random_model(config, tokenizer.vocab_size, seed=5, scale=0.1)
  return nnx.merge(graphdef, params), Sampler(config, tokenizer, graphdef, params)


def test_cached_euler_is_the_hand_computed_sequence(model_and_sampler):
  """Three Euler steps, the second reusing the first's block residual: the sampler's
  output equals the steps computed by hand through `dit(..., block_residual=...)`."""
  model, sampler = model_and_sampler
  ids, mask = sampler.tokenizer.encode(["a red circle moves left"], 8)
  text = model.text_encoder(ids, mask)
  null_ids, null_mask = sampler.tokenizer.encode([""], 8)
  null_text = model.text_encoder(null_ids, null_mask)
  options = dataclasses.replace(sampler.options(), steps=3, solver="euler", cfg_scale=1.0,
                                shift=2.0, schedule="uniform")
  shape = (4, 16, 16, 3)
  seeds = jnp.array([3], jnp.int32)
  common = dict(latent_shape=shape, options=options, autoencoder=sampler.autoencoder)
  args = (sampler.params, sampler.graphdef, text, mask, null_text, null_mask[0], seeds)
  cached = sample_from_text_states(*args, cache_skips=(False, True, False), **common)
  plain = sample_from_text_states(*args, **common)

  times = flow.sampling_times(3, 2.0, "uniform")
  x = initial_noise(seeds, shape)
  t = lambda i: jnp.full((1,), times[i])
  v, residual = model.dit(x, t(0), text, mask, return_residual=True)
  x = x + (times[1] - times[0]) * v
  x = x + (times[2] - times[1]) * model.dit(x, t(1), text, mask, block_residual=residual)
  x = x + (times[3] - times[2]) * model.dit(x, t(2), text, mask)
  np.testing.assert_allclose(cached, sampler.autoencoder.decode(x), atol=2e-5)
  assert np.abs(np.asarray(cached) - np.asarray(plain)).max() > 1e-3    # the skip mattered


def test_threshold_zero_is_the_uncached_sampler_and_calibration_enables_caching(
    model_and_sampler, tmp_path):
  _, sampler = model_and_sampler
  prompts, seeds = ["a red circle moves left", "a blue square moves up"], [0, 1]
  common = dict(steps=6, solver="euler", cfg_scale=2.0, schedule="uniform")
  plain = sampler.generate(prompts, seeds, **common)
  np.testing.assert_array_equal(sampler.generate(prompts, seeds, cache_threshold=0.0,
                                                 **common), plain)
  with pytest.raises(ValueError, match="calibrate-cache"):
    sampler.generate(prompts, seeds, cache_threshold=0.5, **common)
  ratios = sampler.calibrate_cache(prompts, seeds, **common)
  assert ratios.shape == (6,) and ratios[0] == 1.0 and np.all(ratios > 0)
  options = sampler.options(cache_threshold=10.0, **common)
  skips = sampler.cache_skips(options)
  assert skips == (False, False, True, True, False, True)   # at most 2 in a row, 20% kept
  cached = sampler.generate(prompts, seeds, cache_threshold=10.0, **common)
  assert cached.shape == plain.shape and np.abs(cached.astype(int) - plain).max() > 0
  path = sampler.save_cache_calibration(str(tmp_path))
  assert path.endswith("step_cache.json")


def test_two_experts_never_reuse_a_residual_across_the_switch(data_dir, tokenizer):
  """A two-expert model (Wan 2.2 A14B's layout, the switch at flow time 0.6) with every
  evaluation after the first marked to reuse: each expert computes its first evaluation
  and reuses its own residual after it, as computed here by hand."""
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, **{"model.boundary": 0.6})
  graphdef, params = random_model(config, tokenizer.vocab_size, seed=6, scale=0.1)
  model = nnx.merge(graphdef, params)
  ids, mask = tokenizer.encode(["a red circle moves left"], 8)
  text = model.text_encoder(ids, mask)
  null_ids, null_mask = tokenizer.encode([""], 8)
  null_text = model.text_encoder(null_ids, null_mask)
  sampler = Sampler(config, tokenizer, graphdef, params)
  options = dataclasses.replace(sampler.options(), steps=4, solver="euler", cfg_scale=1.0,
                                shift=1.0, schedule="uniform")
  shape, seeds = (4, 16, 16, 3), jnp.array([2], jnp.int32)
  cached = sample_from_text_states(params, graphdef, text, mask, null_text, null_mask[0],
                                   seeds, latent_shape=shape, options=options,
                                   autoencoder=sampler.autoencoder,
                                   cache_skips=(False, True, True, True))
  x = initial_noise(seeds, shape)
  t = lambda value: jnp.full((1,), value)
  v, high = model.dit(x, t(1.0), text, mask, return_residual=True)          # high noise
  x = x - 0.25 * v
  x = x - 0.25 * model.dit(x, t(0.75), text, mask, block_residual=high)
  v, low = model.low_noise_dit(x, t(0.5), text, mask, return_residual=True)  # switched
  x = x - 0.25 * v
  x = x - 0.25 * model.low_noise_dit(x, t(0.25), text, mask, block_residual=low)
  np.testing.assert_allclose(cached, sampler.autoencoder.decode(x), atol=2e-5)
