"""Rectified flow: the straight path between data and noise (pure functions).

Convention (as in SD3 and Wan 2.1): `x_t = (1 - t) * x_0 + t * noise`, t in [0, 1],
t = 1 is pure noise; the model predicts the velocity `dx_t/dt = noise - x_0`.
Sampling integrates from t = 1 down to t = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """`x_t` for data `x0 [B, ...]`, noise of the same shape and times `t` over x0's
  leading axes (`[B]` per example, or `[B, N]` per token of packed rows)."""
  t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim)).astype(x0.dtype)
  return (1 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The velocity of the straight path: `noise - x0`."""
  return noise - x0


def clean_estimate(x: jax.Array, velocity: jax.Array, t: jax.Array) -> jax.Array:
  """The clean video `x - t v` a velocity implies at `x [B, ...]` and times `t [B]`."""
  t = t.astype(velocity.dtype).reshape(t.shape + (1,) * (x.ndim - t.ndim))
  return x - t * velocity


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """SD3's timestep shift `s t / (1 + (s - 1) t)`; shift > 1 spends more time at high noise."""
  return shift * t / (1 + (shift - 1) * t)


def token_shift(num_tokens: jax.Array | int, shift: float | jax.Array,
                base_tokens: int) -> jax.Array:
  """Timestep shift for a clip of `num_tokens` tokens: `shift * sqrt(num_tokens / base_tokens)`
  (`shift` a float, or an array broadcastable with `num_tokens`: one per example).

  Larger clips keep more of their signal at a given noise level, so they need noisier
  times (SD3's resolution-dependent shift, also used by Open-Sora). `base_tokens` <= 0
  turns the dependence off (the shift is `shift` for every size).
  """
  if base_tokens <= 0:
    return jnp.asarray(shift, jnp.float32) * jnp.ones_like(jnp.asarray(num_tokens, jnp.float32))
  return shift * jnp.sqrt(jnp.asarray(num_tokens, jnp.float32) / base_tokens)


def unshift_time(t: jax.Array, shift: float | jax.Array) -> jax.Array:
  """The inverse of `shift_time`: `t / (s - (s - 1) t)`."""
  return t / (shift - (shift - 1) * t)


def sample_time(key: jax.Array, batch: int | tuple[int, ...], *, logit_mean: float = 0.0,
                logit_std: float = 1.0, shift: float | jax.Array = 1.0,
                within: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
  """Logit-normal training times of shape `batch`: `sigmoid(N(mean, std))`, then shifted
  (`shift` may be an array broadcastable to that shape, e.g. per-example token shifts).

  `within = (lo, hi)`: the same distribution restricted to `[lo, hi)` (one expert's
  times, `train.expert`), drawn by its inverse CDF between the CDF's values at the ends;
  the whole range draws as before."""
  shape = (batch,) if isinstance(batch, int) else tuple(batch)
  lo, hi = within
  if (lo, hi) == (0.0, 1.0):
    t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, shape))
    return shift_time(t, shift)

  def cdf(end: float) -> jax.Array:        # P(time < end), per shift
    unshifted = unshift_time(jnp.float32(end), jnp.asarray(shift, jnp.float32))
    return jax.scipy.special.ndtr((jax.scipy.special.logit(unshifted) - logit_mean)
                                  / logit_std)
  a, b = cdf(lo), cdf(hi)
  p = a + (b - a) * jax.random.uniform(key, shape)
  p = jnp.clip(p, jnp.maximum(a, 1e-7), jnp.minimum(b, 1.0 - 1e-7))
  t = jax.nn.sigmoid(logit_mean + logit_std * jax.scipy.special.ndtri(p))
  return jnp.clip(shift_time(t, shift), lo, hi)


def mixed_shift(key: jax.Array, shape: tuple[int, ...], shift: float | jax.Array,
                second_shift: float | jax.Array, second_share: float) -> float | jax.Array:
  """Time shifts of `shape` (one per example): `second_shift` with probability
  `second_share`, else `shift` (each a float or an array broadcastable to `shape`; the
  training step scales the result per clip size, `token_shift`): training times from a
  mixture of two shifted logit-normals,
  one weighted to high noise (where the layout and motion are decided), one to the details.
  `shift` itself, unchanged, when `second_share` is 0."""
  if second_share <= 0:
    return shift
  pick = jax.random.bernoulli(key, second_share, shape)
  return jnp.where(pick, jnp.asarray(second_shift, jnp.float32), jnp.asarray(shift, jnp.float32))


# Per-frame training times (diffusion forcing: Chen et al. 2024; SkyReels-V2): how the flow
# times of a clip's temporal chunks (a chunk: the latent frames of one temporal patch) are
# drawn, one kind per clip:
#   shared:          one time for the whole clip (the usual objective)
#   independent:     each chunk its own logit-normal time
#   non_decreasing:  independent draws sorted along time: the past never noisier than the
#                    future (what an autoregressive sampler shows the model)
#   clean_prefix:    the first k chunks clean (t = 0), the rest at one shared time, k
#                    uniform in [1, chunks - 1]: extension's given frames as flow times
FRAME_TIMES = ("shared", "independent", "non_decreasing", "clean_prefix")


def sample_frame_times(key: jax.Array, batch: int, chunks: int, kinds: dict[str, float], *,
                       logit_mean: float = 0.0, logit_std: float = 1.0,
                       shift: float | jax.Array = 1.0) -> jax.Array:
  """Training times `[batch, chunks]`, one `FRAME_TIMES` kind per clip drawn with the
  probabilities `kinds` (kind -> weight); every drawn time is logit-normal and shifted as
  `sample_time`'s (`shift` broadcastable to `[batch, 1]`). A one-chunk clip is always
  "shared" (clean_prefix needs two chunks)."""
  unknown = set(kinds) - set(FRAME_TIMES)
  if unknown:
    raise ValueError(f"frame time kinds {sorted(unknown)}: expected some of {FRAME_TIMES}.")
  k_kind, k_shared, k_each, k_prefix = jax.random.split(key, 4)
  shift = jnp.reshape(jnp.asarray(shift, jnp.float32), (-1, 1))
  shared = jnp.broadcast_to(sample_time(k_shared, (batch, 1), logit_mean=logit_mean,
                                        logit_std=logit_std, shift=shift), (batch, chunks))
  each = sample_time(k_each, (batch, chunks), logit_mean=logit_mean, logit_std=logit_std,
                     shift=shift)
  prefix = jax.random.randint(k_prefix, (batch, 1), 1, max(chunks, 2))
  clean_prefix = jnp.where(jnp.arange(chunks)[None] < prefix, 0.0, shared)
  options = jnp.stack([shared, each, jnp.sort(each, axis=1), clean_prefix])  # [4, B, C]
  weights = jnp.asarray([float(kinds.get(k, 0.0)) for k in FRAME_TIMES], jnp.float32)
  if chunks < 2:
    weights = weights.at[1:].set(0.0).at[0].set(1.0)
  kind = jax.random.categorical(k_kind, jnp.log(weights), shape=(batch,))
  return jnp.take_along_axis(options, kind[None, :, None], axis=0)[0]


def times_per_token(chunk_times: jax.Array, latent_shape, patch) -> jax.Array:
  """Flow times per temporal patch position `[B, T'/pt]` -> one per token `[B, N]`
  (the patch grid's raster order: t, then h, w) of latents `latent_shape` = (T', H', W')
  patchified by `patch` = (pt, ph, pw)."""
  _, ph, pw = patch
  return jnp.repeat(chunk_times, (latent_shape[1] // ph) * (latent_shape[2] // pw), axis=1)


def frame_times_shared(kinds: dict[str, float]) -> bool:
  """Whether `kinds` draws only shared times (the usual objective: `sample_time`)."""
  return all(w == 0 for k, w in kinds.items() if k != "shared")


# How sampling spaces its `steps + 1` times before the shift (T = 1000 training steps):
#   uniform:          linspace(1, 0, steps + 1)
#   flow_match_euler: linspace(1, shift(1/T), steps), then 0 (diffusers' FlowMatchEuler-
#                     DiscreteScheduler, which shifts its last training time and then the
#                     whole schedule)
#   flow_sigmas:      linspace(1, 1/T, steps + 1) without its last, then 0 (diffusers'
#                     UniPCMultistepScheduler with use_flow_sigmas: Wan 2.1's release)
SCHEDULES = ("uniform", "flow_match_euler", "flow_sigmas")


def sampling_times(steps: int, shift: float | jax.Array = 1.0,
                   schedule: str = "uniform") -> jax.Array:
  """`[steps + 1]` decreasing times from (about) 1 to 0 for an ODE solver, shifted."""
  if schedule == "uniform":
    base = jnp.linspace(1.0, 0.0, steps + 1)
  elif schedule == "flow_match_euler":
    last = shift_time(jnp.asarray(1e-3), shift)
    base = jnp.concatenate([jnp.linspace(1.0, last, steps), jnp.zeros((1,))])
  elif schedule == "flow_sigmas":
    base = jnp.concatenate([jnp.linspace(1.0, 1e-3, steps + 1)[:-1], jnp.zeros((1,))])
  else:
    raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}.")
  return shift_time(base, shift)


# The smallest flow time a data prediction is divided by (JiT's clip of the noise level).
MIN_DATA_TIME = 0.05
LOSS_SPACES = ("velocity", "data")


def data_to_velocity(data: jax.Array, noisy: jax.Array, t: jax.Array) -> jax.Array:
  """The flow velocity `(x_t - x_0) / max(t, MIN_DATA_TIME)` of a data prediction.

  Args:
    data: predicted clean values `[B, N, P]`; noisy: x_t's values `[B, N, P]`.
    t: flow times broadcastable to `[B, N]` (per token, or `[B, 1]` per example).
  """
  t = jnp.maximum(t.astype(jnp.float32), MIN_DATA_TIME)[..., None]
  velocity = (noisy.astype(jnp.float32) - data.astype(jnp.float32)) / t
  return velocity.astype(data.dtype)


def loss_weights(t: jax.Array, space: str) -> jax.Array:
  """Per-example weights of the velocity MSE, for times `t` of any shape.

  "velocity": 1 (the MSE of velocities). "data": `max(t, MIN_DATA_TIME)^2`, which makes it
  the MSE of the implied clean video `x_t - t v` (for a data-predicting model, exactly its
  own error): low-noise times no longer outweigh the high-noise ones, where a clip's layout
  and motion are decided, by up to 1 / MIN_DATA_TIME^2.
  """
  if space == "velocity":
    return jnp.ones_like(t, jnp.float32)
  if space == "data":
    return jnp.square(jnp.maximum(t.astype(jnp.float32), MIN_DATA_TIME))
  raise ValueError(f"loss space {space!r}: expected one of {LOSS_SPACES}.")


def per_example_mse(prediction: jax.Array, target: jax.Array,
                    gradient_weights: jax.Array | float | None = None) -> jax.Array:
  """Mean squared error per example, `[B]`, in float32; with `gradient_weights`, of
  videos `[B, T, H, W, C]`, the mean over frames of `frame_mse`'s."""
  if gradient_weights is not None:
    return frame_mse(prediction, target, gradient_weights).mean(-1)
  err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  return err.reshape(err.shape[0], -1).mean(-1)


def frame_mse(prediction: jax.Array, target: jax.Array,
              gradient_weights: jax.Array | float | None = None) -> jax.Array:
  """Mean squared error per frame `[B, T]` of videos `[B, T, H, W, C]`, in float32.

  With `gradient_weights` (broadcasting to `[B, T]`: a number, or `gradient_loss_weights`
  of the times), each frame's plus that weight times the gradient-difference loss: the
  MSE of the differences between neighbouring pixels along H, plus that along W. In
  Fourier terms it weighs the error at spatial frequency (kx, ky) by
  `1 + w (4 sin^2(kx / 2) + 4 sin^2(ky / 2))` (up to `1 + 8 w` at the highest) where the
  plain MSE weighs all alike: an outline's corners count, not only its mean colour.
  The minimiser is the same (a difference is linear), the training signal is not.
  """
  error = prediction.astype(jnp.float32) - target.astype(jnp.float32)

  def per_frame(a):
    return a.reshape(a.shape[:2] + (-1,)).mean(-1)
  mse = per_frame(jnp.square(error))
  if gradient_weights is None:
    return mse
  edges = sum(per_frame(jnp.square(jnp.diff(error, axis=axis))) for axis in (2, 3))
  return mse + jnp.asarray(gradient_weights, jnp.float32) * edges


def gradient_loss_weights(t: jax.Array, weight: float, min_time: float = 0.0,
                          max_time: float = 1.0) -> jax.Array:
  """Weights of `frame_mse`'s gradient term for flow times `t` of any shape: `weight`
  where `min_time <= t <= max_time`, 0 elsewhere."""
  t = t.astype(jnp.float32)
  return jnp.where((t >= min_time) & (t <= max_time), jnp.float32(weight), 0.0)
