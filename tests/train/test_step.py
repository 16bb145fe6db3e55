"""Optimiser schedule, EMA, the flow objective and mixed precision."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sora_jax.diffusion import flow
from sora_jax.train import optim


def test_learning_rate_warmup_then_cosine():
  cfg = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1))
  schedule = optim.learning_rate_schedule(cfg, 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(60)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)
  assert float(schedule(110)) == pytest.approx(1e-4)


def test_ema_update_matches_formula():
  ema, params = {"w": jnp.ones(3)}, {"w": jnp.full(3, 3.0)}
  out = optim.ema_update(ema, params, jnp.asarray(1000), 0.99)
  np.testing.assert_allclose(out["w"], 0.99 * 1 + 0.01 * 3, rtol=1e-6)
  early = optim.ema_update(ema, params, jnp.asarray(0), 0.99)   # warm-up: d = 1/10
  np.testing.assert_allclose(early["w"], 0.1 * 1 + 0.9 * 3, rtol=1e-6)


def test_flow_path_and_target():
  x0, noise = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
  xt = flow.interpolate(x0, noise, jnp.asarray([0.0, 0.25]))
  np.testing.assert_allclose(xt, [[2.0] * 3, [1.25] * 3])
  np.testing.assert_allclose(flow.velocity_target(x0, noise), -3.0)
  # Following the exact velocity from t=1 to 0 lands on the data, for any schedule.
  from sora_jax.diffusion.solvers import euler  # pylint: disable=g-import-not-at-top
  out = euler(lambda x, t: flow.velocity_target(x0, noise), noise, flow.sampling_times(5, 3.0))
  np.testing.assert_allclose(out, x0, atol=1e-5)


def test_gradient_difference_term_against_a_reference():
  """`flow.frame_mse` per frame against float64 numpy: the MSE plus each frame's weight
  times the MSE of the error's differences along H and along W; the weights of
  `gradient_loss_weights` switch off above their time."""
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 3, 5, 4, 2)), rng.normal(size=(2, 3, 5, 4, 2))
  w = np.array([[0.0, 1.0, 2.5], [4.0, 0.5, 0.0]])
  err = pred - target
  plain = np.square(err).mean((2, 3, 4))                                       # [2, 3]
  edges = (np.square(np.diff(err, axis=2)).mean((2, 3, 4))
           + np.square(np.diff(err, axis=3)).mean((2, 3, 4)))
  expected = plain + w * edges
  got = flow.frame_mse(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                       jnp.asarray(w, jnp.float32))
  chex.assert_shape(got, (2, 3))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(flow.frame_mse(pred, target), plain, rtol=1e-5)
  # Per example (one weight per clip, `[B, 1]`): the mean over its frames.
  np.testing.assert_allclose(flow.per_example_mse(pred, target, w[:, 1:2]),
                             (plain + w[:, 1:2] * edges).mean(-1), rtol=1e-5)
  # A flat offset has no differences: the term sees only the error's spatial structure.
  np.testing.assert_allclose(flow.frame_mse(target + 0.5, target, 10.0), 0.25, rtol=1e-5)
  np.testing.assert_allclose(flow.gradient_loss_weights(jnp.asarray([0.1, 0.5, 0.51, 1.0]),
                                                        3.0, max_time=0.5), [3.0, 3.0, 0.0, 0.0])
  np.testing.assert_allclose(flow.gradient_loss_weights(jnp.asarray([0.1, 0.5, 0.51, 1.0]),
                                                        3.0, 0.5, 0.9), [0.0, 3.0, 3.0, 0.0])


def test_time_sampling_and_shift():
  t = flow.sample_time(jax.random.PRNGKey(0), 4096)
  chex.assert_shape(t, (4096,))
  assert 0 < float(t.min()) and float(t.max()) < 1
  assert float(jnp.median(t)) == pytest.approx(0.5, abs=0.03)   # logit-normal(0, 1)
  shifted = flow.sample_time(jax.random.PRNGKey(0), 4096, shift=3.0)
  assert float(jnp.median(shifted)) == pytest.approx(0.75, abs=0.03)
  times = flow.sampling_times(4, 1.0)
  np.testing.assert_allclose(times, [1, 0.75, 0.5, 0.25, 0])


def test_a_mixture_of_two_shifts_draws_each_for_its_share():
  key = jax.random.PRNGKey(1)
  assert flow.mixed_shift(key, (8,), 3.0, 6.0, 0.0) == 3.0      # off: the shift, untouched
  np.testing.assert_array_equal(flow.mixed_shift(key, (8,), 3.0, 6.0, 1.0), 6.0)
  tokens = jnp.asarray([1.0, 2.0, 4.0, 8.0])                      # per-example token shifts
  picked = flow.mixed_shift(key, (4096, 4), tokens, 10 * tokens, 0.25)
  chex.assert_shape(picked, (4096, 4))
  second = np.asarray(picked) == 10 * np.asarray(tokens)
  assert (second | (np.asarray(picked) == np.asarray(tokens))).all()
  assert second.mean() == pytest.approx(0.25, abs=0.02)
  # Training times at a 50/50 mixture of shifts 1 and 6: above 6/7 (shift 6's median)
  # half of shift 6's draws and the logit-normal(0, 1)'s share above logit(6/7) = ln 6.
  shift = flow.mixed_shift(jax.random.PRNGKey(2), (8192,), 1.0, 6.0, 0.5)
  t = np.asarray(flow.sample_time(jax.random.PRNGKey(3), 8192, shift=shift))
  above = 0.5 * 0.5 + 0.5 * 0.5 * math.erfc(math.log(6) / math.sqrt(2))
  assert (t > 6 / 7).mean() == pytest.approx(above, abs=0.015)


def test_bfloat16_compute_keeps_float32_params(config, devices):
  from test_sharding import _run  # pylint: disable=g-import-not-at-top
  config.train.compute_dtype = "bfloat16"
  losses, params, _ = _run(config, devices[:1], steps=1)
  assert np.isfinite(losses).all()
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_token_shift_grows_with_clip_size():
  np.testing.assert_allclose(flow.token_shift(jnp.asarray([256, 1024, 64]), 3.0, 256),
                             [3.0, 6.0, 1.5], rtol=1e-6)
  np.testing.assert_allclose(flow.token_shift(jnp.asarray([256, 1024]), 3.0, 0), [3.0, 3.0])


@pytest.mark.parametrize("space", ["velocity", "data"])
def test_packed_loss_is_the_mean_of_per_example_losses(data_dir, space):
  """The packed objective = each example's own flow loss (own time, own shift), averaged
  over examples whatever their sizes; padding counts nowhere. "data": a data-predicting
  model whose losses are weighted by max(t, 0.05)^2 (`flow.loss_space`)."""
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.models import embeddings  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import packed_flow_loss  # pylint: disable=g-import-not-at-top
  from helpers import PATCH, SIZES, compiled, pack, packing_examples, random_model  # pylint: disable=g-import-not-at-top

  config = make_test_config(data_dir, native=True, **{
      "flow.caption_dropout": 0.0, "data.max_examples_per_row": 4,
      "model.prediction": space, "flow.loss_space": space})
  graphdef, params = random_model(config, 20, seed=5)
  videos, captions, _ = packing_examples()
  patches, positions, seg, ids, text_seg, text_pos = pack(videos, captions)
  batch = {"patches": jnp.asarray(patches), "positions": jnp.asarray(positions),
           "segment_ids": jnp.asarray(seg), "text_ids": jnp.asarray(ids),
           "text_segment_ids": jnp.asarray(text_seg), "text_positions": jnp.asarray(text_pos)}
  key = jax.random.PRNGKey(11)
  loss, _ = packed_flow_loss(params, graphdef, batch, key, config=config)

  # The same computation, example by example, through the unpacked model.
  _, k_time, k_noise = jax.random.split(key, 3)
  counts = np.array([(seg[0] == k + 1).sum() for k in range(4)])
  shift = flow.token_shift(np.maximum(counts, 1), config.flow.shift, config.flow.shift_base_tokens)
  t = flow.sample_time(k_time, (1, 4), logit_mean=config.flow.logit_mean,
                       logit_std=config.flow.logit_std, shift=shift)
  noise = jax.random.normal(k_noise, patches.shape)[0]
  merged, call = nnx.merge(graphdef, params), compiled()
  losses = []
  for k, (video, caption) in enumerate(zip(videos, captions)):
    rows = seg[0] == k + 1
    grid = [s // p for s, p in zip(SIZES[k], PATCH)]
    x0, eps = patches[0][rows], noise[rows]
    xt = (1 - t[0, k]) * x0 + t[0, k] * eps
    text = np.zeros((1, 8), np.int32)
    text[0, :len(caption)] = caption
    v = call(merged, embeddings.unpatchify(xt[None], grid, PATCH, 3), t[:, k],
             jnp.asarray(text), jnp.asarray(text != 0))
    v = embeddings.patchify(v, PATCH)[0]
    weight = max(float(t[0, k]), flow.MIN_DATA_TIME) ** 2 if space == "data" else 1.0
    losses.append(weight * float(jnp.mean(jnp.square(v - (eps - x0)))))
  assert float(loss) == pytest.approx(np.mean(losses), rel=1e-5)
  if space == "velocity":   # every example at flow.second_shift: as flow.shift set to it
    config.flow.update(second_shift=5.0, second_shift_share=1.0)
    mixed, _ = packed_flow_loss(params, graphdef, batch, key, config=config)
    config.flow.update(shift=5.0, second_shift_share=0.0)
    plain, _ = packed_flow_loss(params, graphdef, batch, key, config=config)
    assert float(mixed) == pytest.approx(float(plain), rel=1e-6)
    assert float(plain) != pytest.approx(float(loss), rel=1e-3)


def test_frame_time_kinds():
  """`flow.sample_frame_times`: one kind per clip with the given probabilities, each with
  its shape: shared (one time), independent, non_decreasing (sorted along time),
  clean_prefix (k in [1, C-1] clean chunks, then one shared time)."""
  b, c = 4000, 4
  kinds = {"shared": 0.4, "independent": 0.2, "non_decreasing": 0.2, "clean_prefix": 0.2}
  t = np.asarray(flow.sample_frame_times(jax.random.PRNGKey(0), b, c, kinds, shift=3.0))
  chex.assert_shape(t, (b, c))
  assert (t >= 0).all() and (t < 1).all()
  shared = (t == t[:, :1]).all(1)
  prefix = (t[:, 0] == 0) & (t[:, -1] > 0)
  k = (t == 0).sum(1)
  assert ((k[prefix] >= 1) & (k[prefix] <= c - 1)).all()
  tail = np.where(t == 0, np.nan, t)
  assert np.allclose(np.nanmax(tail[prefix], 1), np.nanmin(tail[prefix], 1))
  varied = ~shared & ~prefix
  ordered = (np.diff(t, axis=1) >= 0).all(1)
  # Shared: 0.4; clean prefix: 0.2; the rest half sorted by construction, half by chance
  # (1/4! of the independent draws).
  assert shared.mean() == pytest.approx(0.4, abs=0.03)
  assert prefix.mean() == pytest.approx(0.2, abs=0.03)
  assert (varied & ordered).mean() == pytest.approx(0.2 + 0.2 / 24, abs=0.03)
  # Every drawn time is the shifted logit-normal of `sample_time` (median 0.75 at shift 3).
  assert float(np.median(t[varied])) == pytest.approx(0.75, abs=0.03)
  # A one-chunk clip is always shared; unknown kinds are refused.
  one = flow.sample_frame_times(jax.random.PRNGKey(1), 8, 1, {"clean_prefix": 1.0})
  assert (np.asarray(one) > 0).all()
  with pytest.raises(ValueError, match="frame time kinds"):
    flow.sample_frame_times(jax.random.PRNGKey(0), 2, 2, {"pyramid": 1.0})


def _random_model_and_batch(config, tokenizer):
  """`(model, params, graphdef, batch, null_ids, null_mask)`: the config's model with
  random weights and three clips of random pixels with captions."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from helpers import random_model  # pylint: disable=g-import-not-at-top
  graphdef, params = random_model(config, tokenizer.vocab_size, seed=2)
  model = nnx.merge(graphdef, params)
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.uniform(-1, 1, (3, 4, 16, 16, 3)), jnp.float32)
  ids, mask = tokenizer.encode(["a red circle moves left", "a blue square", "a green"], 16)
  null_ids, null_mask = tokenizer.encode([""], 16)
  batch = {"video": video, "text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}
  return model, params, graphdef, batch, null_ids, null_mask


@pytest.mark.parametrize("space,causal,gradient", [("velocity", 0, 0.0), ("data", 0, 0.0),
                                                   ("velocity", 1, 0.0), ("velocity", 0, 2.0)])
def test_per_frame_loss_against_a_reference(config, tokenizer, space, causal, gradient):
  """With per-frame times (`flow.frame_times`) the loss is, per clip, the mean over its
  free, noisy frames of the (weighted) velocity MSE, the transformer called with each
  token's own time; with one time for every frame, the model's output is the scalar
  path's. A block-causal model (`model.causal_frames`, Diffusion Forcing's training of an
  autoregressive model) trains through the same path, and so does the gradient-difference
  term (`flow.gradient_loss_weight`, on the frames at times up to 0.8 only)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.diffusion import conditioning  # pylint: disable=g-import-not-at-top
  from sora_jax.models.autoencoder import IdentityAutoencoder  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import flow_loss  # pylint: disable=g-import-not-at-top
  from helpers import compiled  # pylint: disable=g-import-not-at-top

  config.flow.update(caption_dropout=0.0, loss_space=space,
                     frame_times={"independent": 0.5, "clean_prefix": 0.5},
                     gradient_loss_weight=gradient, gradient_loss_max_time=0.8)
  config.model.update(prediction=space, causal_frames=causal)
  model, params, graphdef, batch, null_ids, null_mask = _random_model_and_batch(config, tokenizer)
  assert model.dit.cfg.causal_frames == causal
  video, ids, mask = batch["video"], batch["text_ids"], batch["text_mask"]
  key = jax.random.PRNGKey(3)
  loss, metrics = jax.jit(lambda params, batch: flow_loss(
      params, graphdef, batch, key, config=config, autoencoder=IdentityAutoencoder(),
      null_ids=null_ids[0], null_mask=null_mask[0]))(params, batch)

  _, k_time, k_noise = jax.random.split(key, 3)
  t = flow.sample_frame_times(k_time, 3, 2, dict(config.flow.frame_times),
                              logit_mean=config.flow.logit_mean,
                              logit_std=config.flow.logit_std, shift=config.flow.shift)
  noise = jax.random.normal(k_noise, video.shape)
  given = conditioning.sample_frame_masks(jax.random.split(jax.random.fold_in(key, 1))[0], 3,
                                          4, dict(config.conditioning.probs),
                                          config.conditioning.max_frames)
  cond = conditioning.conditioning_input(video, given, noise_level=0.0)
  t_frames = np.repeat(np.asarray(t, np.float64), 2, axis=1)                       # [3, 4]
  xt = (1 - t_frames[..., None, None, None]) * video + t_frames[..., None, None, None] * noise
  merged, call = nnx.merge(graphdef, params), compiled()
  v = call(merged, jnp.asarray(xt, jnp.float32), jnp.repeat(t, 16, axis=1), jnp.asarray(ids),
           jnp.asarray(mask), conditioning=cond)
  diff = np.asarray(v, np.float64) - (np.asarray(noise) - np.asarray(video))
  err = np.square(diff).reshape(3, 4, -1).mean(-1)
  err = err + gradient * (t_frames <= 0.8) * sum(
      np.square(np.diff(diff, axis=axis)).reshape(3, 4, -1).mean(-1) for axis in (2, 3))
  if space == "data":
    err = err * np.maximum(t_frames, flow.MIN_DATA_TIME) ** 2
  counted = ~np.asarray(given) & (t_frames > 0)
  expected = np.mean([err[i][counted[i]].mean() if counted[i].any() else 0.0 for i in range(3)])
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["clean_frames"]) == pytest.approx((t_frames == 0).mean())

  # One time for every frame: per-token times give the scalar path's velocity.
  shared = jnp.asarray([0.3, 0.6, 0.9])
  np.testing.assert_allclose(call(merged, video, jnp.repeat(shared[:, None], 32, axis=1),
                                  jnp.asarray(ids), jnp.asarray(mask), conditioning=cond),
                             call(merged, video, shared, jnp.asarray(ids), jnp.asarray(mask),
                                  conditioning=cond), rtol=2e-5, atol=2e-5)


def test_gradient_difference_term_through_the_loss(config, tokenizer):
  """Through `flow_loss` (one time per clip, frame conditioning on, as the demo trains):
  the loss grows linearly in `flow.gradient_loss_weight` from the plain loss, and a term
  kept to times no clip draws adds nothing."""
  from sora_jax.diffusion import conditioning  # pylint: disable=g-import-not-at-top
  from sora_jax.models.autoencoder import IdentityAutoencoder  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import flow_loss  # pylint: disable=g-import-not-at-top
  assert conditioning.enabled(config)
  _, params, graphdef, batch, null_ids, null_mask = _random_model_and_batch(config, tokenizer)

  def loss(weight, min_time=0.0, max_time=1.0):
    config.flow.update(gradient_loss_weight=weight, gradient_loss_min_time=min_time,
                       gradient_loss_max_time=max_time)
    return float(flow_loss(params, graphdef, batch, jax.random.PRNGKey(5), config=config,
                           autoencoder=IdentityAutoencoder(), null_ids=null_ids[0],
                           null_mask=null_mask[0])[0])
  plain, one, three = loss(0.0), loss(1.0), loss(3.0)
  assert one > plain
  assert three - plain == pytest.approx(3 * (one - plain), rel=1e-4)
  assert loss(3.0, max_time=1e-6) == pytest.approx(plain, rel=1e-6)
  # The term's window splits it: below and above a time add up to the whole.
  below, above = loss(3.0, max_time=0.6) - plain, loss(3.0, min_time=0.6) - plain
  assert below + above == pytest.approx(three - plain, rel=1e-4)


def test_non_finite_step_changes_nothing(config, devices, tokenizer):
  """A NaN batch: loss NaN, skipped = 1, and params, optimiser state and EMA unchanged."""
  from sora_jax.train.autoencoders import make_autoencoder  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  from sora_jax.train.state import create_train_state  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  tx = optim.make_optimizer(config.optim, config.train.steps)
  graphdef, state, shardings = create_train_state(config, tokenizer.vocab_size, mesh, tx)
  null_ids, null_mask = tokenizer.encode([""], config.data.text_length)
  step = make_train_step(config, graphdef, tx, shardings, mesh,
                         make_autoencoder(config.autoencoder), null_ids[0], null_mask[0])
  ids, mask = tokenizer.encode(["a red circle moves left"] * 8, config.data.text_length)
  batch = {"video": np.full((8, 4, 16, 16, 3), np.nan, np.float32), "text_ids": ids,
           "text_mask": mask}
  before = jax.device_get(state)
  after, metrics = step(state, batch)
  after = jax.device_get(after)
  assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
  for key in ("params", "opt_state", "ema"):
    jax.tree.map(np.testing.assert_array_equal, after[key], before[key])
  assert int(after["step"]) == int(before["step"]) + 1


def test_the_optimisers_numbers_are_inputs_of_the_step(config, devices, tokenizer):
  """Two runs differing in every number of the optimiser (lr, warmup, floor, number of
  steps, Adam's betas, weight decay, clip, EMA decay, a group's learning-rate factor) lower
  to one program; the first's compiled step given the second's numbers
  (`TrainStep.hyperparameters`) computes what the second's does, bit for bit, at the
  second's learning rate and EMA decay."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import copy  # pylint: disable=g-import-not-at-top
  from sora_jax.train.autoencoders import make_autoencoder  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  from sora_jax.train.state import create_train_state  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  config.optim.lr_scales = (("text_encoder", 2.0),)
  other = copy.deepcopy(config)
  other.optim.update(lr=3e-4, warmup_steps=3, min_lr_ratio=0.5, b1=0.8, b2=0.95,
                     weight_decay=0.1, grad_clip=1e-3, ema_decay=0.9,
                     lr_scales=(("text_encoder", 0.5),))
  other.train.steps = 9
  null_ids, null_mask = tokenizer.encode([""], config.data.text_length)
  ids, mask = tokenizer.encode(["a red circle moves left"] * 8, config.data.text_length)
  batch = {"video": np.random.default_rng(0).uniform(-1, 1, (8, 4, 16, 16, 3)).astype(
      np.float32), "text_ids": ids, "text_mask": mask}
  steps, states = [], []
  for c in (config, other):
    tx = optim.for_run(c)
    graphdef, state, shardings = create_train_state(c, tokenizer.vocab_size, mesh, tx)
    steps.append(make_train_step(c, graphdef, tx, shardings, mesh,
                                 make_autoencoder(c.autoencoder), null_ids[0], null_mask[0]))
    # At step 200 the EMA's warm-up, min(decay, 201 / 210), is past 0.9 and under 0.995.
    states.append({**state, "step": jax.device_put(np.int32(200), state["step"].sharding)})
  assert steps[0].lower(states[0], batch).as_text() == steps[1].lower(states[1], batch).as_text()
  ema_before = jax.device_get(states[1]["ema"])
  first_with_second = dataclasses.replace(steps[0], hyperparameters=steps[1].hyperparameters)
  got, got_metrics = first_with_second(jax.tree.map(jnp.copy, states[1]), batch)
  want, want_metrics = steps[1](states[1], batch)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
  assert float(got_metrics["learning_rate"]) == float(want_metrics["learning_rate"])
  np.testing.assert_allclose(float(want_metrics["learning_rate"]), 1.5e-4, rtol=1e-6)
  jax.tree.map(lambda e, b, p: np.testing.assert_allclose(e, 0.9 * b + 0.1 * p, rtol=1e-5,
                                                          atol=1e-7),
               jax.device_get(want["ema"]), ema_before,
               jax.device_get({k: want["params"][k] for k in ema_before}))


def test_learning_rate_multipliers_scale_their_groups_updates(config):
  """`optim.lr_scales`: a group's AdamW update is its factor times the update without it
  (its decay included), the other groups' unchanged; an unknown group, or a factor that is
  not positive, is refused."""
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  params = {"a": {"w": jnp.ones((3, 2))}, "b": {"w": jnp.full((2,), 2.0)}}
  grads = jax.tree.map(lambda x: 0.1 * x + 0.3, params)

  def first_update(**keys):
    tx = optim.make_optimizer(
        ml_collections.ConfigDict(configs.defaults("optim", warmup_steps=0, **keys)), 10)
    return tx.update(grads, tx.init(params), params)[0]

  plain, scaled = first_update(), first_update(lr_scales=(("a", 5.0),))
  np.testing.assert_allclose(scaled["a"]["w"], 5 * plain["a"]["w"], rtol=1e-6)
  np.testing.assert_array_equal(scaled["b"]["w"], plain["b"]["w"])
  assert np.abs(plain["a"]["w"]).min() > 0
  with pytest.raises(ValueError, match=r"optim.lr_scales: no parameter groups \['c'\]"):
    first_update(lr_scales=(("c", 2.0),))
  config.optim.lr_scales = (("dit", 0.0),)
  with pytest.raises(ValueError, match="optim.lr_scales=.*factor > 0"):
    configs.validate(config)


def test_frozen_groups_have_no_ema_no_moments_and_their_own_dtype(config, devices, tokenizer):
  """With `optim.frozen`, the text encoder is stored in `optim.frozen_dtype` and passes a
  step unchanged, while the EMA and AdamW's moments cover the transformer alone; with
  `optim.ema_decay=0` the state keeps no EMA; `optim.param_dtype` stores the trainable
  weights and moments in that dtype, the EMA staying float32."""
  import copy  # pylint: disable=g-import-not-at-top
  from sora_jax.train.autoencoders import make_autoencoder  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  from sora_jax.train.state import create_train_state  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)
  config.optim.update(frozen=("text_encoder",), frozen_dtype="bfloat16", warmup_steps=0)
  mesh = make_mesh({"data": 1}, devices=devices[:1])
  tx = optim.make_optimizer(config.optim, config.train.steps)
  graphdef, state, shardings = create_train_state(config, tokenizer.vocab_size, mesh, tx)
  assert set(state["ema"]) == {"dit"}
  assert {x.dtype for x in jax.tree.leaves(state["params"]["text_encoder"])} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state["params"]["dit"])} == {jnp.dtype("float32")}
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
  dit_size = sum(x.size for x in jax.tree.leaves(state["params"]["dit"]))
  assert 2 * dit_size <= moments < 2 * dit_size + 8
  null_ids, null_mask = tokenizer.encode([""], config.data.text_length)
  step = make_train_step(config, graphdef, tx, shardings, mesh,
                         make_autoencoder(config.autoencoder), null_ids[0], null_mask[0])
  ids, mask = tokenizer.encode(["a red circle moves left"] * 8, config.data.text_length)
  video = np.random.default_rng(0).uniform(-1, 1, (8, 4, 16, 16, 3)).astype(np.float32)
  before = jax.device_get(state)
  after, metrics = step(state, {"video": video, "text_ids": ids, "text_mask": mask})
  after = jax.device_get(after)
  assert float(metrics["skipped"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, after["params"]["text_encoder"],
               before["params"]["text_encoder"])
  assert any(not np.array_equal(a, b) for a, b in zip(   # (zero-initialised gates: not all)
      jax.tree.leaves(after["params"]["dit"]), jax.tree.leaves(before["params"]["dit"])))
  assert set(after["ema"]) == {"dit"}
  # No EMA at all with ema_decay 0, before and after a step; optim.param_dtype: the
  # transformer's weights and AdamW moments in bfloat16.
  config.optim.update(ema_decay=0.0, param_dtype="bfloat16")
  graphdef, state, shardings = create_train_state(config, tokenizer.vocab_size, mesh, tx)
  floats = lambda tree: {x.dtype for x in jax.tree.leaves(tree) if x.dtype != jnp.int32}  # noqa: E731
  step = make_train_step(config, graphdef, tx, shardings, mesh,
                         make_autoencoder(config.autoencoder), null_ids[0], null_mask[0])
  after, metrics = step(state, {"video": video, "text_ids": ids, "text_mask": mask})
  assert float(metrics["skipped"]) == 0.0
  for s in (state, after):
    assert s["ema"] == {}
    assert floats(s["params"]) == floats(s["opt_state"]) == {jnp.dtype(jnp.bfloat16)}
  # With an EMA, it is kept in float32 whatever the weights' dtype.
  config.optim.ema_decay = 0.999
  _, state, _ = create_train_state(config, tokenizer.vocab_size, mesh, tx)
  assert floats(state["ema"]) == {jnp.dtype(jnp.float32)}
  # optim.master_copy: bfloat16 weights, a float32 copy and float32 moments in the
  # optimiser; after a step the weights are the copy rounded.
  config.optim.update(ema_decay=0.0, master_copy=True)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  graphdef, state, shardings = create_train_state(config, tokenizer.vocab_size, mesh, tx)
  step = make_train_step(config, graphdef, tx, shardings, mesh,
                         make_autoencoder(config.autoencoder), null_ids[0], null_mask[0])
  after, metrics = step(state, {"video": video, "text_ids": ids, "text_mask": mask})
  assert float(metrics["skipped"]) == 0.0
  assert floats(after["params"]) == {jnp.dtype(jnp.bfloat16)}
  assert floats(after["opt_state"]) == {jnp.dtype(jnp.float32)}
  master = after["opt_state"].master["dit"]
  jax.tree.map(lambda p, m: np.testing.assert_array_equal(p, m.astype(jnp.bfloat16)),
               after["params"]["dit"], master)


def test_host_groups_pass_by_the_jitted_step(data_dir):
  """A frozen text encoder that the step never reads (cached text states) is kept in host
  memory and goes to the jitted step as an input that is neither donated nor returned;
  the step returns the trained groups only (`TrainStep.passed_by`)."""
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  from sora_jax.plan import planner  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, **{"optim.frozen": ("text_encoder",)})
  lowered, state, _ = planner.lower_train(config, jax.devices()[:1])
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state["params"]["text_encoder"])
          } == {"pinned_host"}
  # (state, batch, fixed, passed, the optimiser's numbers), kwargs
  (inner, _, _, passed, numbers), _ = lowered.args_info
  assert set(numbers) == {"peak", "warmup", "decay", "end", "b1", "b2", "weight_decay",
                          "grad_clip", "ema_decay", "lr_scales"}
  assert set(passed) == {"text_encoder"} and "text_encoder" not in inner["params"]
  assert not any(a.donated for a in jax.tree.leaves(passed))
  assert all(a.donated for a in jax.tree.leaves(inner["params"]))
  new_state, _ = lowered.out_info
  assert set(new_state["params"]) == set(inner["params"]) == {"dit"}


def test_accumulated_gradients_are_the_whole_batch_gradient(config, devices):
  """`train.microbatches`: the step of a per-example mean loss over 2 strided microbatches
  (on a 2-way data mesh, each microbatch spread over both shards) equals the step over the
  whole batch (same update, loss and gradient norm); the float64 gradient is the check."""
  from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import microbatch, optimizer_step  # pylint: disable=g-import-not-at-top
  mesh = make_mesh({"data": 2}, devices=devices[:2])
  config.mesh.update(data=2)
  config.optim.update(warmup_steps=0, ema_decay=0.0)
  rng = np.random.default_rng(0)
  batch = {"video": rng.normal(size=(8, 4, 16, 16, 3)).astype(np.float32),
           "text_ids": np.zeros((8, config.data.text_length), np.int32),
           "text_mask": np.ones((8, config.data.text_length), bool)}
  w0 = rng.normal(size=(4 * 16 * 16 * 3, 5)).astype(np.float32) * 0.01

  def loss_fn(params, batch, key, fixed):   # a per-example mean, no randomness
    del key, fixed
    out = batch["video"].reshape(batch["video"].shape[0], -1) @ params["dit"]["w"]
    loss = jnp.square(jnp.tanh(out) - 0.5).sum(-1).mean()
    return loss, {"loss": loss}

  tx = optim.make_optimizer(config.optim, config.train.steps)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = {"dit": {"w": w0}}      # (numpy: each run puts its own copy, then donates it)
  shardings = {"params": {"dit": {"w": replicated}},
               "opt_state": jax.tree.map(lambda _: replicated, tx.init(params)),
               "ema": {}, "step": replicated, "rng": replicated}
  results = []
  for count in (1, 2):
    config.train.microbatches = count
    step = optimizer_step(config, tx, shardings, mesh, loss_fn)
    state = {"params": params, "opt_state": tx.init(params), "ema": {},
             "step": jnp.asarray(0), "rng": jax.random.PRNGKey(0)}
    state, metrics = step(jax.device_put(state, shardings), batch)
    results.append((np.asarray(state["params"]["dit"]["w"]), float(metrics["loss"]),
                    float(metrics["grad_norm"])))
  (w1, loss1, norm1), (w2, loss2, norm2) = results
  np.testing.assert_allclose(w2, w1, atol=1e-7)
  assert loss2 == pytest.approx(loss1, rel=1e-6) and norm2 == pytest.approx(norm1, rel=1e-5)
  x = batch["video"].reshape(8, -1).astype(np.float64)
  y = np.tanh(x @ w0.astype(np.float64))
  grad = x.T @ (2 * (y - 0.5) * (1 - y ** 2)) / 8
  assert norm1 == pytest.approx(np.linalg.norm(grad), rel=1e-4)
  # Microbatch i holds rows i, i + 2, ... (strided over the batch's shards).
  rows = [microbatch({"v": np.arange(8)}, 2, i)["v"] for i in (0, 1)]
  np.testing.assert_array_equal(rows, [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_microbatches_train_in_less_memory(config, devices, tokenizer):
  """The flow step with `train.microbatches=2` trains (finite loss, parameters move) and
  compiles to fewer temporary bytes than the whole batch at once; bad values are refused
  naming the key."""
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  from sora_jax.models.autoencoder import IdentityAutoencoder  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  from sora_jax.train.state import create_train_state  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  config.optim.update(warmup_steps=0)
  config.mesh.update(data=2)
  for value, message in ((0, "train.microbatches=0 must be at least 1"),
                         (3, r"data.batch_size=8 must divide by train.microbatches x "
                             r"mesh.data x mesh.fsdp = 3 x 2")):
    config.train.microbatches = value
    with pytest.raises(ValueError, match=message):
      configs.validate(config, num_devices=2)
  mesh = make_mesh({"data": 2}, devices=devices[:2])
  tx = optim.make_optimizer(config.optim, config.train.steps)
  null_ids, null_mask = tokenizer.encode([""], config.data.text_length)
  ids, mask = tokenizer.encode(["a red circle moves left"] * 8, config.data.text_length)
  video = np.random.default_rng(0).uniform(-1, 1, (8, 4, 16, 16, 3)).astype(np.float32)
  batch = {"video": video, "text_ids": ids, "text_mask": mask}
  graphdef, state, shardings = create_train_state(config, tokenizer.vocab_size, mesh, tx)
  temporaries = {}
  for count in (1, 2):
    config.train.microbatches = count
    configs.validate(config, num_devices=2)
    step = make_train_step(config, graphdef, tx, shardings, mesh, IdentityAutoencoder(),
                           null_ids[0], null_mask[0])
    compiled = step.lower(state, batch).compile()
    temporaries[count] = compiled.memory_analysis().temp_size_in_bytes
  before = jax.device_get(state["params"]["dit"])
  after, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0.0
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(jax.device_get(after["params"]["dit"])), jax.tree.leaves(before)))
  assert 0 < temporaries[2] < temporaries[1], temporaries


@pytest.mark.parametrize("layers", ["one", "scanned_rematerialised"])
def test_self_conditioned_loss_against_a_reference(config, tokenizer, layers):
  """`model.self_condition`: at rate 1 the loss is the velocity MSE of a second pass that
  reads the first pass's clean estimate `x_t - t v` (zeros in), with no gradient through
  the first pass; at rate 0 the model reads zeros. Also with the blocks under NNX's scan
  and rematerialisation, which the first pass (inside a `lax.cond`) runs too."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.models.autoencoder import IdentityAutoencoder  # pylint: disable=g-import-not-at-top
  from sora_jax.train.state import build_model  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import flow_loss  # pylint: disable=g-import-not-at-top

  config.flow.update(caption_dropout=0.0)
  config.conditioning.probs = {"none": 1.0}
  config.model.self_condition = True
  if layers == "scanned_rematerialised":
    config.model.update(depth=2, scan_layers=True, remat="full")
  model, params, graphdef, batch, null_ids, null_mask = _random_model_and_batch(config, tokenizer)
  chex.assert_shape(model.dit.patch_embed.kernel, (2 * 4 * 4 * 6, None))
  video, ids, mask = batch["video"], batch["text_ids"], batch["text_mask"]
  key = jax.random.PRNGKey(3)
  _, k_time, k_noise = jax.random.split(key, 3)
  t = flow.sample_time(k_time, 3, logit_mean=config.flow.logit_mean,
                       logit_std=config.flow.logit_std, shift=config.flow.shift)
  noise = jax.random.normal(k_noise, video.shape)
  xt = flow.interpolate(video, noise, t)

  def reference(p, estimate):
    merged = nnx.merge(graphdef, p)
    v = merged.dit(xt, t, merged.encode_text(ids, mask), mask, self_condition=estimate)
    return jnp.mean(jnp.square(v - (noise - video)))

  def loss_at(rate):
    def loss(p):
      config.flow.self_condition_rate = rate
      return flow_loss(p, graphdef, batch, key, config=config,
                       autoencoder=IdentityAutoencoder(), null_ids=null_ids[0],
                       null_mask=null_mask[0])[0]
    return loss

  zeros = jnp.zeros_like(video)
  at_one, at_zero = loss_at(1.0), loss_at(0.0)

  @jax.jit
  def everything(p):   # one compiled program
    merged = nnx.merge(graphdef, p)
    first = merged.dit(xt, t, merged.encode_text(ids, mask), mask, self_condition=zeros)
    estimate = jax.lax.stop_gradient(flow.clean_estimate(xt, first, t))
    return (first, estimate, jax.value_and_grad(at_one)(p),
            jax.value_and_grad(reference)(p, estimate), at_zero(p), reference(p, zeros))

  first, estimate, (loss, grads), (expected_loss, expected), loss_zero, expected_zero = (
      everything(params))
  np.testing.assert_allclose(
      estimate, np.asarray(xt, np.float64) - np.asarray(t, np.float64)[:, None, None, None, None]
      * np.asarray(first, np.float64), rtol=1e-5, atol=1e-5)
  assert float(loss) == pytest.approx(float(expected_loss), rel=1e-5)
  # The gradient is the second pass's alone: the estimate is held fixed.
  chex.assert_trees_all_close(grads, expected, rtol=1e-4, atol=1e-6)
  assert float(loss_zero) == pytest.approx(float(expected_zero), rel=1e-5)
  config.model.self_condition = False
  plain = nnx.eval_shape(lambda: build_model(config, tokenizer.vocab_size, nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no self-conditioning input"):
    plain.dit(xt, t, jnp.zeros((3, 16, 32)), mask, self_condition=zeros)


def test_truncated_time_sampling_is_the_distribution_cut_to_its_range():
  """`sample_time(within=(lo, hi))`: every time in `[lo, hi)`, distributed as the
  whole range's times that fall there (against rejection from the whole range's draws)."""
  whole = np.asarray(flow.sample_time(jax.random.PRNGKey(0), 400_000, shift=6.0))
  for lo, hi in ((0.0, 0.3), (0.3, 1.0), (0.2, 0.6)):
    cut = np.asarray(flow.sample_time(jax.random.PRNGKey(1), 100_000, shift=6.0,
                                      within=(lo, hi)))
    assert lo <= cut.min() and cut.max() < hi
    kept = whole[(whole >= lo) & (whole < hi)]
    np.testing.assert_allclose(np.quantile(cut, [0.1, 0.5, 0.9]),
                               np.quantile(kept, [0.1, 0.5, 0.9]), atol=0.01)
  np.testing.assert_allclose(flow.unshift_time(flow.shift_time(jnp.asarray([0.1, 0.7]), 6.0),
                                               6.0), [0.1, 0.7], rtol=1e-6)


@pytest.mark.parametrize("expert", ["", "low", "high"])
def test_two_experts_train_each_on_its_own_times(config, tokenizer, expert):
  """Two experts (`model.boundary`, Wan 2.2): with `train.expert` '' each clip's loss is
  its own time's expert's (a reference that runs both and picks per clip, and its
  gradient); 'low' / 'high' draw the times of one side of the boundary and run that expert
  alone (the loss against the same reference), the other expert and the text encoder
  fixed."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.models.autoencoder import IdentityAutoencoder  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import flow_loss  # pylint: disable=g-import-not-at-top

  config.flow.update(caption_dropout=0.0)
  config.conditioning.probs = {"none": 1.0}
  key = jax.random.PRNGKey(3)
  _, k_time, k_noise = jax.random.split(key, 3)
  whole = flow.sample_time(k_time, 3, shift=config.flow.shift)
  boundary = float(np.sort(np.asarray(whole))[1])        # one clip below, two at or above
  config.model.boundary = boundary
  config.train.expert = expert
  _, params, graphdef, batch, null_ids, null_mask = _random_model_and_batch(config, tokenizer)
  video, ids, mask = batch["video"], batch["text_ids"], batch["text_mask"]
  t = flow.sample_time(k_time, 3, shift=config.flow.shift, within={
      "": (0.0, 1.0), "low": (0.0, boundary), "high": (boundary, 1.0)}[expert])
  assert (expert != "low" or float(t.max()) < boundary) and (
      expert != "high" or float(t.min()) >= boundary)
  noise = jax.random.normal(k_noise, video.shape)
  xt = flow.interpolate(video, noise, t)

  def reference(p):
    merged = nnx.merge(graphdef, p)
    text = merged.encode_text(ids, mask)
    per_clip = {name: jnp.mean(jnp.square(getattr(merged, name)(xt, t, text, mask)
                                          - (noise - video)), axis=(1, 2, 3, 4))
                for name in ("dit", "low_noise_dit")}
    return jnp.mean(jnp.where(t >= boundary, per_clip["dit"], per_clip["low_noise_dit"]))

  def loss(p):
    return flow_loss(p, graphdef, batch, key, config=config, autoencoder=IdentityAutoencoder(),
                     null_ids=null_ids[0], null_mask=null_mask[0])[0]

  fixed = {"": (), "low": ("dit", "text_encoder"), "high": ("low_noise_dit", "text_encoder")}
  assert optim.frozen_groups(config) == fixed[expert]
  if expert:       # one expert runs: the loss (its gradient is the both-experts case's)
    value, expected = jax.jit(lambda p: (loss(p), reference(p)))(params)
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    return
  (value, grads), (expected, expected_grads) = jax.jit(
      lambda p: (jax.value_and_grad(loss)(p), jax.value_and_grad(reference)(p)))(params)
  assert float(value) == pytest.approx(float(expected), rel=1e-5)
  chex.assert_trees_all_close(grads, expected_grads, rtol=1e-3, atol=1e-4)
