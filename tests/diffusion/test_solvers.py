"""Flow ODE solvers: convergence order on a flow with a closed-form solution, and step-by-step
agreement with diffusers' flow schedulers on the same model outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import flow
from sora_jax.diffusion.solvers import CALLS_PER_STEP, SOLVERS, dpmpp_2m, dpmpp_2m_update, euler

# Data x0 ~ N(MU, S^2) per coordinate: with x_t = (1 - t) x0 + t n, the marginal is
# N((1 - t) MU, (1 - t)^2 S^2 + t^2) and the ODE maps x_1 to x_0 = MU + S x_1.
MU, S = 0.7, 0.3


def gaussian_velocity(x, t):
  t = t.reshape(t.shape + (1,) * (x.ndim - 1))
  var = (1 - t) ** 2 * S ** 2 + t ** 2
  centred = x - (1 - t) * MU
  x0 = MU + (1 - t) * S ** 2 * centred / var
  noise = t * centred / var
  return noise - x0


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_solver_converges_at_its_order(solver, order):
  # From t = 0.95 to 0.02 on shifted times: DPM-Solver++ drops to first order on a step
  # that reaches t = 0 (infinite log-SNR), which would hide its order.
  sd = lambda t: np.sqrt((1 - t) ** 2 * S ** 2 + t ** 2)
  with jax.enable_x64(True):
    z = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float64)
    steps = np.array([32, 64, 128, 256])
    errors = []
    for n in steps:
      times = flow.shift_time(jnp.linspace(0.95, 0.02, int(n) + 1, dtype=jnp.float64), 2.0)
      a, b = float(times[0]), float(times[-1])
      out = SOLVERS[solver](gaussian_velocity, (1 - a) * MU + sd(a) * z, times)
      assert out.dtype == jnp.float64
      errors.append(float(jnp.abs(out - ((1 - b) * MU + sd(b) * z)).max()))
  slopes = -np.diff(np.log(errors)) / np.diff(np.log(steps))
  assert np.all(np.abs(slopes[1:] - order) < 0.15), (errors, slopes)


def test_solvers_reach_the_data_at_t0():
  """The full schedule 1 -> 0 (what sampling runs) lands on the exact endpoint MU + S x1."""
  with jax.enable_x64(True):
    x1 = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8)), jnp.float64)
    for name, solve in SOLVERS.items():
      out = solve(gaussian_velocity, x1, flow.sampling_times(256, 3.0).astype(jnp.float64))
      np.testing.assert_allclose(out, MU + S * x1, atol=2e-2, err_msg=name)


def test_stochastic_euler_keeps_the_mean_and_shrinks_the_spread():
  """With the exact velocity of N(MU, S^2) data: eta 0 is the ODE (std -> S), eta > 0 keeps
  the mean and samples a narrower distribution, the narrower the more fresh noise."""
  with jax.enable_x64(True):
    x1 = jnp.asarray(np.random.default_rng(0).normal(size=(100, 200)), jnp.float64)
    noise = lambda i: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), i),
                                        x1.shape, jnp.float64)
    times = flow.sampling_times(64, 3.0).astype(jnp.float64)
    stds = []
    for eta in (0.0, 0.5, 1.0):
      out = euler(gaussian_velocity, x1, times, eta=eta, noise=noise)
      assert abs(float(out.mean()) - MU) < 0.01, eta
      stds.append(float(out.std()))
    np.testing.assert_array_equal(euler(gaussian_velocity, x1, times, eta=0.0, noise=noise),
                                  euler(gaussian_velocity, x1, times))
    # A traced eta (one program for a sweep) steps as the Python value does; traced 0
    # draws but weighs the draws by 0: the ODE again, to rounding.
    traced = jax.jit(lambda eta: euler(gaussian_velocity, x1, times, eta=eta, noise=noise))
    np.testing.assert_allclose(traced(0.5), euler(gaussian_velocity, x1, times, eta=0.5,
                                                  noise=noise), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(traced(0.0), euler(gaussian_velocity, x1, times),
                               rtol=1e-12, atol=1e-12)
  assert stds[0] > 0.9 * S and stds[0] > stds[1] > stds[2], stds
  assert stds[2] < 0.7 * S, stds
  with pytest.raises(ValueError, match="needs its noise"):
    euler(gaussian_velocity, x1, times, eta=0.5)
  with pytest.raises(ValueError, match="eta=2"):
    euler(gaussian_velocity, x1, times, eta=2, noise=noise)


def test_a_start_index_runs_the_schedules_tail():
  """`start=k` (SDEdit's tail) integrates exactly as the solver does on `times[k:]`, a
  Python k or a traced one (one program for every start), stochastic steps included
  (noise counted from the start)."""
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 5)), jnp.float64)
    times = flow.sampling_times(8, 3.0).astype(jnp.float64)
    noise = lambda i: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(2), i), x.shape,
                                        jnp.float64)
    variants = {**SOLVERS, "euler_eta": lambda *a, **k: euler(*a, eta=0.7, noise=noise, **k)}
    for name, solve in variants.items():
      traced = jax.jit(lambda x, start, solve=solve: solve(_toy_model, x, times, start=start))
      for start in (0, 3, 7):
        tail = solve(_toy_model, x, times[start:])
        np.testing.assert_allclose(solve(_toy_model, x, times, start=start), tail,
                                   rtol=1e-12, atol=1e-12, err_msg=f"{name} {start}")
        np.testing.assert_allclose(traced(x, start), tail, rtol=1e-12, atol=1e-12,
                                   err_msg=f"{name} {start} traced")
      assert traced._cache_size() == 1, name  # pylint: disable=protected-access
      # The result keeps the input's dtype (the arithmetic is float32 for bfloat16).
      assert solve(_toy_model, x.astype(jnp.bfloat16), times, start=3).dtype == jnp.bfloat16


def _toy_model(x, t):
  """Any smooth velocity field works for comparing update rules."""
  t = t.reshape(t.shape + (1,) * (x.ndim - 1))
  return jnp.sin(3 * x) * (1 + t) - 0.5 * x * t


def _replay_diffusers(scheduler, x, steps):
  import torch  # pylint: disable=g-import-not-at-top
  scheduler.set_timesteps(steps)
  sigmas = scheduler.sigmas.numpy().astype(np.float64)
  sample = torch.from_numpy(np.asarray(x))
  states = []
  for i, timestep in enumerate(scheduler.timesteps):
    out = _toy_model(jnp.asarray(sample.numpy()), jnp.full((x.shape[0],), sigmas[i], jnp.float32))
    sample = scheduler.step(torch.from_numpy(np.asarray(out)), timestep, sample).prev_sample
    states.append(sample.numpy())
  return sigmas, states


@pytest.mark.parametrize("steps", [6, 10])
def test_euler_matches_diffusers_flow_match_euler(steps):
  from diffusers import FlowMatchEulerDiscreteScheduler  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(1).normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
  sigmas, states = _replay_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0), x, steps)
  for k, expected in enumerate(states, start=1):
    ours = euler(_toy_model, jnp.asarray(x), jnp.asarray(sigmas[:k + 1], jnp.float32))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5, err_msg=f"step {k}")


def test_stochastic_euler_matches_diffusers_stochastic_sampling(monkeypatch):
  """eta 1 is diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), step by
  step, given the same noise."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import FlowMatchEulerDiscreteScheduler  # pylint: disable=g-import-not-at-top
  from diffusers.schedulers import scheduling_flow_match_euler_discrete as module
  steps = 6
  x = np.random.default_rng(1).normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
  noises = np.random.default_rng(2).normal(size=(steps,) + x.shape).astype(np.float32)
  drawn = iter(noises)
  monkeypatch.setattr(module, "randn_tensor",
                      lambda shape, **kwargs: torch.from_numpy(next(drawn)))
  sigmas, states = _replay_diffusers(
      FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True), x, steps)
  for k, expected in enumerate(states, start=1):
    ours = euler(_toy_model, jnp.asarray(x), jnp.asarray(sigmas[:k + 1], jnp.float32),
                 eta=1.0, noise=lambda i: jnp.asarray(noises)[i])
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5, err_msg=f"step {k}")


@pytest.mark.parametrize("steps", [5, 12])
def test_dpmpp_2m_matches_diffusers_dpm_solver_flow(steps):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DPMSolverMultistepScheduler  # pylint: disable=g-import-not-at-top
  scheduler = DPMSolverMultistepScheduler(
      prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, solver_order=2,
      algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True)
  x = np.random.default_rng(2).normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
  scheduler.set_timesteps(steps)
  sigmas = jnp.asarray(scheduler.sigmas.numpy(), jnp.float32)
  theirs, ours, x0_prev = torch.from_numpy(x), jnp.asarray(x), jnp.zeros_like(x)
  for i, timestep in enumerate(scheduler.timesteps):
    v = _toy_model(ours, jnp.full((x.shape[0],), sigmas[i]))
    theirs = scheduler.step(torch.from_numpy(np.asarray(v)), timestep, theirs).prev_sample
    ours, x0_prev = dpmpp_2m_update(ours, v, x0_prev, sigmas[max(i - 1, 0)], sigmas[i],
                                    sigmas[i + 1], jnp.asarray(i > 0))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"step {i}")
  # The fori_loop solver is the same sequence of updates.
  np.testing.assert_allclose(dpmpp_2m(_toy_model, jnp.asarray(x), sigmas), ours, atol=1e-5)


@pytest.mark.parametrize("steps", [3, 8])
def test_schedules_match_diffusers(steps):
  from diffusers import (FlowMatchEulerDiscreteScheduler,  # pylint: disable=g-import-not-at-top
                         UniPCMultistepScheduler)
  from sora_jax.diffusion.flow import sampling_times  # pylint: disable=g-import-not-at-top
  euler_s = FlowMatchEulerDiscreteScheduler(shift=3.0)
  euler_s.set_timesteps(steps)
  np.testing.assert_allclose(sampling_times(steps, 3.0, "flow_match_euler"), euler_s.sigmas,
                             rtol=1e-5, atol=1e-6)
  unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                  flow_shift=3.0)
  unipc.set_timesteps(steps)
  np.testing.assert_allclose(sampling_times(steps, 3.0, "flow_sigmas"), unipc.sigmas,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_a_velocity_with_state_gets_every_call_in_order(solver):
  """With `state`, the solver carries the velocity's state through the loop: here a call
  counter and the times it saw; the result equals the stateless solve."""
  times = flow.sampling_times(4, 2.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32)

  def counting(x, t, state):
    count, seen = state
    return gaussian_velocity(x, t), (count + 1, seen.at[count].set(t[0]))

  calls = 4 * CALLS_PER_STEP[solver]
  out, (count, seen) = SOLVERS[solver](counting, x, times, (jnp.int32(0), jnp.zeros(calls)))
  np.testing.assert_array_equal(out, SOLVERS[solver](gaussian_velocity, x, times))
  assert int(count) == calls
  expected = times[:-1] if solver != "heun" else jnp.stack([times[:-1], times[1:]], 1).ravel()
  np.testing.assert_allclose(seen, expected, rtol=1e-6)
