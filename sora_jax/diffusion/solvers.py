"""ODE solvers for the flow `dx/dt = v(x, t)`, integrated from t = 1 (noise) towards 0.

Each solver is one `lax.fori_loop` over a `times [S + 1]` array (decreasing), so a
sampler compiles once per shape whatever the number of steps' values. The arithmetic
runs in float32 (float64 when `x` is float64, for convergence tests).

  euler      first order, one model call per step (diffusers' FlowMatchEulerDiscreteScheduler).
             With `eta > 0` it is stochastic: each step goes to the data prediction
             x0 = x - t v and re-noises it to the next time with a noise that keeps
             sqrt(1 - eta^2) of the step's own noise prediction x + (1 - t) v and draws
             eta of it afresh (eta 0: the Euler step exactly; eta 1: diffusers'
             `stochastic_sampling=True`). Not a discretisation of the reverse SDE: with
             the exact velocity of Gaussian data its samples keep the mean but shrink
             the spread (eta 1: a std of 0.18-0.20 at 24-256 steps for data of std 0.3,
             where the ODE gives 0.25-0.30), like sampling at a lower temperature: fewer
             stray objects from a model that is not exact, less variety.
  heun       second order, two calls per step (the last call at t = 0 is allowed: a flow's
             velocity is defined there).
  dpmpp_2m   DPM-Solver++(2M) in its flow form (alpha_t = 1 - t, sigma_t = t, data
             prediction x0 = x - t v): second order, one call per step, reusing the previous
             step's x0 prediction; first order on the first step and whenever a time is 0
             or 1 (where the log-SNR is infinite), so the final step to t = 0 is first order
             (diffusers' DPMSolverMultistepScheduler with prediction_type="flow_prediction",
             use_flow_sigmas=True, solver_order=2, final_sigmas_type="zero").

`start` (every solver): the index of `times` to start from, so that a schedule's tail
runs (SDEdit): a Python int, or a traced one, which makes the loop a `while_loop` whose
program serves every start (no reverse-mode differentiation through it then).

A velocity with state (`state` given: `velocity(x, t, state) -> (v, state)`, e.g. step
caching's residual and call counter, `sora_jax.diffusion.step_cache`) has its state
carried through the loop, call after call; the solver then returns `(x, state)`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[..., Any]  # (x [B, ...], t [B]) -> v, or (x, t, state) -> (v, state)


def _work_dtype(x: jax.Array) -> jnp.dtype:
  return jnp.promote_types(x.dtype, jnp.float32)


def _call(velocity: VelocityFn, x: jax.Array, t: jax.Array, dtype: jnp.dtype,
          state: Any) -> tuple[jax.Array, Any]:
  """`(v, state)`: the velocity at `(x, t)` (state None: a velocity without state)."""
  times = jnp.full((x.shape[0],), t, dtype)
  if state is None:
    return velocity(x.astype(dtype), times).astype(_work_dtype(x)), None
  v, state = velocity(x.astype(dtype), times, state)
  return v.astype(_work_dtype(x)), state


def _result(x: jax.Array, dtype: jnp.dtype, state: Any):
  return x.astype(dtype) if state is None else (x.astype(dtype), state)


def euler(velocity: VelocityFn, x: jax.Array, times: jax.Array, state: Any = None, *,
          eta: float = 0.0, noise: Callable[[jax.Array], jax.Array] | None = None,
          start: int | jax.Array = 0):
  """Euler steps `x <- x + (t_next - t) v(x, t)` over `times [S + 1]`, or with `eta > 0`
  stochastic ones (module docstring): `x <- (1 - t_next) x0 + t_next (sqrt(1 - eta^2) e
  + eta z)`, with x0 = x - t v, e = x + (1 - t) v and z = `noise(i)` at step i.

  Args:
    velocity: the (guided) model velocity.
    x: the starting point at `times[0]`, `[B, ...]`.
    times: `[S + 1]` decreasing times, e.g. `flow.sampling_times(S, shift)`.
    state: the velocity's initial state, for a velocity with state (module docstring).
    eta: the share of fresh noise in each step, in [0, 1] (0: the ODE); a Python float or a
      traced scalar (then the steps are stochastic whatever its value: a program that
      serves every eta of a sweep, eta 0 included, at the cost of the draws).
    noise: with `eta > 0`, `noise(i)` is step i's standard normal noise like `x` (the
      caller's: a sampler draws it from each example's seed), i counted from `start`.
    start: the index of `times` that `x` is at (module docstring); 0: all of them.

  Returns:
    x at `times[-1]`, same shape and dtype as `x` (and the final state, when given).
  """
  concrete = isinstance(eta, (int, float))
  if concrete and not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta={eta} must be in [0, 1].")
  stochastic = not concrete or eta != 0.0   # a traced eta draws, whatever its value
  if stochastic and noise is None:
    raise ValueError("a stochastic Euler step (eta > 0) needs its noise: pass noise(i).")
  work = _work_dtype(x)
  times = times.astype(work)

  def step(i, carry):
    x, state = carry
    t, t_next = times[i], times[i + 1]
    v, state = _call(velocity, x, t, work, state)
    if not stochastic:
      return x + (t_next - t) * v, state
    data, own_noise = x - t * v, x + (1.0 - t) * v
    fresh = noise(i - start).astype(work)
    return (1.0 - t_next) * data + t_next * (
        (1.0 - eta ** 2) ** 0.5 * own_noise + eta * fresh), state

  out, state = jax.lax.fori_loop(start, times.shape[0] - 1, step, (x.astype(work), state))
  return _result(out, x.dtype, state)


def heun(velocity: VelocityFn, x: jax.Array, times: jax.Array, state: Any = None, *,
         start: int | jax.Array = 0):
  """Heun's method (explicit trapezoid): an Euler predictor, then the average of the
  velocities at both ends. Same arguments as `euler`."""
  work = _work_dtype(x)
  times = times.astype(work)

  def step(i, carry):
    x, state = carry
    t, t_next = times[i], times[i + 1]
    v, state = _call(velocity, x, t, work, state)
    predicted = x + (t_next - t) * v
    v_next, state = _call(velocity, predicted, t_next, work, state)
    return x + (t_next - t) * 0.5 * (v + v_next), state

  out, state = jax.lax.fori_loop(start, times.shape[0] - 1, step, (x.astype(work), state))
  return _result(out, x.dtype, state)


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


def dpmpp_2m(velocity: VelocityFn, x: jax.Array, times: jax.Array, state: Any = None, *,
             start: int | jax.Array = 0):
  """DPM-Solver++(2M) for the flow (see the module docstring). Same arguments as `euler`
  (its first step, at `start`, first order)."""
  work = _work_dtype(x)
  times = times.astype(work)
  num_steps = times.shape[0] - 1

  def step(i, carry):
    x, x0_prev, state = carry
    t_prev, t, t_next = times[jnp.maximum(i - 1, start)], times[i], times[i + 1]
    v, state = _call(velocity, x, t, work, state)
    return dpmpp_2m_update(x, v, x0_prev, t_prev, t, t_next, i > start) + (state,)

  first = x.astype(work)
  out, _, state = jax.lax.fori_loop(start, num_steps, step,
                                    (first, jnp.zeros_like(first), state))
  return _result(out, x.dtype, state)


SOLVERS: dict[str, Callable[..., Any]] = {
    "euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}
# Model calls per step, for reporting cost at equal budgets.
CALLS_PER_STEP = {"euler": 1, "heun": 2, "dpmpp_2m": 1}
