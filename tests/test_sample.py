"""The sampler is deterministic per seed and honours the requested shape; reconstruction
guidance follows its formula and pulls given frames back to their pixels."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_model
from sora_jax.diffusion.solvers import euler
from sora_jax.sample import Sampler, reconstruction_guided
from sora_jax.train.state import abstract_model


@pytest.fixture(scope="module")
def sampler(data_dir, tokenizer):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir)
  # Random (not zero-initialised) weights, so the output depends on prompt and seed.
  return Sampler(config, tokenizer, *random_model(config, tokenizer.vocab_size, seed=7,
                                                   scale=0.1))


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


def test_stochastic_steps_are_deterministic_per_seed_and_differ_from_the_ode(sampler):
  prompts = ["a red circle moves left", "a blue square moves up"]
  ode = sampler.generate(prompts, [1, 2], steps=3)
  a = sampler.generate(prompts, [1, 2], steps=3, eta=1.0)
  compiled = sampler.compiled_shapes
  np.testing.assert_array_equal(a, sampler.generate(prompts, [1, 2], steps=3, eta=1.0))
  assert not np.array_equal(a, ode)
  assert not np.array_equal(a, sampler.generate(prompts, [1, 2], steps=3, eta=0.5))
  assert sampler.compiled_shapes == compiled     # eta is an input: 0.5 runs 1.0's program
  # Each video's step noise comes from its own seed: the same alone as in a batch.
  alone = sampler.generate(prompts[1:], [2], steps=3, eta=1.0)
  np.testing.assert_allclose(alone[0].astype(int), a[1].astype(int), atol=1)
  with pytest.raises(ValueError, match="eta=0.5: stochastic steps are the euler solver's"):
    sampler.generate(prompts, [1, 2], solver="heun", eta=0.5)
  with pytest.raises(ValueError, match="eta=1.5 must be in"):
    sampler.generate(prompts, [1, 2], eta=1.5)


def test_sampler_follows_requested_shape_and_guidance(sampler):
  video = sampler.generate(["a green triangle moves down"], [0], frames=6, height=8, width=24,
                           steps=2, cfg_scale=1.0)
  chex.assert_shape(video, (1, 6, 8, 24, 3))
  guided = sampler.generate(["a green triangle moves down"], [0], frames=6, height=8, width=24,
                            steps=2, cfg_scale=3.0)
  assert not np.array_equal(video, guided)


def test_guidance_scales_and_shift_are_inputs_of_one_program(sampler, tokenizer):
  """A sweep of guidance scales or shifts compiles once: they are the sampler's inputs,
  and only whether a scale is 1 (no unconditional pass) shapes the program. A value gives
  the same videos whichever value compiled the program (the module's sampler, the same
  model, compiled its own), and the guided velocity is the one the Python scale gives."""
  from sora_jax.sample import guided_velocity  # pylint: disable=g-import-not-at-top
  config, graphdef, params = sampler.config, sampler.graphdef, sampler.params
  prompts, size = ["a red circle moves left", "a blue square moves up"], {"steps": 2}
  swept = Sampler(config, tokenizer, graphdef, params)
  at = {w: swept.generate(prompts, [1, 2], cfg_scale=w, **size) for w in (2.0, 5.0)}
  shifted = swept.generate(prompts, [1, 2], cfg_scale=5.0, shift=7.0, **size)
  late = swept.generate(prompts, [1, 2], cfg_scale=5.0, guidance_interval=(0.0, 0.5), **size)
  assert swept.compiled_shapes == 1
  assert not np.array_equal(at[2.0], at[5.0]) and not np.array_equal(shifted, at[5.0])
  assert not np.array_equal(late, at[5.0])
  np.testing.assert_array_equal(sampler.generate(prompts, [1, 2], cfg_scale=5.0, shift=7.0,
                                                 **size), shifted)
  swept.generate(prompts, [1, 2], cfg_scale=1.0, **size)     # no unconditional pass
  assert swept.compiled_shapes == 2

  model = nnx.merge(graphdef, params)
  ids, mask = tokenizer.encode(prompts, config.data.text_length)
  null_ids, null_mask = tokenizer.encode([""], config.data.text_length)
  text, null_text = model.text_encoder(ids, mask), model.text_encoder(null_ids, null_mask)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 16, 16, 3)), jnp.float32)
  t = jnp.asarray([0.7, 0.4])

  def velocity(python_scale, values=None, interval=(0.0, 1.0)):
    return jax.jit(lambda x, t, values: guided_velocity(
        model, text, mask, null_text, null_mask, None, cfg_scale=python_scale,
        image_scale=1.0, interval=interval, option_values=values)(x, t))(x, t, values)

  values = swept.options(cfg_scale=5.0, image_cfg_scale=1.0).traced_values()
  np.testing.assert_allclose(velocity(2.0, values), velocity(5.0), rtol=1e-5, atol=1e-5)
  # The interval too (t = 0.7 outside (0.8, 1): the plain conditional velocity).
  outside = swept.options(cfg_scale=5.0, guidance_interval=(0.8, 1.0)).traced_values()
  np.testing.assert_allclose(velocity(2.0, outside), velocity(5.0, interval=(0.8, 1.0)),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(velocity(2.0, outside), velocity(5.0), rtol=1e-3, atol=1e-3)


def test_sampler_rejects_sizes_off_the_patch_grid(sampler):
  with pytest.raises(ValueError, match="height=10"):
    sampler.generate(["a red circle moves left"], [0], height=10)


def test_native_size_model_samples_any_size_including_images(data_dir, tokenizer):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, native=True)
  sampler = Sampler(config, tokenizer, *random_model(config, tokenizer.vocab_size, seed=2,
                                                      scale=0.1))
  for size in [(1, 16, 24), (4, 24, 8), (3, 8, 32)]:   # an image, a trained size, an untrained one
    video = sampler.generate(["a red circle moves left"], [0], frames=size[0], height=size[1],
                             width=size[2], steps=2)
    chex.assert_shape(video, (1, *size, 3))
  assert len(sampler._compiled) == 3   # one compiled sampler per shape  # pylint: disable=protected-access


class _CausalLinearDecoder:
  """A stand-in causal decoder: pixel frame i = (latent i + 0.5 latent i-1) @ W, per position
  (latent `[B, T, 2, 2, 2]` -> video `[B, T, 2, 2, 3]`); `decode64` is the float64 numpy
  reference of `decode`."""

  weights = np.random.default_rng(0).normal(size=(2, 3))

  def decode(self, latent, xp=jnp):
    previous = xp.pad(latent, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
    return xp.einsum("bthwc,cd->bthwd", latent + 0.5 * previous, self.weights)

  def decode64(self, latent):
    return self.decode(np.asarray(latent, np.float64), xp=np)


def test_reconstruction_guidance_matches_its_formula():
  rng = np.random.default_rng(0)
  given = np.array([[False, False, True, True], [False, True, False, True]])
  given_latent = rng.normal(size=(2, 4, 2, 2, 2))
  pixels = rng.uniform(-1, 1, size=(2, 4, 2, 2, 3))
  x = np.random.default_rng(1).normal(size=given_latent.shape)
  v = np.random.default_rng(2).normal(size=given_latent.shape)
  t, weight = 0.6, 3.0
  guided = reconstruction_guided(lambda x_, t_: jnp.asarray(v, jnp.float32), _CausalLinearDecoder(),
                                 jnp.asarray(given_latent, jnp.float32), jnp.asarray(given),
                                 jnp.asarray(pixels, jnp.float32), jnp.asarray(given), weight)
  out = guided(jnp.asarray(x, jnp.float32), jnp.full((2,), t, jnp.float32))
  # float64 reference: d/dx0 of sum_b |given pixels of D(x0 with given latents)|^2 / count_b,
  # count_b = given frames * (pixel values per latent position = 3).
  keep = given[:, :, None, None, None]
  x0 = np.where(keep, given_latent, x - t * v)
  err = np.where(keep, _CausalLinearDecoder().decode64(x0) - pixels, 0.0)
  count = given.sum(1)[:, None, None, None, None] * 3.0
  back = 2 * err / count @ _CausalLinearDecoder.weights.T          # through W
  grad = back + 0.5 * np.pad(back, ((0, 0), (0, 1), (0, 0), (0, 0), (0, 0)))[:, 1:]  # and i+1
  expected = v + weight * t * np.where(keep, 0.0, grad)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

  # Given frames only at the start: no free latent before them, so no correction.
  start = np.zeros_like(given)
  start[:, :2] = True
  unchanged = reconstruction_guided(lambda x_, t_: jnp.asarray(v, jnp.float32),
                                    _CausalLinearDecoder(), jnp.asarray(given_latent, jnp.float32),
                                    jnp.asarray(start), jnp.asarray(pixels, jnp.float32),
                                    jnp.asarray(start), weight)
  np.testing.assert_array_equal(unchanged(jnp.asarray(x, jnp.float32), jnp.full((2,), t)),
                                v.astype(np.float32))


def test_reconstruction_guidance_pulls_given_frames_back():
  """A flow that ignores the given frames (constant velocity `noise - c`: the straight path
  to latents `c`): unguided it ends at `c` and the given frames, which the causal decoder
  renders partly from the free latents before them, decode away from their pixels (made
  by decoding latents `truth`); guided, they come back close."""
  rng = np.random.default_rng(3)
  given = np.array([[False, False, True, True], [False, True, False, True]])
  keep = given[:, :, None, None, None]
  truth, c, noise = (rng.normal(size=(2, 4, 2, 2, 2)).astype(np.float32) for _ in range(3))
  pixels = _CausalLinearDecoder().decode64(truth)
  times = jnp.linspace(1.0, 0.0, 25)

  def given_error(weight):
    v = reconstruction_guided(lambda x, t: jnp.asarray(noise - c), _CausalLinearDecoder(),
                              jnp.asarray(truth), jnp.asarray(given), jnp.asarray(pixels),
                              jnp.asarray(given), weight)
    x = np.where(keep, truth, np.asarray(euler(v, jnp.asarray(noise), times)))
    return np.abs(np.where(keep, _CausalLinearDecoder().decode64(x) - pixels, 0)).mean()

  unguided = given_error(0.0)
  np.testing.assert_allclose(unguided, np.abs(np.where(
      keep, _CausalLinearDecoder().decode64(np.where(keep, truth, c)) - pixels, 0)).mean(),
                             rtol=1e-5)
  guided = given_error(200.0)
  assert guided < 0.2 * unguided, (guided, unguided)


def test_scanned_model_samples_what_the_loop_model_samples(sampler, data_dir, tokenizer):
  """Blocks under `nnx.scan` (the large presets' layout) inside the solver's loop."""
  import jax  # pylint: disable=g-import-not-at-top
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, **{"model.scan_layers": True, "model.remat": "dots"})
  graphdef, _ = abstract_model(config, tokenizer.vocab_size)
  blocks = sampler.params["dit"]["blocks"]
  stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *[blocks[i] for i in sorted(blocks)])
  params = {**sampler.params, "dit": {**sampler.params["dit"], "blocks": stacked}}
  scanned = Sampler(config, tokenizer, graphdef, params)
  prompts = ["a red circle moves left"]
  np.testing.assert_allclose(scanned.generate(prompts, [1], steps=2).astype(int),
                             sampler.generate(prompts, [1], steps=2).astype(int), atol=1)


@pytest.mark.parametrize("boundary", [0.0, 0.6])
def test_self_conditioning_feeds_each_pass_its_last_estimate(data_dir, tokenizer, boundary):
  """A self-conditioning model (`model.self_condition`) samples like a hand-written Euler
  loop in which each guidance pass reads its own clean estimate `x - t v` of the previous
  step (zeros at the first); with two experts (`model.boundary`) each step runs the expert
  of its time, reading the estimate whichever expert made it."""
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  from sora_jax.data.pipeline import to_uint8  # pylint: disable=g-import-not-at-top
  from sora_jax.diffusion import flow  # pylint: disable=g-import-not-at-top
  from sora_jax.sample import initial_noise  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, **{"model.self_condition": True,
                                         "model.boundary": boundary})
  graphdef, params = random_model(config, tokenizer.vocab_size, seed=7, scale=0.1)
  sampler = Sampler(config, tokenizer, graphdef, params)
  prompts, seeds, steps, scale = ["a red circle moves left", "a blue square"], [1, 2], 3, 2.0
  video = sampler.generate(prompts, seeds, steps=steps, cfg_scale=scale)

  merged = nnx.merge(graphdef, params)
  ids, mask = tokenizer.encode(prompts, config.data.text_length)
  null_ids, null_mask = tokenizer.encode([""] * 2, config.data.text_length)
  text = merged.encode_text(jnp.asarray(ids), jnp.asarray(mask))
  null = merged.encode_text(jnp.asarray(null_ids), jnp.asarray(null_mask))
  x = initial_noise(jnp.asarray(seeds), video.shape[1:4] + (3,))
  times = np.asarray(flow.sampling_times(steps, config.sample.shift, config.sample.schedule))
  if boundary:   # a step on each side
    assert times[0] >= boundary > times[-2], times
  own, empty = jnp.zeros_like(x), jnp.zeros_like(x)
  for t, t_next in zip(times[:-1], times[1:]):
    tt = jnp.full((2,), t, jnp.float32)
    dit = merged.dit if t >= boundary else merged.low_noise_dit
    v_text = dit(x, tt, text, jnp.asarray(mask), self_condition=own)
    v_null = dit(x, tt, null, jnp.asarray(null_mask), self_condition=empty)
    own, empty = x - t * v_text, x - t * v_null
    x = x + (t_next - t) * (v_null + scale * (v_text - v_null))
  np.testing.assert_allclose(video.astype(int), to_uint8(x).astype(int), atol=1)
