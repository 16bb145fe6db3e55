"""ODE solvers for the flow `dx/dt = v(x, t)`, integrated from t = 1 (noise) towards 0.

Each solver is one `lax.fori_loop` over a `times [S + 1]` array (decreasing), so a
sampler compiles once per shape whatever the number of steps' values. The arithmetic
runs in float32 (float64 when `x` is float64, for convergence tests).

  euler      first order, one model call per step (diffusers' FlowMatchEulerDiscreteScheduler).
  heun       second order, two calls per step (the last call at t = 0 is allowed: a flow's
             velocity is defined there).
  dpmpp_2m   DPM-Solver++(2M) in its flow form (alpha_t = 1 - t, sigma_t = t, data
             prediction x0 = x - t v): second order, one call per step, reusing the previous
             step's x0 prediction; first order on the first step and whenever a time is 0
             or 1 (where the log-SNR is infinite), so the final step to t = 0 is first order
             (diffusers' DPMSolverMultistepScheduler with prediction_type="flow_prediction",
             use_flow_sigmas=True, solver_order=2, final_sigmas_type="zero").
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], t [B]) -> v


def _work_dtype(x: jax.Array) -> jnp.dtype:
  return jnp.promote_types(x.dtype, jnp.float32)


def _call(velocity: VelocityFn, x: jax.Array, t: jax.Array, dtype: jnp.dtype) -> jax.Array:
  v = velocity(x.astype(dtype), jnp.full((x.shape[0],), t, dtype))
  return v.astype(_work_dtype(x))


def euler(velocity: VelocityFn, x: jax.Array, times: jax.Array) -> jax.Array:
  """Euler steps `x <- x + (t_next - t) v(x, t)` over `times [S + 1]`.

  Args:
    velocity: the (guided) model velocity.
    x: the starting point at `times[0]`, `[B, ...]`.
    times: `[S + 1]` decreasing times, e.g. `flow.sampling_times(S, shift)`.

  Returns:
    x at `times[-1]`, same shape and dtype as `x`.
  """
  work = _work_dtype(x)
  times = times.astype(work)

  def step(i, x):
    t, t_next = times[i], times[i + 1]
    return x + (t_next - t) * _call(velocity, x, t, work)

  return jax.lax.fori_loop(0, times.shape[0] - 1, step, x.astype(work)).astype(x.dtype)


def heun(velocity: VelocityFn, x: jax.Array, times: jax.Array) -> jax.Array:
  """Heun's method (explicit trapezoid): an Euler predictor, then the average of the
  velocities at both ends. Same arguments as `euler`."""
  work = _work_dtype(x)
  times = times.astype(work)

  def step(i, x):
    t, t_next = times[i], times[i + 1]
    v = _call(velocity, x, t, work)
    predicted = x + (t_next - t) * v
    v_next = _call(velocity, predicted, t_next, work)
    return x + (t_next - t) * 0.5 * (v + v_next)

  return jax.lax.fori_loop(0, times.shape[0] - 1, step, x.astype(work)).astype(x.dtype)


def _log_snr(t: jax.Array) -> jax.Array:
  """lambda(t) = log((1 - t) / t), +-inf at t = 0 and 1."""
  return jnp.log(1.0 - t) - jnp.log(t)


def dpmpp_2m_update(x: jax.Array, v: jax.Array, x0_prev: jax.Array, t_prev: jax.Array,
                    t: jax.Array, t_next: jax.Array, second_order: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """One DPM-Solver++(2M) step of the flow from `t` to `t_next`.

  Args:
    x: `[B, ...]` state at t; v: the model velocity there.
    x0_prev: the previous step's data prediction (ignored at first order).
    t_prev, t, t_next: scalar times of the previous, current and next step.
    second_order: bool scalar; the update is first order anyway when a time is 0 or 1.

  Returns:
    `(x at t_next, data prediction x0 = x - t v)`.
  """
  x0 = x - t * v
  ratio = jnp.where(t > 0, t_next / jnp.where(t > 0, t, 1.0), 0.0)
  first = ratio * x + (1.0 - ratio) * x0              # DDIM, identical to an Euler step
  interior = lambda s: (s > 0) & (s < 1)
  second_order = second_order & interior(t_prev) & interior(t) & interior(t_next)
  safe = lambda s: jnp.where(interior(s), s, 0.5)
  h = _log_snr(safe(t_next)) - _log_snr(safe(t))
  h_prev = _log_snr(safe(t)) - _log_snr(safe(t_prev))
  d = x0 + 0.5 * (h / jnp.where(second_order, h_prev, 1.0)) * (x0 - x0_prev)
  second = ratio * x + (1.0 - t_next) * (1.0 - jnp.exp(-h)) * d
  return jnp.where(second_order, second, first), x0


def dpmpp_2m(velocity: VelocityFn, x: jax.Array, times: jax.Array) -> jax.Array:
  """DPM-Solver++(2M) for the flow (see the module docstring). Same arguments as `euler`."""
  work = _work_dtype(x)
  times = times.astype(work)
  num_steps = times.shape[0] - 1

  def step(i, carry):
    x, x0_prev = carry
    t_prev, t, t_next = times[jnp.maximum(i - 1, 0)], times[i], times[i + 1]
    v = _call(velocity, x, t, work)
    return dpmpp_2m_update(x, v, x0_prev, t_prev, t, t_next, i > 0)

  start = x.astype(work)
  out, _ = jax.lax.fori_loop(0, num_steps, step, (start, jnp.zeros_like(start)))
  return out.astype(x.dtype)


SOLVERS: dict[str, Callable[[VelocityFn, jax.Array, jax.Array], jax.Array]] = {
    "euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}
# Model calls per step, for reporting cost at equal budgets.
CALLS_PER_STEP = {"euler": 1, "heun": 2, "dpmpp_2m": 1}
