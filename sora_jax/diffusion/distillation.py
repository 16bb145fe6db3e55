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

METHODS = ("shortcut", "guidance")   # `distill.method`: a few-step student, CFG distillation

# student(x [B, ...], t [B], d [B]) -> average velocity over [t - d, t], [B, ...]
StudentFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


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
