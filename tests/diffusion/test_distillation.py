"""Distillation's math on a Gaussian flow, where the teacher's velocity and every map are
known in closed form (float64): the shortcut targets, their fixed point, and a student
trained with them that reaches it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sora_jax.diffusion import distillation, flow

MEAN, STD = 1.5, 0.5          # data x0 ~ N(MEAN, STD^2) per coordinate; noise ~ N(0, 1)


@pytest.fixture(autouse=True)
def float64():
  """This module's closed forms, in float64."""
  with jax.enable_x64(True):
    yield


def gaussian_velocity(x, t):
  """The exact flow velocity E[noise - x0 | x_t = x] of the Gaussian data (t [B])."""
  t = t.reshape(t.shape + (1,) * (x.ndim - 1))
  m = (1 - t) * MEAN
  var = (1 - t) ** 2 * STD ** 2 + t ** 2
  return (t - (1 - t) * STD ** 2) / var * (x - m) - MEAN


def gaussian_map(x, t, s):
  """The exact flow map from time t to s (both [B]): x_s = m_s + (std_s / std_t)(x - m_t)."""
  shape = t.shape + (1,) * (x.ndim - 1)
  t, s = t.reshape(shape), s.reshape(shape)
  std = lambda u: jnp.sqrt((1 - u) ** 2 * STD ** 2 + u ** 2)
  return (1 - s) * MEAN + std(s) / std(t) * (x - (1 - t) * MEAN)


def euler_average(x, t, d, substeps):
  """The average velocity over [t - d, t] of `substeps` Euler steps of the exact velocity."""
  h = d / substeps
  y = x
  for i in range(substeps):
    y = y - h[:, None] * gaussian_velocity(y, t - i * h)
  return (x - y) / d[:, None]


def fixed_point_student(base_steps):
  """The student the shortcut targets make consistent: at d = 2^k / M, the average
  velocity of 2^(k+1) Euler steps of 1 / 2M of the teacher (d = 0: the teacher)."""
  def student(x, t, d):
    levels = jnp.round(d * base_steps * 2).astype(int)     # substeps of 1 / 2M
    out = gaussian_velocity(x, t)
    for n in range(1, 2 * base_steps + 1):
      out = jnp.where((levels == n)[:, None], euler_average(x, t, jnp.maximum(d, 1e-9), n), out)
    return out
  return student


def fit(loss, params, steps=1500):
  """`params` after `steps` Adam steps (learning rate 0.05) on `loss(params, key)`."""
  tx = optax.adam(0.05)

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.grad(loss)(params, key)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for i in range(steps):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  return params


def test_guided_is_classifier_free_guidance():
  rng = np.random.default_rng(0)
  v_c, v_u = rng.standard_normal((2, 3, 4))
  w = np.array([1.0, 4.0, 0.0])
  got = distillation.guided(jnp.asarray(v_c), jnp.asarray(v_u), jnp.asarray(w))
  np.testing.assert_allclose(got, v_u + w[:, None] * (v_c - v_u), rtol=1e-12)
  np.testing.assert_allclose(distillation.guided(v_c, v_u, 2.5), v_u + 2.5 * (v_c - v_u))


def test_shortcut_times_lie_on_each_levels_grid():
  t, d, half = distillation.shortcut_times(jax.random.key(0), 4096, 8)
  chex.assert_shape((t, d, half), (4096,))
  np.testing.assert_allclose(np.unique(np.asarray(d)), [1 / 8, 1 / 4, 1 / 2, 1])
  slots = np.asarray(t / d)
  np.testing.assert_allclose(slots, np.round(slots), atol=1e-9)   # t on the grid of d
  assert (t - d >= -1e-12).all() and (t <= 1 + 1e-12).all()
  np.testing.assert_allclose(half, np.where(np.asarray(d) > 1 / 8, np.asarray(d) / 2, 0.0))
  with pytest.raises(ValueError, match="power of two"):
    distillation.check_base_steps(6)


def test_shortcut_target_of_the_fixed_point_is_the_fixed_point():
  """Two half steps of the fixed-point student give its own full step at every level, so
  its loss is zero; a perturbed student's target differs from its prediction."""
  base_steps = 8
  student = fixed_point_student(base_steps)
  t, d, half = distillation.shortcut_times(jax.random.key(1), 256, base_steps)
  x = gaussian_map(MEAN + STD * jax.random.normal(jax.random.key(2), (256, 3)),
                   jnp.zeros(256), t)                                # x_t of the flow
  target = distillation.shortcut_target(student, x, t, d, half)
  np.testing.assert_allclose(target, student(x, t, d), rtol=1e-9, atol=1e-9)
  perturbed = lambda x, t, d: student(x, t, d) * (1 + 0.1 * d[:, None])
  gap = distillation.shortcut_target(perturbed, x, t, d, half) - perturbed(x, t, d)
  assert float(jnp.abs(gap).max()) > 1e-3


def test_one_step_of_the_fixed_point_is_near_the_exact_flow_map():
  """The fixed point's few-step maps are all the 2M-step Euler map of the teacher: from
  noise to data, an order of magnitude nearer the exact map than the teacher's own one
  Euler step."""
  base_steps = 8
  student = fixed_point_student(base_steps)
  noise = jax.random.normal(jax.random.key(3), (512, 2))
  exact = gaussian_map(noise, jnp.ones(512), jnp.zeros(512))
  for steps in (1, 2, 4):
    got = distillation.shortcut_sample(student, noise, steps)
    chex.assert_shape(got, noise.shape)
    np.testing.assert_allclose(got, euler_average(noise, jnp.ones(512), jnp.ones(512),
                                                  2 * base_steps) * -1 + noise, rtol=1e-9)
    one_euler_step = noise - gaussian_velocity(noise, jnp.ones(512))
    assert float(jnp.abs(got - exact).mean()) < 0.1 * float(jnp.abs(one_euler_step - exact).mean())


def test_a_student_trained_on_the_targets_reaches_the_fixed_point():
  """A student affine in x per (t, d) cell of the grid, trained by Adam on the losses
  (the teacher's velocity at d = 0, self-consistency above), samples in 1, 2 and 4 steps
  what the fixed point samples."""
  base_steps = 4
  cells_t = 2 * base_steps                   # t in {1/2M, ..., 1}: every query time
  levels = distillation.check_base_steps(base_steps) + 2          # d = 0 and 2^k / M

  def cell(t, d):
    t_index = jnp.round(t * cells_t).astype(int) - 1
    level = jnp.where(d > 0, jnp.round(jnp.log2(jnp.maximum(d, 1e-9) * base_steps)) + 1, 0)
    return t_index, level.astype(int)

  def make_student(params):
    def student(x, t, d):
      i, k = cell(t, d)
      return params["a"][i, k][:, None] * x + params["b"][i, k][:, None]
    return student

  def loss(params, key):
    k_x, k_t, k_s = jax.random.split(key, 3)
    student = make_student(params)
    base_t = jax.random.randint(k_t, (128,), 1, cells_t + 1) / cells_t
    x_base = gaussian_map(MEAN + STD * jax.random.normal(k_x, (128, 1)), jnp.zeros(128), base_t)
    base = student(x_base, base_t, jnp.zeros(128)) - gaussian_velocity(x_base, base_t)
    t, d, half = distillation.shortcut_times(k_s, 128, base_steps)
    x = gaussian_map(MEAN + STD * jax.random.normal(jax.random.fold_in(k_x, 1), (128, 1)),
                     jnp.zeros(128), t)
    cons = student(x, t, d) - distillation.shortcut_target(student, x, t, d, half)
    return jnp.mean(base ** 2) + jnp.mean(cons ** 2)

  params = {"a": jnp.zeros((cells_t, levels)), "b": jnp.zeros((cells_t, levels))}
  params = fit(loss, params)
  noise = jax.random.normal(jax.random.key(7), (256, 1))
  want = fixed_point_student(base_steps)
  for steps in (1, 2, 4):
    got = distillation.shortcut_sample(make_student(params), noise, steps)
    np.testing.assert_allclose(got, distillation.shortcut_sample(want, noise, steps),
                               atol=0.02)


def test_the_teachers_average_velocity_is_its_euler_steps_and_nears_the_exact_map():
  """One substep is one Euler step of the teacher; n substeps are `euler_average`'s; many
  approach the exact flow map of the Gaussian data."""
  x = gaussian_map(MEAN + STD * jax.random.normal(jax.random.key(4), (64, 2)),
                   jnp.zeros(64), jnp.full(64, 0.75))
  t, d = jnp.full(64, 0.75), jnp.full(64, 0.25)
  one = distillation.teacher_average_velocity(gaussian_velocity, x, t, d, 1)
  chex.assert_shape(one, x.shape)
  np.testing.assert_allclose(one, gaussian_velocity(x, t), rtol=1e-12)
  np.testing.assert_allclose(distillation.teacher_average_velocity(gaussian_velocity, x, t, d, 5),
                             euler_average(x, t, d, 5), rtol=1e-12)
  fine = distillation.teacher_average_velocity(gaussian_velocity, x, t, d, 4000)
  exact = (x - gaussian_map(x, t, t - d)) / 0.25
  np.testing.assert_allclose(fine, exact, atol=1e-4)
  assert float(jnp.abs(one - exact).max()) > 100 * float(jnp.abs(fine - exact).max())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_student_rollout_stops_each_example_after_its_own_steps(shift):
  """Example k of a batch moves k steps (k < steps) on the student's grid (uniform, then
  shifted), each by its length times the student's output at the step input 1/steps, as
  a hand loop of the same student does; `trajectory_starts` gives the grid's steps."""
  steps = 4
  grid = np.array([shift * u / (1 + (shift - 1) * u) for u in np.linspace(1, 0, steps + 1)])
  np.testing.assert_allclose(distillation.student_grid(steps, shift), grid, rtol=1e-12)
  student = lambda x, t, d: gaussian_velocity(x, t) * (1 + d[:, None])   # depends on (x, t, d)
  noise = jax.random.normal(jax.random.key(5), (steps, 3))
  got = distillation.student_rollout(student, noise, jnp.arange(steps), steps, shift)
  chex.assert_shape(got, noise.shape)
  for k in range(steps):
    x = noise[k:k + 1]
    for j in range(k):
      x = x - (grid[j] - grid[j + 1]) * student(x, jnp.full(1, grid[j]), jnp.full(1, 0.25))
    np.testing.assert_allclose(got[k:k + 1], x, rtol=1e-12)
  index, t, t_next = distillation.trajectory_starts(jax.random.key(6), 1000, steps, shift)
  assert set(np.asarray(index).tolist()) == set(range(steps))
  np.testing.assert_allclose(t, grid[index], rtol=1e-12)
  np.testing.assert_allclose(t_next, grid[index + 1], rtol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_students_own_past_is_made_block_after_block_as_it_streams(shift):
  """`own_past`: example k (blocks of 2 frames in 8) has its blocks 0 .. k-1 made one after
  another, each in `steps` Euler steps of the student kept to that block, after the blocks
  made before it, as a float64 hand loop makes them; its later blocks stay the noise. The
  student reads the whole clip (its past, through a mean over the frames before the
  block), so a wrong order or a stale past would show."""
  steps, block, frames = 3, 2, 8
  grid = np.asarray(distillation.student_grid(steps, shift))

  def student(x, index, t, d):               # x [B, T, C]; depends on the past and on d
    before = (jnp.arange(frames)[None] < (index * block)[:, None])[..., None]
    past_mean = (x * before).sum(1, keepdims=True) / jnp.maximum(before.sum(1, keepdims=True), 1)
    return gaussian_velocity(x, t) * (1 + d[:, None, None]) + 0.5 * past_mean

  noise = jax.random.normal(jax.random.key(11), (frames // block, frames, 3))
  which = jnp.arange(frames // block)
  got = distillation.own_past(student, noise, which, block, steps, shift)
  chex.assert_shape(got, noise.shape)
  for k in range(frames // block):
    x = np.array(noise[k:k + 1])
    for j in range(k):
      for i in range(steps):
        v = np.asarray(student(jnp.asarray(x), jnp.array([j]), jnp.full(1, grid[i]),
                               jnp.full(1, 1.0 / steps)))
        x[:, j * block:(j + 1) * block] -= (grid[i] - grid[i + 1]) * v[:, j * block:(j + 1) * block]
    np.testing.assert_allclose(got[k:k + 1], x, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got[k, k * block:], noise[k, k * block:])
  assert not np.allclose(got[-1, :block], noise[-1, :block])
  # `whole`: the clip as it streams, its last block made after all the others too.
  blocks = frames // block
  whole = distillation.own_past(student, noise, jnp.full((blocks,), blocks), block, steps,
                                shift, whole=True)
  x = np.array(got[-1:])
  for i in range(steps):
    v = np.asarray(student(jnp.asarray(x), jnp.array([blocks - 1]), jnp.full(1, grid[i]),
                           jnp.full(1, 1.0 / steps)))
    x[:, -block:] -= (grid[i] - grid[i + 1]) * v[:, -block:]
  np.testing.assert_allclose(whole[-1:], x, rtol=1e-12, atol=1e-12)   # (its noise: got[-1]'s)
  with pytest.raises(ValueError, match="do not split into causal blocks of 3"):
    distillation.own_past(student, noise, which, 3, steps, shift)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_teachers_trajectory_gives_each_examples_step_and_its_end(shift):
  """`teacher_trajectory`: example k's start is the teacher's ODE at grid[k] (k steps of
  `substeps` Euler steps each from the noise), its velocity the average over step k, and
  the end the whole ODE at t = 0, as a float64 hand loop gives; with many substeps the
  end nears the exact flow map of the Gaussian data."""
  steps, substeps = 4, 3
  grid = np.asarray(distillation.student_grid(steps, shift))
  noise = jax.random.normal(jax.random.key(9), (steps, 2))
  start, velocity, end = distillation.teacher_trajectory(
      gaussian_velocity, noise, jnp.arange(steps), steps, shift, substeps)
  chex.assert_shape([start, velocity, end], noise.shape)
  x = np.asarray(noise)
  for j in range(steps):
    d = np.full(steps, grid[j] - grid[j + 1])
    v = np.asarray(euler_average(jnp.asarray(x), jnp.full(steps, grid[j]), jnp.asarray(d),
                                 substeps))
    np.testing.assert_allclose(start[j], x[j], rtol=1e-12)
    np.testing.assert_allclose(velocity[j], v[j], rtol=1e-12)
    x = x - d[:, None] * v
  np.testing.assert_allclose(end, x, rtol=1e-12)
  fine = distillation.teacher_trajectory(gaussian_velocity, noise, jnp.zeros(steps, int), steps,
                                         shift, 1000)[2]
  np.testing.assert_allclose(fine, gaussian_map(noise, jnp.ones(steps), jnp.zeros(steps)),
                             atol=2e-3)


def test_a_student_trained_on_the_teachers_trajectory_samples_its_map():
  """A student affine in x per step, trained by Adam on trajectory targets (its own rollout
  as input, the teacher's 16-substep average velocity as target), samples in 4 steps what
  the teacher's 4 x 16 Euler steps give, and so lands near the exact flow map."""
  steps, substeps = 4, 16

  def make_student(params):
    def student(x, t, d):
      i = jnp.round((1 - t) * steps).astype(int)
      return params["a"][i][:, None] * x + params["b"][i][:, None]
    return student

  def loss(params, key):
    k_noise, k_start = jax.random.split(key)
    student = make_student(params)
    noise = jax.random.normal(k_noise, (128, 1))
    index, t, t_next = distillation.trajectory_starts(k_start, 128, steps)
    x = distillation.student_rollout(student, noise, index, steps)
    target = distillation.teacher_average_velocity(gaussian_velocity, x, t, t - t_next,
                                                   substeps)
    return jnp.mean((student(x, t, jnp.full(128, 1 / steps)) - target) ** 2)

  params = {"a": jnp.zeros(steps), "b": jnp.zeros(steps)}
  params = fit(loss, params)
  noise = jax.random.normal(jax.random.key(8), (256, 1))
  got = distillation.shortcut_sample(make_student(params), noise, steps)
  teacher = noise - euler_average(noise, jnp.ones(256), jnp.ones(256), steps * substeps)
  np.testing.assert_allclose(got, teacher, atol=0.02)
  exact = gaussian_map(noise, jnp.ones(256), jnp.zeros(256))
  assert float(jnp.abs(got - exact).max()) < 0.05


def normal_velocity(x, t, mean, std):
  """The exact flow velocity E[noise - x0 | x_t = x] of data x0 ~ N(mean, std^2) (t [B])."""
  t = t.reshape(t.shape + (1,) * (x.ndim - 1))
  var = (1 - t) ** 2 * std ** 2 + t ** 2
  return (t - (1 - t) * std ** 2) / var * (x - (1 - t) * mean) - mean


def normal_score(x, t, mean, std):
  """The score d/dx log p_t(x) of x_t = (1 - t) x0 + t e, x0 ~ N(mean, std^2) (t [B])."""
  t = t.reshape(t.shape + (1,) * (x.ndim - 1))
  return -(x - (1 - t) * mean) / ((1 - t) ** 2 * std ** 2 + t ** 2)


def test_the_dmd_target_follows_the_difference_of_the_two_scores():
  """`dmd_target`: a sample moves along DMD's gradient of the KL between the student's and
  the data's distributions at t, (1 - t)(s_fake - s_real) in scores (float64 closed forms,
  from the densities rather than the velocities the function reads), scaled per example by
  t^2 / (1 - t)^2 (velocities to scores) over mean |sample - x0_real|; with the two scores
  equal, not at all."""
  key = jax.random.key(3)
  sample = 0.3 + 0.8 * jax.random.normal(key, (4, 6, 2))
  t = jnp.array([0.1, 0.4, 0.7, 0.95])
  x_t = flow.interpolate(sample, jax.random.normal(jax.random.key(4), sample.shape), t)
  real, fake = (MEAN, STD), (0.3, 0.8)
  v_real, v_fake = (normal_velocity(x_t, t, *p) for p in (real, fake))
  target = distillation.dmd_target(sample, x_t, t, v_real, v_fake)
  chex.assert_shape(target, sample.shape)
  tb = t[:, None, None]
  x0_real = x_t - tb * v_real
  scale = np.abs(sample - x0_real).mean(axis=(1, 2), keepdims=True)
  kl_gradient = (1 - tb) * (normal_score(x_t, t, *fake) - normal_score(x_t, t, *real))
  np.testing.assert_allclose(sample - target, kl_gradient * tb ** 2 / (1 - tb) ** 2 / scale,
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(distillation.dmd_target(sample, x_t, t, v_real, v_real), sample,
                             rtol=0, atol=1e-14)


def test_a_generator_trained_by_distribution_matching_reaches_the_data():
  """A one-step generator `mu + sigma z` of N(0, 1.5^2) trained on half the squared
  distance to `dmd_target` at times in [0.02, 0.98], the real score the data's N(MEAN,
  STD^2) and the fake one its own current distribution's (the critic trained to
  perfection), learns the data's mean and spread."""
  def loss(params, key):
    k_z, k_t, k_e = jax.random.split(key, 3)
    mu, log_sigma = params["mu"], params["log_sigma"]
    sample = mu + jnp.exp(log_sigma) * jax.random.normal(k_z, (64, 8))
    t = jax.random.uniform(k_t, (64,), minval=0.02, maxval=0.98)
    fixed = jax.lax.stop_gradient(sample)
    x_t = flow.interpolate(fixed, jax.random.normal(k_e, fixed.shape), t)
    own = jax.lax.stop_gradient((mu, jnp.exp(log_sigma)))
    target = distillation.dmd_target(fixed, x_t, t, normal_velocity(x_t, t, MEAN, STD),
                                     normal_velocity(x_t, t, *own))
    return 0.5 * jnp.mean((sample - target) ** 2)

  params = fit(loss, {"mu": jnp.array(0.0), "log_sigma": jnp.log(jnp.array(1.5))}, steps=600)
  np.testing.assert_allclose(params["mu"], MEAN, atol=0.05)
  np.testing.assert_allclose(jnp.exp(params["log_sigma"]), STD, atol=0.05)
