"""Distilling a guided flow sampler into fewer model calls (pure functions).

Two students, both initialised from the teacher (`sora_jax.train.distill` trains them):

CFG distillation. The student takes the guidance scale w as an input and learns the
teacher's guided velocity `v_u + w (v_c - v_u)` (two passes) in one pass.

Shortcut models, distilled (Frans, Hafner, Levine and Abbeel 2024, "One Step Diffusion via
Shortcut Models"). The student `s(x_t, t, d)` also takes a step size d and predicts the
average velocity over [t - d, t], so that `x_{t-d} = x_t - d s(x_t, t, d)` (t = 1 is
noise, sampling goes down). It learns two things at once:
  d = 0: the teacher's guided velocity at (x_t, t) (the flow itself, guidance folded in);
  d = 2^k / M, k = 0 .. log2 M (M = `base_steps`): self-consistency, one step of d is two
     steps of d/2 of the student itself (no gradient through the target):
       s(x_t, t, d) <- (s(x_t, t, d/2) + s(x_t - d/2 s(x_t, t, d/2), t - d/2, d/2)) / 2
     where the half step of the finest level (1/2M) queries d = 0: two Euler steps of the
     distilled flow.
So a student samples in 1, 2, 4, ... M steps of size 1/steps (`sora_jax.sample`).

Trajectory distillation (the step-size student of shortcut models, trained on the
teacher's ODE rather than on itself): the student samples in S = `distill.steps` steps
(the uniform grid shifted by `distill.shift`, as a sampler shifts its own), and each of
its steps learns the teacher's guided ODE over that step, run in
`distill.teacher_steps` Euler steps — a one-round progressive distillation (Salimans and
Ho 2022) whose teacher is the multistep sampler itself (as in TRACT, Berthelot et al.
2023). Its inputs are where the student itself will be: a step i starts from i steps of
the (frozen) student from noise, not from a noised data sample, so that the student learns
on its own trajectory (the exposure bias that CausVid and Self-Forcing train against):
  s(x_i, t_i, 1/S) <- (x_i - Teacher_ODE(x_i, t_i -> t_{i+1})) / (t_i - t_{i+1}),
  t_i = shift(1 - i/S)  (the step input stays 1/S: it names the step count).
No data are read: only captions and noise. Unlike the self-consistency above, no error of
the student's own coarse steps is fed back into its targets.

Causal trajectory distillation (few-step chunks for streaming; the ODE stage of CausVid,
Yin et al. 2025): the same student and targets for a block-causal teacher (trained with
per-frame times, `sora_jax.autoregressive`), one block of latent frames at a time. Each
example learns one step of one block c: the blocks before it are clean (flow time 0, the
clip's own frames: teacher forcing), block c is where the student's own first steps take
its noise, and the blocks after it are noise at time 1, which block-causal attention keeps
from every output of block c. Velocities are kept to block c (`on_block`), so a rollout or
the teacher's ODE moves block c alone, and the loss is block c's. This is what
`autoregressive.stream` asks of a chunk: its past in the cache at time 0, its own noise
integrated. The past is the data's (`distill.past="data"`: teacher forcing), or the
student's own earlier chunks (`distill.past="student"`: Self-Forcing's rollouts, Huang et
al. 2025, `own_past`): each block before c made by the student as it streams it, its
`steps` steps from its own noise after the blocks it made before, so that block c learns
after the past it will really have (the exposure bias across chunks). The target stays the
teacher's ODE on block c from that past (Self-Forcing matches distributions instead: DMD,
below).

Of a bidirectional teacher (`distill.causal_frames`: CausVid's initialisation stage, its
ODE regression, before DMD): the causal student starts from the teacher's weights with the
attention mask changed, and the targets come from the teacher's guided ODE over the whole
clip, every frame at one time (`teacher_trajectory`, on the student's grid from noise to
0). An example learns one step of one block c: block c at the step's start on that
trajectory, the blocks before it at its end (clean: the teacher's own video, so the past
agrees with where the block is going), the blocks after it at its start (noise), and the
target block c's average velocity over the step. No data are read, and the inputs are the
teacher's trajectory, not the student's own rollouts.

Distribution matching (DMD, Yin et al. 2024; DMD2's loss without its GAN head; the second
stage of CausVid and all of Self-Forcing for a block-causal student): the `steps`-step
student is trained on its own samples, not on the teacher's trajectories. A sample x^ of
the student (its first `index` steps from noise without gradient, then one step with it,
read as a prediction of the clean video: x^ = x_i - t_i s(x_i, t_i, 1/S)) is noised to a
time t in `distill.dmd_times`, x_t = (1 - t) x^ + t e, and scored twice: by the teacher
(guided, the "real" score) and by a critic trained on the student's samples (the "fake"
score: a copy of the teacher, trained by the flow loss on x^ without gradient into the
student). Each one's clean prediction x0 = x_t - t v; the student's gradient at x^ is
  (x0_fake - x0_real) / mean |x^ - x0_real|      (`dmd_target`: the KL's gradient between
the student's and the data's distributions at t, normalised per example), which moves the
student's samples towards where the teacher puts data and away from where its own samples
already are. Both are learnt in one step of one optimiser (the critic is a parameter group
of the student's model, `model.critic`). A block-causal student makes its whole clip as it
streams it (`own_past` over every block, Self-Forcing's rollout), and one block c, drawn
per example, is remade with gradient from its past: its DMD loss is block c's, scored on
the whole clip.

Why shortcut models here, rather than DMD2 or progressive distillation: one network
(DMD2 trains a second, "fake" score network on student samples, and a GAN head for its
best results; progressive distillation needs log2(steps) sequential rounds); a
deterministic map whose targets are exact where the teacher is (the tests check it on a
Gaussian flow, where every quantity has a closed form); and one student that serves every
step count from 1 to M.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sora_jax.diffusion import flow

# `distill.method`: a few-step student (two ways, and chunk-wise for a block-causal
# teacher), CFG distillation
METHODS = ("shortcut", "trajectory", "causal", "dmd", "guidance")
STEP_METHODS = ("shortcut", "trajectory", "causal", "dmd")   # students with a step-size input

# student(x [B, ...], t [B], d [B]) -> average velocity over [t - d, t], [B, ...]
StudentFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# teacher(x [B, ...], t [B]) -> (guided) velocity at t, [B, ...]
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
# student(x [B, T, ...], block [B], t [B], d [B]) -> average velocity over [t - d, t] of a
# clip whose block `block` is at t, the blocks before it clean and those after it noise
BlockStudentFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def guided(v_cond: jax.Array, v_uncond: jax.Array, scale: jax.Array | float) -> jax.Array:
  """Classifier-free guidance `v_u + w (v_c - v_u)`; `scale`: a float or one per example `[B]`."""
  w = jnp.asarray(scale, jnp.float32)
  w = w.reshape(w.shape + (1,) * (v_cond.ndim - w.ndim))
  return v_uncond + w * (v_cond - v_uncond)


def check_base_steps(base_steps: int) -> int:
  """`log2(base_steps)`; ValueError unless `base_steps` is a power of two."""
  if base_steps < 1 or base_steps & (base_steps - 1):
    raise ValueError(f"distill.base_steps={base_steps} must be a power of two.")
  return base_steps.bit_length() - 1


def shortcut_times(key: jax.Array, batch: int, base_steps: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(t, d, half_query)`, each `[batch]`, for self-consistency targets: a level k drawn
  uniformly from 0 .. log2(base_steps), the step `d = 2^k / base_steps`, a time drawn
  uniformly from the grid {d, 2d, ..., 1} (so that t - d >= 0), and the step size the
  target's two half steps query the student with: d / 2, or 0 below the finest level."""
  levels = check_base_steps(base_steps) + 1
  k_level, k_time = jax.random.split(key)
  level = jax.random.randint(k_level, (batch,), 0, levels)
  d = jnp.power(2.0, level) / base_steps
  slots = jnp.round(1.0 / d).astype(jnp.int32)                # grid points of size d in (0, 1]
  t = d * (1 + jnp.floor(jax.random.uniform(k_time, (batch,)) * slots))
  half_query = jnp.where(level > 0, d / 2, 0.0)
  return t, d, half_query


def shortcut_target(student: StudentFn, x_t: jax.Array, t: jax.Array, d: jax.Array,
                    half_query: jax.Array) -> jax.Array:
  """The self-consistency target of `s(x_t, t, d)`: the average velocity of two student
  steps of d/2 (queried at `half_query`), without gradient. Shapes: x_t `[B, ...]`; t, d,
  half_query `[B]`. In float32 (float64 for float64 students)."""
  half = (d / 2).reshape(d.shape + (1,) * (x_t.ndim - 1))
  first = student(x_t, t, half_query)
  middle = x_t - half * first.astype(x_t.dtype)
  second = student(middle, t - d / 2, half_query)
  work = jnp.promote_types(first.dtype, jnp.float32)     # float32, or float64 in tests
  return jax.lax.stop_gradient((first.astype(work) + second.astype(work)) / 2)


def shortcut_sample(student: StudentFn, noise: jax.Array, steps: int) -> jax.Array:
  """`steps` uniform shortcut steps of size 1/steps from `noise` (t = 1) to t = 0, `[B, ...]`
  (the map a student learns; `sora_jax.sample` runs the same steps as Euler steps)."""
  d = 1.0 / steps
  b = noise.shape[0]

  def step(i, x):
    t = 1.0 - i * d
    return x - d * student(x, jnp.full((b,), t), jnp.full((b,), d)).astype(x.dtype)

  return jax.lax.fori_loop(0, steps, step, noise)


def student_grid(steps: int, shift: float = 1.0) -> jax.Array:
  """`[steps + 1]` times of a `steps`-step student, 1 down to 0: uniform, then shifted
  (`flow.shift_time`; the sampler's `schedule=uniform` grid at `sample.shift`)."""
  if steps < 1:
    raise ValueError(f"steps={steps} must be at least 1.")
  return flow.sampling_times(steps, shift, "uniform")


def trajectory_starts(key: jax.Array, batch: int, steps: int, shift: float = 1.0
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(index, t, t_next)`, each `[batch]`: which of a `steps`-step student's steps each
  example learns (uniform over 0 .. steps - 1) and the times that step goes from and to
  on the student's grid (`student_grid`)."""
  grid = student_grid(steps, shift)
  index = jax.random.randint(key, (batch,), 0, steps)
  return index, grid[index], grid[index + 1]


def student_rollout(student: StudentFn, noise: jax.Array, index: jax.Array,
                    steps: int, shift: float = 1.0) -> jax.Array:
  """Each example's state after its first `index` (`[B]`, < steps) steps on the student's
  grid from `noise [B, ...]` (t = 1), without gradient: `[B, ...]` at `grid[index]`.
  Each step moves by its length times the student's output, queried with the step input
  1/steps (the step count it samples with; on a uniform grid, the step's length). Runs
  steps - 1 calls of the student on the whole batch (an example stops moving once it has
  made its steps)."""
  b = noise.shape[0]
  work = jnp.promote_types(noise.dtype, jnp.float32)      # float32, or float64 in tests
  grid = student_grid(steps, shift).astype(work)
  moving = lambda j: (j < index).reshape((b,) + (1,) * (noise.ndim - 1))

  def step(j, x):
    t = jnp.full((b,), grid[j], work)
    v = student(x, t, jnp.full((b,), 1.0 / steps, work))
    moved = x - (grid[j] - grid[j + 1]) * v.astype(x.dtype)
    return jnp.where(moving(j), moved, x)

  return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps - 1, step, noise))


def teacher_average_velocity(teacher: VelocityFn, x_t: jax.Array, t: jax.Array, d: jax.Array,
                             substeps: int) -> jax.Array:
  """The average velocity `(x_t - x_{t-d}) / d` of `substeps` Euler steps of `teacher` from
  `x_t [B, ...]` at `t [B]` down to `t - d` (`d [B]`), without gradient: the target of a
  student step of size d. In float32 (float64 for float64 inputs)."""
  if substeps < 1:
    raise ValueError(f"substeps={substeps} must be at least 1.")
  work = jnp.promote_types(x_t.dtype, jnp.float32)
  x_t = x_t.astype(work)
  h = (d / substeps).astype(work)
  h_b = h.reshape(h.shape + (1,) * (x_t.ndim - 1))

  def step(i, y):
    return y - h_b * teacher(y, t - i * h).astype(work)

  end = jax.lax.fori_loop(0, substeps, step, x_t)
  return jax.lax.stop_gradient((x_t - end) / (d.astype(work)).reshape(h_b.shape))


def teacher_trajectory(teacher: VelocityFn, noise: jax.Array, index: jax.Array, steps: int,
                       shift: float = 1.0, substeps: int = 1
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The teacher's ODE from `noise [B, ...]` (t = 1) to t = 0 over a `steps`-step student's
  grid (`student_grid`), each step in `substeps` Euler steps, without gradient.

  Returns `(start, velocity, end)`, each `[B, ...]`: each example's state at the start of
  its step `index [B]` (< steps), the teacher's average velocity over that step (its
  target, `teacher_average_velocity`) and the ODE's end at t = 0. Runs steps * substeps
  calls of the teacher on the whole batch. In float32 (float64 for float64 inputs)."""
  b = noise.shape[0]
  work = jnp.promote_types(noise.dtype, jnp.float32)
  grid = student_grid(steps, shift).astype(work)
  x = noise.astype(work)
  at = lambda j: (index == j).reshape((b,) + (1,) * (noise.ndim - 1))

  def step(j, carry):
    y, start, velocity = carry
    d = jnp.full((b,), grid[j] - grid[j + 1], work)
    v = teacher_average_velocity(teacher, y, jnp.full((b,), grid[j], work), d, substeps)
    moved = y - d.reshape(at(j).shape) * v
    return moved, jnp.where(at(j), y, start), jnp.where(at(j), v, velocity)

  end, start, velocity = jax.lax.fori_loop(0, steps, step, (x, x, jnp.zeros_like(x)))
  return jax.lax.stop_gradient((start, velocity, end))


def block_masks(block_index: jax.Array, frames: int, block: int
                ) -> tuple[jax.Array, jax.Array]:
  """`(past, current)`, each `[B, frames]` bool: the latent frames before block
  `block_index [B]` and those in it, blocks being `block` frames long."""
  if block < 1 or frames % block:
    raise ValueError(f"{frames} latent frames do not split into causal blocks of {block}.")
  of_frame = jnp.arange(frames) // block                                    # [frames]
  which = block_index[:, None]
  return of_frame[None] < which, of_frame[None] == which


def causal_frame_times(block_index: jax.Array, t: jax.Array, frames: int, block: int
                       ) -> jax.Array:
  """`[B, frames]` flow times of a clip whose block `block_index [B]` is at time `t [B]`:
  0 before it (clean), 1 after it (noise)."""
  past, current = block_masks(block_index, frames, block)
  return jnp.where(past, 0.0, jnp.where(current, t[:, None].astype(jnp.float32), 1.0))


def own_past(student: BlockStudentFn, noise: jax.Array, which: jax.Array, block: int,
             steps: int, shift: float = 1.0, *, whole: bool = False) -> jax.Array:
  """Each example's clip with the blocks before its block `which [B]` made by the student
  itself, as streaming makes them (Self-Forcing's rollouts), without gradient.

  From `noise [B, T, ...]` (T latent frames, blocks of `block`), block 0, 1, ... of each
  example is made in turn, each in the student's `steps` Euler steps on its grid
  (`student_grid`) from its own noise, after the blocks made before it (clean, time 0),
  the step input 1/steps. Returns `[B, T, ...]`: the made blocks before `which`, the
  others still `noise`. Runs (T / block - 1) * steps calls of the student on the whole
  batch (an example keeps a block it does not need unchanged). `whole`: the last block
  too (`which` = T / block: the clip the student streams, T / block * steps calls). In
  float32 (float64 for float64 inputs)."""
  b, frames = noise.shape[:2]
  blocks = frames // block      # (block_masks, traced in `make`, refuses a remainder)
  work = jnp.promote_types(noise.dtype, jnp.float32)
  grid = student_grid(steps, shift).astype(work)
  per_frame = lambda m: m.reshape(m.shape + (1,) * (noise.ndim - 2))

  def make(j, x):
    index = jnp.full((b,), j, jnp.int32)
    current = per_frame(block_masks(index, frames, block)[1]).astype(work)

    def step(i, y):
      v = student(y, index, jnp.full((b,), grid[i], work), jnp.full((b,), 1.0 / steps, work))
      return y - (grid[i] - grid[i + 1]) * current * v.astype(work)

    made = jax.lax.fori_loop(0, steps, step, x)
    return jnp.where(per_frame((j < which)[:, None]), made, x)

  made = blocks if whole else blocks - 1
  return jax.lax.stop_gradient(jax.lax.fori_loop(0, made, make, noise.astype(work)))


def dmd_target(sample: jax.Array, x_t: jax.Array, t: jax.Array, v_real: jax.Array,
               v_fake: jax.Array) -> jax.Array:
  """The regression target of a DMD student's sample `sample [B, ...]` (module docstring),
  without gradient: `sample - (x0_fake - x0_real) / mean|sample - x0_real|` (the mean per
  example), with `x0 = x_t - t v` of the teacher's (`v_real`) and the critic's (`v_fake`)
  velocities at `x_t [B, ...]`, the sample noised to `t [B]`. Half the squared distance
  to it has the DMD gradient at the sample. In float32 (float64 for float64 inputs)."""
  work = jnp.promote_types(sample.dtype, jnp.float32)
  t_b = t.astype(work).reshape(t.shape + (1,) * (sample.ndim - 1))
  x0_real = x_t.astype(work) - t_b * v_real.astype(work)
  x0_fake = x_t.astype(work) - t_b * v_fake.astype(work)
  sample = sample.astype(work)
  scale = jnp.mean(jnp.abs(sample - x0_real), axis=tuple(range(1, sample.ndim)),
                   keepdims=True)
  gradient = (x0_fake - x0_real) / jnp.maximum(scale, jnp.finfo(work).tiny)
  return jax.lax.stop_gradient(sample - gradient)


def on_block(velocity: Callable[..., jax.Array], current: jax.Array) -> Callable[..., jax.Array]:
  """`velocity(x [B, T, ...], *args)` kept to the frames `current [B, T]` (zero elsewhere):
  a rollout or an ODE with it moves those frames alone."""
  def kept(x, *args):
    v = velocity(x, *args)
    return v * current.reshape(current.shape + (1,) * (v.ndim - 2)).astype(v.dtype)
  return kept
