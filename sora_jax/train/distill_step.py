"""The distillation losses with models, and their jitted step (`sora_jax.train.distill`).

The math is `sora_jax.diffusion.distillation`'s; here the teacher (frozen: its transformer
is a fixed input of the step, with no optimiser state) and the student (the train state)
are run on a batch of the training data.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from sora_jax import configs
from sora_jax.diffusion import conditioning
from sora_jax.diffusion import distillation
from sora_jax.diffusion import flow
from sora_jax.models.autoencoder import Autoencoder
from sora_jax.models import kv_cache
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.trace_levels import rebuilt_per_call
from sora_jax.train.state import TrainState, cast_floats
from sora_jax.train import long_rollout
from sora_jax.train.step import Batch, TrainStep, optimizer_step

def consistency_examples(batch: int, fraction: float) -> int:
  """Examples of a batch of `batch` that learn self-consistency (the last ones): about
  `fraction` of it, at least one and at most `batch - 1` when 0 < fraction (batch >= 2)."""
  if fraction <= 0 or batch < 2:
    return 0
  return min(batch - 1, max(1, round(batch * fraction)))


def distill_loss(params: Any, graphdef: nnx.GraphDef, teacher_dit: Any,
                 teacher_graphdef: nnx.GraphDef, batch: Batch, key: jax.Array, *,
                 config: configs.Config | ml_collections.ConfigDict, autoencoder: Autoencoder,
                 null_ids: jax.Array, null_mask: jax.Array,
                 null_text: jax.Array | None = None,
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The student's loss on a batch, by `distill.method` (mean over examples of the MSE).

  Args:
    params: the student's parameters (its text encoder, frozen, is also the teacher's).
    graphdef: the student's graph (a transformer with a step or guidance input).
    teacher_dit, teacher_graphdef: the teacher transformer's parameters and graph.
    batch: `video [B, T, H, W, C]` or `latent [B, T', H', W', C']`, `text_ids [B, L]`,
      `text_mask [B, L]` (and `text_states [B, L, D]` with cached text).
    key: the step's randomness (times, noise, scales).
    config: the student's typed config: reads distill.*, flow.* (the teacher's targets
      are at its training times) and train.compute_dtype.
    null_ids, null_mask: `[L]` the empty caption (the teacher's unconditional pass).
    null_text: `[1, L, D]` its text states (`train.step.null_text_states`), with cached
      text; computed here from `null_ids` when not given (as `train.step.flow_loss`).

  Metrics: loss; shortcut: loss_teacher (examples learning the teacher's velocity, d = 0)
  and loss_consistency (the others); dmd: loss_dmd (the student's) and loss_critic (its
  critic's flow loss on the student's samples); trajectory, causal, guidance: none
  besides loss.
  """
  t = configs.typed(config)
  d = t.distill
  dtype = jnp.dtype(t.train.compute_dtype)
  student = nnx.merge(graphdef, cast_floats(params, dtype))
  teacher = nnx.merge(teacher_graphdef, cast_floats(teacher_dit, dtype))
  if "text_states" in batch:
    text = batch["text_states"].astype(dtype)
  else:
    text = student.encode_text(batch["text_ids"], batch["text_mask"])
  mask = batch["text_mask"]
  if null_text is None:
    null_text = student.encode_text(null_ids[None], null_mask[None])      # [1, L, D]
  null_text = null_text.astype(dtype)
  x0 = batch["latent"] if "latent" in batch else autoencoder.encode(batch["video"])
  x0 = x0.astype(jnp.float32)
  b = x0.shape[0]
  k_time, k_noise, k_scale, k_short = jax.random.split(key, 4)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  patch = configs.decode_variant(t.model.variant)["patch"]
  shift = flow.token_shift(num_tokens(x0.shape[1:4], patch), t.flow.shift,
                           t.flow.shift_base_tokens)

  def own_steps(rows):
    """The student itself without gradient, on examples `rows`: `(x, times, size) -> v`
    (the few-step students' rollouts and self-consistency targets; `**chunk`: a chunk's
    positions and KV cache, `long_rollout.stream_rollout`). Called inside lax loops: the
    transformer is made again at each call's level (`models.trace_levels`)."""
    frozen = rebuilt_per_call(
        nnx.merge(graphdef, jax.lax.stop_gradient(cast_floats(params, dtype))).dit)
    return lambda x, times, size, **chunk: frozen()(x.astype(dtype), times, text[rows],
                                                    mask[rows], step_size=size, **chunk)

  teacher_here = rebuilt_per_call(teacher)

  def teacher_guided(x, times, scale, rows):
    """The teacher's guided velocity at `x` of examples `rows` (both passes in one call;
    inside lax loops too: the teacher made again at the call's level)."""
    n = x.shape[0]
    v = teacher_here()(
        jnp.concatenate([x, x]).astype(dtype), jnp.concatenate([times, times]),
        jnp.concatenate([text[rows], jnp.broadcast_to(null_text, text[rows].shape)]),
        jnp.concatenate([mask[rows], jnp.broadcast_to(null_mask, mask[rows].shape)]))
    return jax.lax.stop_gradient(distillation.guided(v[:n].astype(jnp.float32),
                                                     v[n:].astype(jnp.float32), scale))

  if d.method == "guidance":
    times = flow.sample_time(k_time, b, logit_mean=t.flow.logit_mean,
                             logit_std=t.flow.logit_std, shift=shift)
    scale = jax.random.uniform(k_scale, (b,), minval=d.guidance_range[0],
                               maxval=d.guidance_range[1])
    xt = flow.interpolate(x0, noise, times)
    target = teacher_guided(xt, times, scale, slice(None))
    prediction = student.dit(xt.astype(dtype), times, text, mask, guidance=scale)
    losses = flow.per_example_mse(prediction, target)
    return losses.mean(), {"loss": losses.mean()}

  if d.method == "trajectory":
    # Each example learns one of the student's steps: from where its own first `index`
    # steps (frozen) take the noise, the teacher's guided ODE over the step. x0 is unused.
    index, times, next_times = distillation.trajectory_starts(k_short, b, d.steps, d.shift)
    step = jnp.full((b,), 1.0 / d.steps, jnp.float32)      # the step input: 1 / steps
    x_start = distillation.student_rollout(own_steps(slice(None)), noise, index, d.steps,
                                           d.shift)
    target = distillation.teacher_average_velocity(
        lambda x, times: teacher_guided(x, times, d.cfg_scale, slice(None)), x_start, times,
        times - next_times, d.teacher_steps)
    prediction = student.dit(x_start.astype(dtype), times, text, mask, step_size=step)
    losses = flow.per_example_mse(prediction, target)
    return losses.mean(), {"loss": losses.mean()}

  if d.method == "dmd":
    return _dmd_loss(student, own_steps, teacher_guided, noise, text, mask, k_short,
                     config=t, patch=patch)
  if d.method == "causal" and d.causal_frames:       # a bidirectional teacher
    return _causal_from_bidirectional_loss(student, teacher_guided, noise, text, mask,
                                           k_short, config=t, patch=patch)
  if d.method == "causal":
    return _causal_loss(student, own_steps, teacher_guided, x0, noise, text, mask, k_short,
                        config=t, patch=patch)

  # Shortcut: the first examples learn the teacher's velocity (d = 0), the last ones the
  # self-consistency of a step d from two of d / 2.
  n_cons = consistency_examples(b, d.consistency_fraction)
  n_base = b - n_cons
  base_times = flow.sample_time(k_time, n_base, logit_mean=t.flow.logit_mean,
                                logit_std=t.flow.logit_std, shift=shift)
  x_base = flow.interpolate(x0[:n_base], noise[:n_base], base_times)
  targets = [teacher_guided(x_base, base_times, d.cfg_scale, slice(0, n_base))]
  inputs, times, steps = [x_base], [base_times], [jnp.zeros((n_base,))]
  if n_cons:
    cons_times, step, half = distillation.shortcut_times(k_short, n_cons, d.base_steps)
    x_cons = flow.interpolate(x0[n_base:], noise[n_base:], cons_times)
    targets.append(distillation.shortcut_target(own_steps(slice(n_base, None)), x_cons,
                                                cons_times, step, half))
    inputs, times, steps = inputs + [x_cons], times + [cons_times], steps + [step]
  prediction = student.dit(jnp.concatenate(inputs).astype(dtype), jnp.concatenate(times),
                           text, mask, step_size=jnp.concatenate(steps))
  losses = flow.per_example_mse(prediction, jnp.concatenate(targets))
  metrics = {"loss": losses.mean(), "loss_teacher": losses[:n_base].mean()}
  if n_cons:
    metrics["loss_consistency"] = losses[n_base:].mean()
  return losses.mean(), metrics


def _causal_loss(student, own_steps, teacher_guided, x0: jax.Array, noise: jax.Array,
                 text: jax.Array, mask: jax.Array, key: jax.Array, *, config: configs.Config,
                 patch: tuple[int, int, int]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal trajectory distillation (`distillation` module docstring): each example learns
  one of the student's steps on one block of latent frames, after a clean past (the
  clip's own frames, or with `distill.past="student"` the blocks the student itself makes
  before it, `distillation.own_past`), from where the student's first steps take the
  block's noise.

  x0, noise: `[B, T', H', W', C]`; text `[B, S, D]`, mask `[B, S]`; own_steps and
  teacher_guided: `distill_loss`'s closures (times `[B, N]` per token here)."""
  d = config.distill
  dtype = jnp.dtype(config.train.compute_dtype)
  b = x0.shape[0]
  k_block, k_step = jax.random.split(key)
  which, past, current, block_times = _causal_block(k_block, x0.shape, config, patch)
  token_times = lambda times: block_times(which, times)
  own = own_steps(slice(None))
  student_fn = distillation.on_block(lambda x, times, size: own(x, token_times(times), size),
                                     current)
  teacher_fn = distillation.on_block(
      lambda x, times: teacher_guided(x, token_times(times), d.cfg_scale, slice(None)),
      current)
  index, times, next_times = distillation.trajectory_starts(k_step, b, d.steps, d.shift)
  if d.past == "student":      # the student's own earlier blocks, noise from block c on
    start = distillation.own_past(
        lambda x, block, times, size: own(x, block_times(block, times), size), noise, which,
        config.model.causal_frames * patch[0], d.steps, d.shift)
  else:                        # the clip's own frames before block c, noise from it on
    start = jnp.where(past[:, :, None, None, None], x0, noise)
  x_start = distillation.student_rollout(student_fn, start, index, d.steps, d.shift)
  target = distillation.teacher_average_velocity(teacher_fn, x_start, times,
                                                 times - next_times, d.teacher_steps)
  step = jnp.full((b,), 1.0 / d.steps, jnp.float32)
  prediction = student.dit(x_start.astype(dtype), token_times(times), text, mask,
                           step_size=step)
  losses = conditioning.masked_mse(prediction, target, ~current)            # block c only
  return losses.mean(), {"loss": losses.mean()}


def _causal_block(key: jax.Array, shape, config: configs.Config, patch: tuple[int, int, int]):
  """The causal block each example learns: `(which [B], past [B, T'], current [B, T'],
  block_times)` for latents of `shape` [B, T', H', W', C]: a block drawn uniformly, the
  latent frames before it and in it, and `block_times(block [B], t [B]) -> [B, N]`, the
  per-token times of a clip whose block `block` is at t (0 before it, 1 after)."""
  b, frames = shape[:2]
  block = config.model.causal_frames * patch[0]
  which = jax.random.randint(key, (b,), 0, frames // block)
  past, current = distillation.block_masks(which, frames, block)

  def block_times(index, times):
    per_frame = distillation.causal_frame_times(index, times, frames, block)
    return flow.times_per_token(per_frame[:, ::patch[0]], shape[1:4], patch)

  return which, past, current, block_times


def _causal_from_bidirectional_loss(student, teacher_guided, noise: jax.Array,
                                    text: jax.Array, mask: jax.Array, key: jax.Array, *,
                                    config: configs.Config, patch: tuple[int, int, int]
                                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal trajectory distillation of a bidirectional teacher (`distillation` module
  docstring; `distill.causal_frames`): each example learns one of the student's steps on
  one block c, on the teacher's guided ODE over the whole clip from `noise`: block c at
  the step's start, the blocks before it at the ODE's end (clean), those after it noise.

  noise: `[B, T', H', W', C]`; text `[B, S, D]`, mask `[B, S]`; teacher_guided:
  `distill_loss`'s closure (times `[B]`: every frame at one time)."""
  d = config.distill
  dtype = jnp.dtype(config.train.compute_dtype)
  k_block, k_step = jax.random.split(key)
  which, past, current, block_times = _causal_block(k_block, noise.shape, config, patch)
  token_times = lambda times: block_times(which, times)
  index, times, _ = distillation.trajectory_starts(k_step, noise.shape[0], d.steps, d.shift)
  start, target, end = distillation.teacher_trajectory(
      lambda x, t: teacher_guided(x, t, d.cfg_scale, slice(None)), noise, index, d.steps,
      d.shift, d.teacher_steps)
  frames = lambda m: m.reshape(m.shape + (1,) * (noise.ndim - 2))
  x_start = jnp.where(frames(past), end, jnp.where(frames(current), start, noise))
  step = jnp.full((noise.shape[0],), 1.0 / d.steps, jnp.float32)
  prediction = student.dit(x_start.astype(dtype), token_times(times), text, mask,
                           step_size=step)
  losses = conditioning.masked_mse(prediction, target, ~current)            # block c only
  return losses.mean(), {"loss": losses.mean()}


def _dmd_loss(student, own_steps, teacher_guided, noise: jax.Array, text: jax.Array,
              mask: jax.Array, key: jax.Array, *, config: configs.Config,
              patch: tuple[int, int, int]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Distribution matching (`distillation` module docstring, DMD): the student's sample,
  scored at a noise level by the guided teacher and by the critic (`student.critic`),
  regressed onto `distillation.dmd_target`; the critic's flow loss on the same noised
  sample (no gradient into the student). A block-causal student's sample is its whole
  streamed clip (`distillation.own_past`), with one block c per example remade with
  gradient after its past; its DMD loss is block c's. With `distill.dmd_rollout_blocks`,
  the clip is a window of the student's longer streamed rollout (`_rollout_sample`). No
  data are read.

  noise: `[B, T', H', W', C]`; text `[B, S, D]`, mask `[B, S]`; own_steps and
  teacher_guided: `distill_loss`'s closures. Returns `(loss_dmd + loss_critic, metrics)`."""
  d = config.distill
  dtype = jnp.dtype(config.train.compute_dtype)
  b = noise.shape[0]
  k_block, k_step, k_time, k_noise = jax.random.split(key, 4)
  index, times, _ = distillation.trajectory_starts(k_step, b, d.steps, d.shift)
  step = jnp.full((b,), 1.0 / d.steps, jnp.float32)
  own = own_steps(slice(None))
  at_times = times.reshape((b,) + (1,) * (noise.ndim - 1))       # [B, 1, ...]
  if config.model.causal_frames and d.dmd_rollout_blocks:
    sample, ignored = _rollout_sample(student, own, text, mask, k_block, index, times,
                                      config=config, patch=patch, clip_shape=noise.shape)
  elif config.model.causal_frames:
    which, _, current, block_times = _causal_block(k_block, noise.shape, config, patch)
    block = config.model.causal_frames * patch[0]           # latent frames per block
    clip = distillation.own_past(
        lambda x, index, t, size: own(x, block_times(index, t), size), noise,
        jnp.full((b,), noise.shape[1] // block, jnp.int32), block, d.steps, d.shift,
        whole=True)
    frames = current.reshape(current.shape + (1,) * (noise.ndim - 2))
    token_times = lambda t: block_times(which, t)
    student_fn = distillation.on_block(lambda x, t, size: own(x, token_times(t), size),
                                       current)
    x_i = distillation.student_rollout(student_fn, jnp.where(frames, noise, clip), index,
                                       d.steps, d.shift)
    v = student.dit(x_i.astype(dtype), token_times(times), text, mask, step_size=step)
    sample = jnp.where(frames, x_i - at_times * v.astype(jnp.float32), clip)
    ignored = ~current                  # the DMD loss is block c's
  else:
    x_i = distillation.student_rollout(own, noise, index, d.steps, d.shift)
    v = student.dit(x_i.astype(dtype), times, text, mask, step_size=step)
    sample = x_i - at_times * v.astype(jnp.float32)
    ignored = None
  lo, hi = d.dmd_times
  t = jax.random.uniform(k_time, (b,), minval=lo, maxval=hi)
  e = jax.random.normal(k_noise, sample.shape, jnp.float32)
  fixed = jax.lax.stop_gradient(sample)
  x_t = flow.interpolate(fixed, e, t)
  v_fake = student.critic(x_t.astype(dtype), t, text, mask).astype(jnp.float32)
  loss_critic = flow.per_example_mse(v_fake, e - fixed).mean()     # the critic's alone
  v_real = teacher_guided(x_t, t, d.cfg_scale, slice(None))
  target = distillation.dmd_target(fixed, x_t, t, v_real, jax.lax.stop_gradient(v_fake))
  if ignored is None:
    per_example = flow.per_example_mse(sample, target)
  else:
    per_example = conditioning.masked_mse(sample, target, ignored)
  loss_dmd = 0.5 * per_example.mean()
  return loss_dmd + loss_critic, {"loss": loss_dmd + loss_critic, "loss_dmd": loss_dmd,
                                  "loss_critic": loss_critic}


def _rollout_sample(student, own, text: jax.Array, mask: jax.Array, key: jax.Array,
                    index: jax.Array, times: jax.Array, *, config: configs.Config,
                    patch: tuple[int, int, int], clip_shape: tuple[int, ...]
                    ) -> tuple[jax.Array, jax.Array]:
  """Extended DMD's sample (`long_rollout` module docstring): the student streams
  `distill.dmd_rollout_blocks` blocks through its rolling KV cache (`sample.stream_window`
  chunks), a clip-long window of it is cut at a random start per example (block 0 with
  probability `distill.dmd_window_at_start`), and one block of the window is remade with
  gradient from the cache streaming made it after: its first `index [B]` steps without
  gradient, then one from `times [B]` read as its clean prediction.

  own: `distill_loss`'s frozen student (`own_steps(slice(None))`); text `[B, S, D]`, mask
  `[B, S]`; clip_shape: `[B, T', H', W', C]`, the training clip's latent shape. Returns
  `(sample [B, T', H', W', C], ignored [B, T'])`: the window, and its frames outside the
  remade block (the DMD loss is that block's)."""
  d = config.distill
  dtype = jnp.dtype(config.train.compute_dtype)
  b, frames = clip_shape[:2]
  block = config.model.causal_frames * patch[0]          # latent frames per block
  k_window, k_noise = jax.random.split(key)
  start, remade = long_rollout.windows(k_window, b, d.dmd_rollout_blocks, frames // block,
                                       d.dmd_window_at_start)
  chunk = (block,) + tuple(clip_shape[2:])
  noise = jax.random.normal(k_noise, (b, d.dmd_rollout_blocks * block) + chunk[1:],
                            jnp.float32)
  grid = tuple(s // p for s, p in zip(chunk[:3], patch))
  tokens = num_tokens(chunk[:3], patch)
  window = config.sample.stream_window
  size = jnp.full((b,), 1.0 / d.steps, jnp.float32)
  at = lambda j: jnp.broadcast_to(kv_cache.chunk_positions(j, grid), (b, tokens, 3))
  video, kept = long_rollout.stream_rollout(
      lambda x, j, t, step, cache: own(x, t, step, positions=at(j), kv_cache=cache),
      lambda x, j, cache: own(x, jnp.zeros((b,), jnp.float32), size, positions=at(j),
                              kv_cache=cache, return_kv=True)[1],
      noise, kv_cache.empty_cache(student.dit.cfg, b, window * tokens, dtype), remade,
      block=block, steps=d.steps, shift=d.shift, window=window)
  positions = kv_cache.chunk_positions(remade, grid)                        # [B, N, 3]
  x_i = distillation.student_rollout(
      lambda x, t, step: own(x, t, step, positions=positions, kv_cache=kept),
      long_rollout.rows_slice(noise, remade * block, block), index, d.steps, d.shift)
  v = student.dit(x_i.astype(dtype), times, text, mask, positions=positions, kv_cache=kept,
                  step_size=size)
  made = x_i - times.reshape((b,) + (1,) * (x_i.ndim - 1)) * v.astype(jnp.float32)
  clip = long_rollout.rows_slice(video, start * block, frames)
  current = distillation.block_masks(remade - start, frames, block)[1]     # [B, T']
  in_block = current.reshape(current.shape + (1,) * (clip.ndim - 2))
  return jnp.where(in_block, jnp.tile(made, (1, frames // block, 1, 1, 1)), clip), ~current


def make_distill_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                      teacher_graphdef: nnx.GraphDef, teacher_dit: Any,
                      tx: optax.GradientTransformation, shardings: TrainState, mesh: Mesh,
                      autoencoder: Autoencoder, null_ids: np.ndarray,
                      null_mask: np.ndarray, null_text: jax.Array | None = None) -> TrainStep:
  """`step(state, batch) -> (state, metrics)` of the student (a `TrainStep`: the
  optimiser, EMA and fault guard of training, `train.step.optimizer_step`), with the
  teacher's transformer parameters `teacher_dit` (sharded by the student's rules, or
  `ShapeDtypeStruct`s with shardings to lower it) a fixed input. `null_text`: the empty
  caption's text states, with cached text (as `train.step.make_train_step`'s)."""
  t = configs.typed(config)
  null_ids, null_mask = jnp.asarray(null_ids), jnp.asarray(null_mask)

  def loss(params, batch, key, teacher):
    return distill_loss(params, graphdef, teacher, teacher_graphdef, batch, key, config=t,
                        autoencoder=autoencoder, null_ids=null_ids, null_mask=null_mask,
                        null_text=null_text)

  return optimizer_step(t, tx, shardings, mesh, loss, fixed=teacher_dit)
