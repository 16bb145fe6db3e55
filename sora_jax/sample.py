"""The jitted sampler: text -> video by integrating the flow with classifier-free guidance.

The whole loop (text encoding, every solver step with guidance, the decoder) is one
`jax.jit`-compiled function per (batch, frames, height, width, steps, guidance, solver);
`Sampler` caches the compiled functions. Each sample's noise comes from its own seed,
so a (prompt, seed) pair gives the same video whatever batch it is drawn in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from sora_jax import configs
from sora_jax.data.camera import CAMERA_VALUES, camera_input
from sora_jax.data.pipeline import normalise_video
from sora_jax.data.pipeline import to_uint8
from sora_jax.diffusion import conditioning
from sora_jax.diffusion import flow, step_cache
from sora_jax.diffusion.solvers import CALLS_PER_STEP, SOLVERS
from sora_jax.interop.lora import merge_lora_files
from sora_jax.models.autoencoder import Autoencoder
from sora_jax.models.autoencoder import IdentityAutoencoder
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.tokenizer import Tokenizer
from sora_jax.models.trace_levels import rebuilt_per_call
from sora_jax.parallel.sharding import activation_sharding
from sora_jax.train.autoencoders import make_autoencoder
from sora_jax.train.restore import restore_params


def initial_noise(seeds: jax.Array, shape: Sequence[int], stream: int = 0) -> jax.Array:
  """`[B, *shape]` standard normal noise, row i drawn from `PRNGKey(seeds[i])` (folded
  with `stream` when it is not 0: other noise of the same example)."""
  def draw(seed):
    key = jax.random.PRNGKey(seed)
    return jax.random.normal(jax.random.fold_in(key, stream) if stream else key, tuple(shape))
  return jax.vmap(draw)(seeds)


STEP_STREAM = 2    # `initial_noise` streams: 0 the initial noise, 1 given frames' noise


def step_noise(seeds: jax.Array, shape: Sequence[int], step: jax.Array) -> jax.Array:
  """`[B, *shape]` standard normal noise of a stochastic solver's step `step` (traced),
  row i from `PRNGKey(seeds[i])` like its initial noise (a stream of its own): a video's
  noise depends on its seed alone, not on the batch it is sampled in."""
  def draw(seed):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), STEP_STREAM), step)
    return jax.random.normal(key, tuple(shape))
  return jax.vmap(draw)(seeds)


def fill_free_frames(video: jax.Array, given: jax.Array) -> jax.Array:
  """Replaces each free frame of `video [B, T, H, W, C]` by the nearest given frame
  (`given [B, T]` bool, at least one True per row), so that an autoencoder sees a
  plausible clip around the given frames."""
  idx = jnp.arange(video.shape[1])
  dist = jnp.abs(idx[:, None] - idx[None, :]) + jnp.where(given[:, None, :], 0, 10 ** 6)
  nearest = jnp.argmin(dist, axis=-1)                                        # [B, T]
  return jnp.take_along_axis(video, nearest[:, :, None, None, None], axis=1)


def edit_start(steps: int, strength: float) -> int:
  """Where SDEdit starts in the `steps`-step schedule: the index of its time that leaves
  the last `max(1, round(strength * steps))` steps to run (0 at strength 1)."""
  return steps - max(1, min(steps, round(strength * steps)))


def edit_times(steps: int, shift: float, strength: float, schedule: str = "uniform") -> jax.Array:
  """The tail of the `steps`-step schedule that SDEdit runs (`edit_start`)."""
  return flow.sampling_times(steps, shift, schedule)[edit_start(steps, strength):]


def guided_velocity(model, text: jax.Array, mask: jax.Array, null_text: jax.Array,
                    null_mask: jax.Array, cond: jax.Array | None, *, cfg_scale: float,
                    image_scale: float, interval: tuple[float, float],
                    image: jax.Array | None = None, cfg_scale_low: float = 0.0,
                    replaced: tuple[jax.Array, jax.Array] | None = None,
                    cache_skips: Sequence[bool] | None = None,
                    latent_shape: Sequence[int] | None = None,
                    record_norms: bool = False, step_size: float = 0.0,
                    camera: jax.Array | None = None,
                    option_values: dict[str, jax.Array] | None = None):
  """The guided velocity `v(x [B, ...], t [B])` (pure; used inside the solvers).

  Without given frames: `v_u + s (v_c - v_u)` over text (s = cfg_scale). With given
  frames `cond`: `v(none) + s_img (v(img) - v(none)) + s (v(img, text) - v(img))`, where
  `img` drops the text and `none` drops the text and the given frames (s_img =
  image_scale; passes that a scale of 1 makes unnecessary are skipped). Outside
  `interval` (lo, hi) of flow times the plain conditional velocity is used (guidance
  only where it helps). Every pass runs in one batched call. `image [B, I, D_img]`:
  image-encoder states for a transformer with an image branch, the same in every pass.

  A model with two experts (`model.low_noise_dit`, Wan 2.2) runs `model.dit` at flow
  times >= `model.boundary` and the low-noise expert below, guided by `cfg_scale_low`
  (0: cfg_scale); one `lax.cond` per evaluation picks the expert.

  `replaced = (latent [B, T', H', W', C], frames [B, T'] bool)` is the "replace"
  conditioning scheme (Wan 2.2 TI2V's): before every evaluation those latent frames of
  `x` are replaced by `latent`, and their tokens run at flow time 0 (a time per token).

  `cache_skips` (one bool per evaluation of the schedule, `step_cache.skip_schedule`)
  turns on step caching: the result is then `(velocity, state)`, a velocity with state
  (`velocity(x, t, state) -> (v, state)`, for the solvers' `state`) and its initial
  state `(count, residual, norms, owner)`: evaluation `count` reuses the blocks' last
  `residual` where `cache_skips` says so and the expert that computed it (`owner`) runs
  again (one `lax.switch`); with `record_norms`, `norms [E]` records each evaluation's
  residual norm (calibration; else it stays 0). `latent_shape` `(T', H', W', C)` sizes
  the state.

  A distilled student (`sora_jax.train.distill`) runs one pass: with a guidance input,
  `cfg_scale` is that input; with a step input (a shortcut student, its guidance folded
  in), `step_size` is its step (the solver's uniform steps, 1 / steps).

  `camera [B, T, H, W, 6]`: camera rays for a transformer with a camera input, the same
  in every pass (CameraCtrl's guidance keeps the camera in the unconditional pass).

  `option_values` (`SamplingOptions.traced_values`: scalars `cfg_scale`,
  `image_cfg_scale`, `cfg_scale_low` and the pair `guidance_interval`, traced in a
  compiled sampler) are the scales and interval the guidance computes with; the Python
  scales above then only decide which passes run (whether each is 1) and `interval` is
  unused, so one program serves every value (`SamplingOptions.structure`). None: the
  Python scales and `interval` are the values.

  A self-conditioning transformer (`model.self_condition`) also gives a velocity with
  state: the state is each pass's clean-video estimate `x - t v` of the last evaluation
  `[P * B, ...]` (zeros before the first), which the next evaluation's pass reads as its
  self-conditioning input (Chen et al. 2022); with two experts, whichever expert made it.
  """
  b = text.shape[0]
  self_conditioning = model.dit.cfg.self_condition
  if self_conditioning and cache_skips is not None:
    raise ValueError("a self-conditioning transformer (model.self_condition) samples "
                     "without step caching.")
  null_text = jnp.broadcast_to(null_text, text.shape)
  null_mask = jnp.broadcast_to(null_mask, mask.shape)
  scales = option_values or {"cfg_scale": cfg_scale, "image_cfg_scale": image_scale,
                             "cfg_scale_low": cfg_scale_low or cfg_scale,
                             "guidance_interval": interval}
  student = model.dit.cfg.guidance_embedding or model.dit.cfg.step_embedding
  image_guided = cond is not None and image_scale != 1.0
  if student and image_guided:
    raise ValueError(f"image_cfg_scale={image_scale}: a distilled student samples in one "
                     "pass (no guidance of given frames); use 1.")
  passes = {"full": (text, mask, cond)}
  if not student and (cfg_scale != 1.0 or image_guided or (cfg_scale_low or cfg_scale) != 1.0):
    passes["image"] = (null_text, null_mask, cond)            # text dropped, frames kept
  if image_guided:
    passes["none"] = (null_text, null_mask, jnp.zeros_like(cond))
  n = len(passes)
  texts = jnp.concatenate([p[0] for p in passes.values()])
  masks = jnp.concatenate([p[1] for p in passes.values()])
  conds = None if cond is None else jnp.concatenate([p[2] for p in passes.values()])
  extra = {} if image is None else {"image": jnp.concatenate([image] * n)}
  if camera is not None:     # camera rays [B, T, H, W, 6]: the same camera in every pass
    extra["camera"] = jnp.concatenate([camera] * n)

  def expert(module, scale: float):
    """`(velocity, call, inputs, guide)` of one transformer. The solvers call these
    inside a lax loop: the transformer is made again there (`call`;
    `models.trace_levels`)."""
    module_here = rebuilt_per_call(module)

    def inputs(x, t):
      times = t
      if replaced is not None:
        latent, frames = replaced
        x = jnp.where(frames[:, :, None, None, None], latent.astype(x.dtype), x)
        times = frozen_token_times(t, frames, x.shape[1:4], module.cfg.patch)
      return jnp.concatenate([x] * n), jnp.concatenate([times] * n)

    scalars = {}
    if module.cfg.guidance_embedding:
      scalars["guidance"] = jnp.full((n * b,), scale, jnp.float32)
    if module.cfg.step_embedding:
      scalars["step_size"] = jnp.full((n * b,), step_size, jnp.float32)

    def call(xs, times, **kwargs):
      return module_here()(xs, times, texts, masks, conditioning=conds, **extra, **scalars,
                           **kwargs)

    def guide(v, t):
      out = {name: v[i * b:(i + 1) * b] for i, name in enumerate(passes)}
      full = out["full"]
      if n == 1:
        return full
      image = out["image"]
      guided = image + scale * (full - image)
      if "none" in out:
        guided = guided + (scales["image_cfg_scale"] - 1.0) * (image - out["none"])
      lo, hi = scales["guidance_interval"]
      return jnp.where((t[0] >= lo) & (t[0] <= hi), guided, full)

    def velocity(x, t):
      return guide(call(*inputs(x, t)), t)

    return velocity, call, inputs, guide

  high, call, inputs, guide = expert(model.dit, scales["cfg_scale"])
  experts = [(call, guide)]
  if getattr(model, "low_noise_dit", None) is not None:
    low, low_call, _, low_guide = expert(model.low_noise_dit, scales["cfg_scale_low"])
    experts.append((low_call, low_guide))
  boundary = getattr(model, "boundary", 0.0)
  if self_conditioning:
    def conditioned_pass(call, guide):
      def run(x, t, estimate):
        xs, times = inputs(x, t)
        v = call(xs, times, self_condition=estimate)
        return (guide(v, t),
                flow.clean_estimate(xs, v, jnp.concatenate([t] * n)).astype(x.dtype))
      return run
    passes_of = [conditioned_pass(*e) for e in experts]
    estimates = jnp.zeros((n * b,) + tuple(latent_shape), jnp.float32)
    if len(passes_of) == 1:
      return passes_of[0], estimates

    def self_conditioned(x, t, estimate):
      return jax.lax.cond(t[0] >= boundary, passes_of[0], passes_of[1], x, t, estimate)

    return self_conditioned, estimates

  if cache_skips is not None:
    return _cached_velocity(experts, boundary, inputs, cache_skips, b, latent_shape,
                            record_norms)
  if len(experts) == 1:
    return high

  def velocity(x, t):
    return jax.lax.cond(t[0] >= boundary, high, low, x, t)

  return velocity


def _cached_velocity(experts: Sequence[tuple[Any, Any]], boundary: float, inputs,
                     cache_skips: Sequence[bool], batch: int, latent_shape: Sequence[int],
                     record_norms: bool):
  """`(velocity with state, initial state)` of step caching (see `guided_velocity`).

  `experts`: `(call, guide)` of each transformer, the high-noise one first (a second one
  runs below flow time `boundary`). The state `(count, residual, norms, owner)` records
  which expert computed the cached residual: an evaluation reuses it only where the
  schedule says so and the same expert runs (never across the switch)."""
  table = jnp.asarray(cache_skips, bool)
  evaluations = table.shape[0]

  def branches(xs, times):
    """compute and reuse for each expert, in `lax.switch` order (2 e + reuse)."""
    out = []
    for call, _ in experts:
      out.append(lambda residual, call=call: call(xs, times, return_residual=True))
      out.append(lambda residual, call=call: (
          call(xs, times, block_residual=residual, return_residual=True)[0], residual))
    return out

  def velocity(x, t, state):
    count, residual, norms, owner = state
    xs, times = inputs(x, t)
    which = (t[0] < boundary).astype(jnp.int32) if len(experts) > 1 else jnp.int32(0)
    skip = (table[jnp.minimum(count, evaluations - 1)] & (count < evaluations)
            & (owner == which))
    v, residual = jax.lax.switch(2 * which + skip.astype(jnp.int32), branches(xs, times),
                                 residual)
    if record_norms:
      norm = jnp.sqrt(jnp.sum(jnp.square(residual.astype(jnp.float32))))
      norms = norms.at[jnp.minimum(count, evaluations - 1)].set(norm)
    guided = experts[0][1](v, t)
    for index, (_, guide) in enumerate(experts[1:], start=1):
      guided = jnp.where(which == index, guide(v, t), guided)
    return guided, (count + 1, residual, norms, which)

  x = jax.ShapeDtypeStruct((batch,) + tuple(latent_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  residual = jax.eval_shape(
      lambda x, t: experts[0][0](*inputs(x, t), return_residual=True)[1], x, t)
  state = (jnp.zeros((), jnp.int32), jnp.zeros(residual.shape, residual.dtype),
           jnp.zeros((evaluations,), jnp.float32), jnp.int32(-1))
  return velocity, state


def _reporting(velocity, on_evaluation: Callable[[Any], None]):
  """`velocity` (with or without state) that calls `on_evaluation(t)` on the host first."""

  def reported(x, t, *state):
    jax.debug.callback(on_evaluation, t)
    return velocity(x, t, *state)

  return reported


def frozen_token_times(t: jax.Array, frames: jax.Array, latent_grid: Sequence[int],
                       patch: Sequence[int]) -> jax.Array:
  """Flow time per token `[B, N]` (the patch grid's raster order): `t [B]` everywhere but
  on the tokens of the latent frames `frames [B, T']` (True), which are at time 0.
  `latent_grid` is `(T', H', W')`, `patch` the transformer's `(pt, ph, pw)`."""
  pt, ph, pw = patch
  frames_t, height, width = latent_grid
  per_frame = jnp.where(frames, 0.0, t[:, None].astype(jnp.float32))        # [B, T']
  per_patch_frame = per_frame.reshape(per_frame.shape[0], frames_t // pt, pt).max(-1)
  return jnp.repeat(per_patch_frame, (height // ph) * (width // pw), axis=1)


def reconstruction_guided(velocity, autoencoder: Autoencoder, given_latent: jax.Array,
                          latent_given: jax.Array, given_video: jax.Array,
                          given_frames: jax.Array, weight: float):
  """`velocity` corrected towards decoding the given frames as given (pure).

  Reconstruction guidance (Ho et al. 2022, "Video Diffusion Models", in its clean-estimate
  form). A causal autoencoder decodes the first frame of a latent frame partly from the
  latent frames before it, so given frames that follow generated ones (the end of a
  connecting window, a backward extension) come back from the decoder only as well as
  the generated latents lead into them; this pulls the generated latents until they do.

  At each evaluation the clean estimate `x0 = x - t v` (given latent frames put back) is
  decoded, and the velocity gains `weight * t` times the gradient, over `x0`'s free latent
  frames, of the given pixels' squared error (per example: summed, and divided by the
  number of given frames and of pixel values per latent position, so that one weight
  carries across sizes). The factor `t` fades the correction out where a shifted schedule
  takes its largest steps (t near 0), which keeps explicit solvers stable over a range of
  step counts. The stable range of `weight` depends on the decoder's gain (see the
  config's `sample.given_guidance`). Costs a decode and its VJP per evaluation, skipped
  when no given latent frame follows a free one (image-to-video, forward extension),
  where the gradient is 0.

  Args:
    velocity: `v(x [B, T', H', W', C'], t [B])`, or a velocity with state
      (`v(x, t, state) -> (v, state)`; the result then is one too).
    autoencoder: decodes latents to pixels.
    given_latent, latent_given: `[B, T', H', W', C']` the given frames' encoding and
      `[B, T']` bool, its given latent frames.
    given_video, given_frames: `[B, T, H, W, C]` in [-1, 1] and `[B, T]` bool.
    weight: the guidance weight (0: `velocity` itself).
  """
  keep = latent_given[:, :, None, None, None]
  pixels = given_frames[:, :, None, None, None]
  per_position = np.prod(given_video.shape[2:]) / np.prod(given_latent.shape[2:4])
  count = jnp.maximum(jnp.sum(given_frames, axis=1), 1) * per_position

  def loss(x0):
    video = autoencoder.decode(jnp.where(keep, given_latent.astype(x0.dtype), x0))
    err = jnp.where(pixels, video.astype(jnp.float32) - given_video, 0.0)
    return jnp.sum(jnp.sum(jnp.square(err), axis=(1, 2, 3, 4)) / count)

  # A causal decoder renders a given latent frame from it and the latent frames before
  # it: only given frames after a free one can be pulled (else the gradient is 0: skipped).
  free = ~latent_given
  after_free = (jnp.cumsum(free, axis=1) - free) > 0
  needed = jnp.any(latent_given & after_free)

  def guided(x, t, *state):
    v = velocity(x, t, *state)
    if state:                       # a velocity with state (step caching, self-conditioning)
      v, new_state = v
      return guided_by_reconstruction(x, t, v), new_state
    return guided_by_reconstruction(x, t, v)

  def guided_by_reconstruction(x, t, v):
    def corrected():
      x0 = flow.clean_estimate(x, v, t)
      grad = jax.grad(loss)(x0.astype(jnp.float32))
      scale = weight * t[:, None, None, None, None].astype(jnp.float32)
      return v + (scale * jnp.where(keep, 0.0, grad)).astype(v.dtype)

    return jax.lax.cond(needed, corrected, lambda: v)

  return guided


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How to integrate the flow (hashable: one compiled sampler per distinct `structure()`;
  the guidance scales and interval, the shift, `given_guidance`, `eta` and where an edit
  starts (`strength`) are the compiled sampler's inputs, `traced_values()`).

  steps: solver steps; solver: a name in `SOLVERS` (euler, heun, dpmpp_2m); shift: the
  timestep shift; schedule: the spacing of times (`flow.SCHEDULES`); cfg_scale: text
  guidance; image_cfg_scale: guidance of given frames; cfg_scale_low: text guidance of
  a two-expert model's low-noise expert (0: cfg_scale);
  guidance_interval: (lo, hi) flow times where guidance applies; strength: the share of
  the schedule SDEdit runs (only with a source video); given_guidance: the weight of
  `reconstruction_guided` (latent models with given frames; 0: off); cache_threshold:
  step caching's error threshold (`sora_jax.diffusion.step_cache`; 0: off; needs the
  model's calibration for the solver, steps and schedule, `Sampler.calibrate_cache`);
  eta: the euler solver's share of fresh noise per step (`solvers.euler`; 0: the ODE,
  1: diffusers' stochastic sampling), drawn from each video's seed.
  """
  steps: int
  cfg_scale: float
  shift: float
  solver: str
  image_cfg_scale: float = 1.0
  cfg_scale_low: float = 0.0
  guidance_interval: tuple[float, float] = (0.0, 1.0)
  strength: float = 1.0
  schedule: str = "uniform"
  given_guidance: float = 0.0
  cache_threshold: float = 0.0
  eta: float = 0.0

  @property
  def evaluations(self) -> int:
    """Velocity evaluations of the whole schedule (each one transformer call, its
    guidance passes batched)."""
    return self.steps * CALLS_PER_STEP[self.solver]

  @property
  def edit_evaluations(self) -> int:
    """Velocity evaluations of an SDEdit at `strength` (the schedule's tail)."""
    return (self.steps - edit_start(self.steps, self.strength)) * CALLS_PER_STEP[self.solver]

  def structure(self) -> "SamplingOptions":
    """The compile key: these options with the shift, the guidance interval, each guidance
    scale, `given_guidance`, `eta` and `strength` replaced by a stand-in that keeps all the
    compiled sampler's program depends on: which passes run (a scale of 1 needs no
    unconditional pass; a low-noise scale of 0 means `cfg_scale`'s), whether
    reconstruction guidance runs (weight 0: no decode) and whether steps draw fresh noise
    (eta 0: the ODE, no draws). A sweep over shifts, intervals, edit strengths, or values
    other than those runs one program."""
    stand_in = lambda value, *kept: value if value in kept else 2.0
    return dataclasses.replace(self, shift=1.0, cfg_scale=stand_in(self.cfg_scale, 1.0),
                               image_cfg_scale=stand_in(self.image_cfg_scale, 1.0),
                               cfg_scale_low=stand_in(self.cfg_scale_low, 0.0, 1.0),
                               guidance_interval=(0.0, 1.0),
                               given_guidance=1.0 if self.given_guidance else 0.0,
                               eta=1.0 if self.eta else 0.0, strength=1.0)

  def traced_values(self, shift: float | None = None) -> dict[str, float]:
    """What `structure()` leaves out: the compiled sampler's inputs
    (`sample_from_text_states`' `option_values`), the guidance scales (the low-noise
    expert's 0 resolved to `cfg_scale`), the guidance interval `(lo, hi)`, `shift`
    (default: this one; a sampler's is scaled for the clip's size), `given_guidance`,
    `eta` and `edit_start` (the schedule's index an SDEdit starts from, `edit_start()`: an
    int from `strength`, so that rounding happens here and not in float32). Python
    numbers, which `jax.jit` traces as weakly typed scalars: one program for every value,
    and the velocities keep their dtype as under a constant scale."""
    return {"cfg_scale": self.cfg_scale, "image_cfg_scale": self.image_cfg_scale,
            "cfg_scale_low": self.cfg_scale_low or self.cfg_scale,
            "guidance_interval": self.guidance_interval,
            "shift": self.shift if shift is None else shift,
            "given_guidance": self.given_guidance, "eta": self.eta,
            "edit_start": edit_start(self.steps, self.strength)}

  @property
  def cache_key(self) -> str:
    """What a step-caching calibration is for: the solver, steps and schedule."""
    return f"{self.solver}/{self.steps}/{self.schedule}"

  @classmethod
  def of(cls, section: Any, **overrides) -> "SamplingOptions":
    """The options a config's `sample` section gives (its keys of the same names), with
    `overrides` (None values keep the section's), converted and validated."""
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)
              if hasattr(section, f.name)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown sampling options {sorted(unknown)}.")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    options = cls(**{k: (tuple(float(x) for x in v) if k == "guidance_interval"
                         else {"int": int, "float": float, "str": str}[types[k]](v))
                     for k, v in values.items()})
    options.validate()
    return options

  def validate(self) -> None:
    if self.schedule not in flow.SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r}: expected one of {flow.SCHEDULES}.")
    if self.solver not in SOLVERS:
      raise ValueError(f"solver={self.solver!r}: expected one of {sorted(SOLVERS)}.")
    if self.steps < 1:
      raise ValueError(f"steps={self.steps} must be positive.")
    if self.cache_threshold < 0:
      raise ValueError(f"cache_threshold={self.cache_threshold} must be >= 0 (0: off).")
    lo, hi = self.guidance_interval
    if not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f"guidance_interval={self.guidance_interval}: need 0 <= lo <= hi <= 1.")
    if self.given_guidance < 0:
      raise ValueError(f"given_guidance={self.given_guidance} must be >= 0.")
    if self.cfg_scale_low < 0:
      raise ValueError(f"cfg_scale_low={self.cfg_scale_low} must be >= 0 (0: cfg_scale).")
    if not 0.0 < self.strength <= 1.0:
      raise ValueError(f"strength={self.strength} must be in (0, 1].")
    if not 0.0 <= self.eta <= 1.0:
      raise ValueError(f"eta={self.eta} must be in [0, 1] (0: the ODE).")
    if self.eta and self.solver != "euler":
      raise ValueError(f"eta={self.eta}: stochastic steps are the euler solver's; "
                       f"solver={self.solver!r} integrates the ODE (use eta 0).")


def sample_video(params, graphdef: nnx.GraphDef, ids: jax.Array, mask: jax.Array,
                 null_ids: jax.Array, null_mask: jax.Array, seeds: jax.Array,
                 given_video: jax.Array | None = None, given_frames: jax.Array | None = None,
                 source_video: jax.Array | None = None, **kwargs) -> jax.Array:
  """Generates videos `[B, T, H, W, C]` in [-1, 1] from prompt tokens (pure; jit it with
  the keyword args static): the model's text encoder, then `sample_from_text_states`.

  Args:
    params: model parameters (the EMA weights).
    ids, mask: `[B, L]` prompt tokens; null_ids, null_mask: `[L]` the empty prompt.
    seeds, given_video, given_frames, source_video, **kwargs: as `sample_from_text_states`.
  """
  model = nnx.merge(graphdef, params)
  text = model.text_encoder(ids, mask)
  null_text = model.text_encoder(null_ids[None], null_mask[None])
  if model.image_encoder is not None:
    kwargs["image_states"] = image_states(model, given_video, given_frames)
  return sample_from_text_states(params, graphdef, text, mask, null_text, null_mask, seeds,
                                 given_video, given_frames, source_video, **kwargs)


def image_states(model, given_video: jax.Array, given_frames: jax.Array) -> jax.Array:
  """The image branch's input `[B, k * I, D_img]`: the image encoder's states of the first
  given frame (k = 1), or of the first and the last (k = 2: a model whose image positions
  span two images, Wan's first-last-frame), of `given_video [B, T, H, W, 3]` in [-1, 1]."""
  tokens = model.image_encoder.cfg.tokens
  images = 2 if model.dit.cfg.image_positions == 2 * tokens else 1
  b, t = given_frames.shape
  first = jnp.argmax(given_frames, axis=1)
  last = t - 1 - jnp.argmax(given_frames[:, ::-1], axis=1)
  picks = first[:, None] if images == 1 else jnp.stack([first, last], axis=1)     # [B, k]
  frames = jnp.take_along_axis(given_video, picks[:, :, None, None, None], axis=1)
  states = model.encode_image((frames.reshape((-1,) + frames.shape[2:]).astype(jnp.float32)
                               + 1.0) / 2.0)                                   # [B k, I, D]
  return states.reshape(b, -1, states.shape[-1])


def sample_from_text_states(params, graphdef: nnx.GraphDef, text: jax.Array, mask: jax.Array,
                            null_text: jax.Array, null_mask: jax.Array, seeds: jax.Array,
                            given_video: jax.Array | None = None,
                            given_frames: jax.Array | None = None,
                            source_video: jax.Array | None = None, *,
                            latent_shape: Sequence[int], options: SamplingOptions,
                            autoencoder: Autoencoder, cond_noise: float = 0.0,
                            cond_scheme: str = "channels",
                            image_states: jax.Array | None = None,
                            cache_skips: tuple[bool, ...] | None = None,
                            return_cache_norms: bool = False,
                            on_evaluation: Callable[[Any], None] | None = None,
                            camera: jax.Array | None = None,
                            option_values: dict[str, jax.Array] | None = None):
  """Generates videos `[B, T, H, W, C]` in [-1, 1] from text-encoder states (pure; jit it
  with the keyword args static but `camera` and `option_values`): cached or precomputed
  text, no text encoder run.

  Args:
    params: model parameters (the EMA weights); only the transformer's are read.
    text, mask: `[B, L, D]` the prompts' text states and `[B, L]` bool;
      null_text `[1, L, D]` and null_mask `[L]`: the empty prompt's.
    seeds: `[B]` int32 noise seeds.
    given_video, given_frames: `[B, T, H, W, C]` in [-1, 1] and `[B, T]` bool: frames to
      keep (image-to-video, extension, connection); the model generates the others.
    source_video: `[B, T, H, W, C]` for SDEdit: noised to the start of the schedule's last
      `strength` share, then denoised under the prompt (requires `strength`).
    latent_shape: `(T', H', W', C')` of what the transformer diffuses.
    options: the solver, its steps, shift (already scaled for the clip's size) and
      schedule, and the guidance (`SamplingOptions`; `strength` applies with a
      `source_video` only; `given_guidance` is skipped by pixel models, which return
      given frames exactly).
    cond_noise: flow time at which given frames are shown (the training config's
      `conditioning.noise`).
    cond_scheme: the conditioning input's layout (`conditioning.SCHEMES`); with "wan" the
      given frames condition the model but are generated like the others; with
      "replace" they replace the noisy latent frames at flow time 0 (`guided_velocity`).
    image_states: `[B, I, D_img]` for a transformer with an image branch (`image_states`).
    cache_skips: step caching's schedule, one bool per evaluation (`guided_velocity`);
      None: no caching. return_cache_norms: also return the residual norm of every
      evaluation `[E]` (with `cache_skips`; all False to calibrate,
      `step_cache.magnitude_ratios`).
    on_evaluation: a host function called (through `jax.debug.callback`) with the flow
      time `[B]` at every velocity evaluation, e.g. a progress bar's tick; None: none.
    camera: `[B, T, 21]` packed per-frame cameras (`data.camera.pack_camera`) for a model
      with camera control (`data.camera.camera_input`: the rays at the video's pixels,
      folded into the latent grid of a latent model).
    option_values: the shift, the guidance scales and interval, given_guidance, eta and
      an edit's start (`SamplingOptions.traced_values`: arrays in a compiled sampler, which
      then compiles `options.structure()` once for all their values; `guided_velocity`);
      None: `options`' own.
  """
  o = options
  values = option_values or o.traced_values()
  model = nnx.merge(graphdef, params)
  cond = given_latent = latent_given = None
  if given_video is not None and cond_scheme == "wan":
    zeroed = jnp.where(given_frames[:, :, None, None, None], given_video, 0.0)
    cond = conditioning.wan_conditioning_input(autoencoder.encode(zeroed), given_frames,
                                               autoencoder.temporal_factor)
  elif given_video is not None:
    given_latent = autoencoder.encode(fill_free_frames(given_video, given_frames))
    latent_given = conditioning.latent_frame_mask(given_frames, autoencoder.temporal_factor)
    if cond_scheme == "channels":
      # Noise of given frames (cond_noise > 0) from each example's own seed, like its x_1.
      cond = conditioning.conditioning_input(
          given_latent, latent_given, noise_level=cond_noise,
          noise=(initial_noise(seeds, given_latent.shape[1:], stream=1) if cond_noise > 0
                 else None))
  replace = given_latent is not None and cond_scheme == "replace"
  guided = (given_latent is not None and o.given_guidance > 0 and cond_scheme == "channels"
            and not isinstance(autoencoder, IdentityAutoencoder))
  if cache_skips is not None and (guided or source_video is not None):
    raise ValueError("step caching (cache_threshold) works without reconstruction guidance "
                     "(given_guidance 0) and without an edited source video.")
  velocity = guided_velocity(model, text, mask, null_text, null_mask[None], cond,
                             cfg_scale=o.cfg_scale, image_scale=o.image_cfg_scale,
                             interval=o.guidance_interval, image=image_states,
                             cfg_scale_low=o.cfg_scale_low,
                             replaced=(given_latent, latent_given) if replace else None,
                             cache_skips=cache_skips, latent_shape=latent_shape,
                             record_norms=return_cache_norms, step_size=1.0 / o.steps,
                             camera=(None if camera is None else camera_input(
                                 camera, latent_shape[1] * autoencoder.spatial_factor,
                                 latent_shape[2] * autoencoder.spatial_factor,
                                 autoencoder.temporal_factor, autoencoder.spatial_factor)),
                             option_values=values)
  state = None
  if isinstance(velocity, tuple):   # a velocity with state, and its initial state
    velocity, state = velocity
  if guided:
    velocity = reconstruction_guided(velocity, autoencoder, given_latent, latent_given,
                                     given_video, given_frames, values["given_guidance"])
  if on_evaluation is not None:
    velocity = _reporting(velocity, on_evaluation)

  noise = initial_noise(seeds, latent_shape)
  times = flow.sampling_times(o.steps, values["shift"], o.schedule)
  x, start = noise, 0
  if source_video is not None:   # SDEdit: the schedule's tail from the source, noised
    start = values["edit_start"]
    x = flow.interpolate(autoencoder.encode(source_video).astype(jnp.float32), noise,
                         jnp.full((noise.shape[0],), times[start]))
  solve = functools.partial(SOLVERS[o.solver], start=start)
  if o.eta:
    solve = functools.partial(solve, eta=values["eta"],
                              noise=lambda i: step_noise(seeds, latent_shape, i))
  if state is None:
    x = solve(velocity, x, times)
  else:
    x, state = solve(velocity, x, times, state)
  if given_latent is not None:  # given frames come back exactly as given (diffused space)
    x = jnp.where(latent_given[:, :, None, None, None], given_latent.astype(x.dtype), x)
  video = autoencoder.decode(x)
  return (video, state[2]) if return_cache_norms else video


CACHE_FILE = "step_cache.json"   # a model's step-caching calibrations, beside its weights


class Sampler:
  """Generates videos from prompts with a trained model; caches one compiled function per shape."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
               graphdef: nnx.GraphDef, params, mesh: Mesh | None = None):
    """`mesh`: the mesh `params` are sharded over (by the config's rules); the sampler
    then runs partitioned over it, with the model's activation constraints. `self.config`
    is `config` with the keys it lacks (an older run's) at the schema's defaults."""
    config = configs.filled(config)
    self.config, self.tokenizer, self.graphdef, self.params = config, tokenizer, graphdef, params
    self.mesh = mesh
    self.step: int | None = None      # the checkpoint step, when loaded from a workdir
    self.autoencoder = make_autoencoder(config.autoencoder)
    self._compiled: dict[tuple, callable] = {}
    self._progress: Callable[[], None] | None = None   # `generate(progress=...)`'s tick
    # Step caching's calibrations: `SamplingOptions.cache_key` -> {"ratios": [E], ...}.
    self.cache_calibration: dict[str, dict[str, Any]] = {}

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, *,
                   mesh: Mesh | None = None,
                   loras: Sequence[tuple[str, float]] = (),
                   loras_low: Sequence[tuple[str, float]] = ()) -> "Sampler":
    """Loads the config, tokenizer and EMA weights of the latest (or given) checkpoint,
    or the weights of an export (`sora-jax export`, `import-wan`). With `mesh` (e.g.
    `make_mesh(configs.mesh_shape(config))`: a model too large for one device) the
    parameters are restored sharded over it by the run's `sharding.rules`. `loras`:
    `(file, strength)` pairs of LoRA files merged into the transformer
    (`sora_jax.interop.lora`: diffusers/PEFT or original-Wan/ComfyUI naming); `loras_low`:
    into the low-noise expert of a two-expert model (Wan 2.2 A14B)."""
    run = restore_params(workdir, step, mesh=mesh)
    params = merge_lora_files(run.config, run.tokenizer.vocab_size, run.params, loras,
                              loras_low)
    sampler = cls(run.config, run.tokenizer, run.graphdef, params, mesh=mesh)
    sampler.step = run.step
    path = os.path.join(workdir, CACHE_FILE)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        sampler.cache_calibration = json.load(f)
    return sampler

  def sharding_context(self):
    """The context the model's functions trace in: its mesh's activation sharding and
    attention backend (none without a mesh)."""
    if self.mesh is None:
      return contextlib.nullcontext()
    t = configs.typed(self.config)
    return activation_sharding(self.mesh, configs.sharding_rules(t), t.model.attention,
                               t.model.splash_block)

  @property
  def conditioned(self) -> bool:
    """Whether the model was trained with frame conditioning (image-to-video, extension...)."""
    return conditioning.enabled(self.config)

  def cache_skips(self, options: SamplingOptions) -> tuple[bool, ...] | None:
    """Step caching's schedule for `options` (one bool per evaluation, True: reuse the
    cached residual), from the model's calibration; None when caching is off."""
    if not options.cache_threshold:
      return None
    calibration = self.cache_calibration.get(options.cache_key)
    if calibration is None:
      raise ValueError(f"cache_threshold={options.cache_threshold}: no step-caching "
                       f"calibration of this model for {options.cache_key} (solver/steps/"
                       "schedule); run `sora-jax calibrate-cache` with those settings first.")
    return tuple(bool(s) for s in step_cache.skip_schedule(calibration["ratios"],
                                                           options.cache_threshold))

  def compiled(self, key: tuple, build: Callable[[], Callable]) -> Callable:
    """The compiled function cached under `key`, built by `build()` on first use (callers
    other than `generate`, e.g. `sora_jax.autoregressive`, share the cache and its count;
    `generate`'s own functions are cached the same way)."""
    if key not in self._compiled:
      self._compiled[key] = build()
    return self._compiled[key]

  @property
  def compiled_shapes(self) -> int:
    """How many sampling functions this sampler has compiled: one per clip size, input
    kind and `SamplingOptions.structure()` (the values it takes as inputs,
    `traced_values()`, share one); a server's calls of one shape share one."""
    return len(self._compiled)

  def _on_evaluation(self, t) -> None:   # host side of `sample_from_text_states`' callback
    del t
    if self._progress is not None:
      self._progress()

  def _function(self, frames: int, height: int, width: int, options: SamplingOptions,
                with_given: bool, with_source: bool, calibrate: bool = False,
                progress: bool = False, with_camera: bool = False):
    skips = (False,) * options.evaluations if calibrate else self.cache_skips(options)
    t = configs.typed(self.config)
    latent = self.autoencoder.latent_shape(frames, height, width, 3)
    patch = configs.decode_variant(t.model.variant)["patch"]
    shift = (options.shift if t.model.step_embedding else   # a few-step student's grid
             float(flow.token_shift(num_tokens(latent[:3], patch), options.shift,
                                    t.flow.shift_base_tokens)))
    values, options = options.traced_values(shift), options.structure()
    key = (frames, height, width, options, with_given, with_source, skips, calibrate,
           progress, with_camera)

    def build():
      return jax.jit(functools.partial(
          sample_video, graphdef=self.graphdef, latent_shape=latent, options=options,
          autoencoder=self.autoencoder,
          cond_noise=t.conditioning.noise, cond_scheme=t.conditioning.scheme,
          cache_skips=skips, return_cache_norms=calibrate,
          on_evaluation=self._on_evaluation if progress else None))

    # The traced values are inputs: all of them share their structure's program.
    return functools.partial(self.compiled(key, build), option_values=values)

  def options(self, **overrides) -> SamplingOptions:
    """The run's `sample.*` settings with `overrides` (None values keep the config's).
    A few-step student (`distill.method=shortcut|trajectory|causal`) samples with Euler
    steps on its own grid (uniform at its `sample.shift`) and the guidance folded into it:
    other values are refused."""
    section = configs.section(self.config, "sample")
    options = SamplingOptions.of(section, **overrides)
    if configs.typed(self.config).model.step_embedding:
      wanted = {"solver": "euler", "schedule": "uniform", "shift": section.shift,
                "cfg_scale": section.cfg_scale}
      wrong = [f"{k}={getattr(options, k)!r}" for k, v in wanted.items()
               if getattr(options, k) != v]
      if wrong:
        raise ValueError(f"{', '.join(wrong)}: a few-step student samples with uniform "
                         f"Euler steps at shift {section.shift:g}, its guidance folded in "
                         f"at cfg_scale={section.cfg_scale}; choose --steps only.")
    return options

  def generate(self, prompts: Sequence[str], seeds: Sequence[int], *,
               frames: int | None = None, height: int | None = None, width: int | None = None,
               given_video: np.ndarray | None = None, given_frames: np.ndarray | None = None,
               source_video: np.ndarray | None = None, batch_size: int | None = None,
               progress: Callable[[int, int], None] | None = None,
               camera: np.ndarray | None = None,
               **options) -> np.ndarray:
    """Videos for `prompts` (one per seed) as uint8 `[N, T, H, W, 3]`.

    Args:
      prompts, seeds: one video per (prompt, seed).
      frames, height, width: the size (default: the run's `world` size); taken from
        `given_video` / `source_video` when those are given.
      given_video: uint8 `[N, T, H, W, 3]` and given_frames bool `[N, T]`: frames to keep
        (the model must be trained with `conditioning`); see `sora_jax.prompting`.
      source_video: uint8 `[N, T, H, W, 3]` to edit (SDEdit) with `strength`.
      batch_size: videos per compiled call (default `sample.batch_size`).
      camera: float32 `[N, T, 21]` per-frame cameras (`data.camera.pack_camera`,
        `named_camera`) for a model with camera control; None: none (zero rays).
      progress: called on the host as `progress(done, total)` after each of the
        `total` velocity evaluations of this call (a sampling function of its own, with
        a host callback per evaluation); None: no reporting.
      **options: `SamplingOptions` fields (steps, cfg_scale, shift, solver,
        image_cfg_scale, cfg_scale_low, guidance_interval, strength, schedule,
        given_guidance, cache_threshold, eta); unset ones come from `sample.*`.

    The time shift is `shift` scaled by the clip's token count when the run trained with
    `flow.shift_base_tokens` (see `flow.token_shift`).
    """
    if len(prompts) != len(seeds):
      raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds.")
    c = self.config
    opts = self.options(**options)
    for name, video in (("given_video", given_video), ("source_video", source_video)):
      if video is not None:
        video = np.asarray(video)
        if video.ndim != 5 or video.shape[0] != len(prompts) or video.shape[-1] != 3:
          raise ValueError(f"{name}: expected uint8 [{len(prompts)}, T, H, W, 3], got "
                           f"{video.shape}.")
        frames, height, width = video.shape[1:4]
    if given_video is not None:
      if not self.conditioned:
        raise ValueError("given frames need a model trained with frame conditioning "
                         "(config.conditioning.probs); this run's model has none.")
      given_frames = np.asarray(given_frames, bool)
      if given_frames.shape != given_video.shape[:2]:
        raise ValueError(f"given_frames: expected [{len(prompts)}, {given_video.shape[1]}] "
                         f"bool, got {given_frames.shape}.")
      if not given_frames.any(-1).all():
        raise ValueError("given_frames: every video needs at least one given frame.")
    if given_video is not None and source_video is not None:
      raise ValueError("give either given_video (frames to keep) or source_video (to edit).")
    if configs.typed(c).image_encoder.width and given_video is None:
      raise ValueError("this model generates from an image (an image-to-video model): give "
                       "the image (--image, or given_video with given_frames).")
    frames, height, width = self.clip_size(frames, height, width)
    latent = self.autoencoder.latent_shape(frames, height, width, 3)
    patch = configs.decode_variant(c.model.variant)["patch"]
    for name, size, p in zip(("frames", "height", "width"), latent[:3], patch):
      if size % p:
        raise ValueError(f"{name}={size} (diffused) is not a multiple of the model's patch "
                         f"size {p}.")
    if camera is not None:
      camera = np.asarray(camera, np.float32)
      if not configs.typed(c).model.camera_control:
        raise ValueError("a camera path needs a model trained with camera control "
                         "(model.camera_control).")
      if camera.shape != (len(prompts), frames, CAMERA_VALUES):
        raise ValueError(f"camera: expected [{len(prompts)}, {frames}, {CAMERA_VALUES}] (one "
                         f"packed camera per frame), got {camera.shape}.")
    fn = self._function(frames, height, width, opts, given_video is not None,
                        source_video is not None, progress=progress is not None,
                        with_camera=camera is not None)
    if progress is None:
      out = self._run(fn, prompts, seeds, given_video, given_frames, source_video, batch_size,
                      camera)
      return np.concatenate([to_uint8(video) for video in out])
    batches = -(-len(prompts) // (batch_size or c.sample.batch_size))
    total = batches * (opts.evaluations if source_video is None else opts.edit_evaluations)
    done = [0]

    def tick() -> None:
      done[0] += 1
      progress(min(done[0], total), total)

    self._progress = tick
    try:
      out = self._run(fn, prompts, seeds, given_video, given_frames, source_video, batch_size,
                      camera)
      jax.effects_barrier()     # every callback of this call has run
    finally:
      self._progress = None
    return np.concatenate([to_uint8(video) for video in out])

  def calibrate_cache(self, prompts: Sequence[str], seeds: Sequence[int], *,
                      frames: int | None = None, height: int | None = None,
                      width: int | None = None, batch_size: int | None = None,
                      **options) -> np.ndarray:
    """Calibrates step caching for these sampling `options` (solver, steps, schedule; the
    rest as in `generate`): samples `prompts` uncached, records the blocks' residual norm
    at every evaluation, and keeps the mean magnitude ratios `[E]`
    (`step_cache.magnitude_ratios`, one run per batch) in `cache_calibration`; returns
    them. `save_cache_calibration` stores them with the model."""
    if len(prompts) != len(seeds):
      raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds.")
    opts = dataclasses.replace(self.options(**options), cache_threshold=0.0)
    size = self.clip_size(frames, height, width)
    fn = self._function(*size, opts, False, False, calibrate=True)
    norms = [n for _, n in self._run(fn, prompts, seeds, None, None, None, batch_size)]
    ratios = step_cache.magnitude_ratios(np.stack(norms))
    self.cache_calibration[opts.cache_key] = {
        "ratios": [float(r) for r in ratios], "runs": len(norms), "prompts": len(prompts),
        "size": list(size), "cfg_scale": opts.cfg_scale, "shift": opts.shift}
    return ratios

  def clip_size(self, frames: int | None, height: int | None, width: int | None
            ) -> tuple[int, int, int]:
    """The clip size asked for, the run's `world` size where None."""
    w = self.config.world
    return frames or w.frames, height or w.height, width or w.width

  def save_cache_calibration(self, workdir: str) -> str:
    """Writes `cache_calibration` to `workdir/step_cache.json` (read by `from_workdir`)."""
    path = os.path.join(workdir, CACHE_FILE)
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.cache_calibration, f, indent=2)
    os.replace(tmp, path)
    return path

  def _run(self, fn, prompts, seeds, given_video, given_frames, source_video,
           batch_size: int | None, camera: np.ndarray | None = None) -> list:
    """`fn`'s outputs (on the host) for `prompts`, batch by batch, each batch padded to
    `batch_size` (one compilation) and the padding dropped."""
    c = self.config
    null_ids, null_mask = self.tokenizer.encode([""], c.data.text_length)
    batch_size = batch_size or c.sample.batch_size
    out = []
    for start in range(0, len(prompts), batch_size):
      chunk = list(prompts[start:start + batch_size])
      chunk_seeds = np.asarray(seeds[start:start + batch_size], np.int32)
      pad = batch_size - len(chunk)  # pad to a fixed batch: one compilation
      ids, mask = self.tokenizer.encode(chunk + [""] * pad, c.data.text_length)
      chunk_seeds = np.concatenate([chunk_seeds, np.zeros(pad, np.int32)])
      extra = {}
      if given_video is not None:
        rows = slice(start, start + batch_size)
        extra["given_video"] = _pad_batch(normalise_video(given_video[rows]), pad)
        extra["given_frames"] = _pad_batch(given_frames[rows], pad, True)
      if source_video is not None:
        extra["source_video"] = _pad_batch(
            normalise_video(source_video[start:start + batch_size]), pad)
      if camera is not None:
        extra["camera"] = _pad_batch(camera[start:start + batch_size], pad)
      with self.sharding_context():   # traced (first call) under the model's constraints
        result = jax.device_get(fn(self.params, ids=ids, mask=mask, null_ids=null_ids[0],
                                   null_mask=null_mask[0], seeds=chunk_seeds, **extra))
      if isinstance(result, tuple):    # (videos, residual norms [E]): calibration
        out.append((result[0][:len(chunk)], result[1]))
      else:
        out.append(result[:len(chunk)])
    return out


def _pad_batch(x: np.ndarray, pad: int, fill: bool | float = 0) -> np.ndarray:
  if not pad:
    return x
  return np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)])
