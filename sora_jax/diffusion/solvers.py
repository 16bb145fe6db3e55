"""ODE solvers for the flow, each one `lax.fori_loop` so a sampler compiles once."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], t [B]) -> v


def euler(velocity: VelocityFn, x: jax.Array, times: jax.Array) -> jax.Array:
  """Integrates `dx/dt = velocity(x, t)` over `times [S + 1]` (decreasing) with Euler steps.

  Args:
    velocity: the (guided) model velocity.
    x: the starting point at `times[0]`, `[B, ...]`.
    times: `[S + 1]` times, e.g. `flow.sampling_times(S, shift)`.

  Returns:
    x at `times[-1]`, same shape and dtype as `x`.
  """
  def step(i, x):
    t, t_next = times[i], times[i + 1]
    v = velocity(x, jnp.full((x.shape[0],), t, jnp.float32))
    return (x.astype(jnp.float32) + (t_next - t) * v.astype(jnp.float32)).astype(x.dtype)

  return jax.lax.fori_loop(0, times.shape[0] - 1, step, x)


SOLVERS = {"euler": euler}
