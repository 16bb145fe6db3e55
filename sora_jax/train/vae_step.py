"""The VAE's train state, its sharded initialisation, and the jitted, donated train step.

The state is a pytree of pure dicts, like the diffusion train state:
  params          VAE parameters
  opt_state       Optax state of the VAE
  stats           latent statistics `{"latent_mean", "latent_std"}` paths of `LatentStat`
                  (identity until computed after training; saved with every checkpoint)
  disc_params, disc_opt_state   the 3D patch discriminator and its optimiser
                  (present only when `vae_loss.disc_weight > 0`)
  step            int32 scalar
  rng             uint32 `[2]` base key; step s uses `fold_in(rng, s)`
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from sora_jax import configs
from sora_jax.models.abstract import abstract_module
from sora_jax.models.discriminator import (PatchDiscriminator3d, hinge_discriminator_loss,
                                           hinge_generator_loss)
from sora_jax.models.vae import LatentStat, build_vae, kl_divergence, posterior_sample
from sora_jax.parallel.sharding import (activation_sharding, batch_sharding, replicated,
                                        state_shardings)
from sora_jax.train import faults
from sora_jax.train import optim
from sora_jax.train.state import (array_shapes, cast_floats, optimizer_shardings,
                                  with_shardings)

VAEState = dict[str, Any]


def uses_discriminator(config: ml_collections.ConfigDict) -> bool:
  return config.vae_loss.disc_weight > 0


def build_models(config: ml_collections.ConfigDict, rngs: nnx.Rngs):
  """The VAE and (when the config asks for one) the discriminator, unsharded."""
  vae = build_vae(configs.vae_config(config), rngs)
  return vae, build_discriminator(config, rngs)


def build_discriminator(config: ml_collections.ConfigDict, rngs: nnx.Rngs
                        ) -> PatchDiscriminator3d | None:
  """The config's discriminator, unsharded; None when it has none."""
  discriminator = _discriminator(config)
  if discriminator is None:
    return None
  with nnx.use_eager_sharding(False):
    return PatchDiscriminator3d(3, *discriminator, rngs=rngs)


def _discriminator(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """`(channels, layers)` of the config's discriminator, None without one."""
  loss = config.vae_loss
  return (loss.disc_channels, loss.disc_layers) if uses_discriminator(config) else None


def abstract_models(config: ml_collections.ConfigDict):
  """`(vae_graphdef, abstract params, abstract stats, disc_graphdef | None, abstract disc params)`.

  Traced once per architecture in a process (`models.abstract.abstract_module`; a run
  asks for them several times); the abstract states returned are the caller's own copies."""
  vae_config, discriminator = configs.vae_config(config), _discriminator(config)
  graphdef, params, stats = abstract_module(
      ("vae", vae_config), lambda: build_vae(vae_config, nnx.Rngs(0)), nnx.Param, LatentStat)
  if discriminator is None:
    return graphdef, params, stats, None, None
  disc_graphdef, disc_params = abstract_module(
      ("discriminator", discriminator),
      lambda: PatchDiscriminator3d(3, *discriminator, rngs=nnx.Rngs(0)), nnx.Param)
  return graphdef, params, stats, disc_graphdef, disc_params


def make_optimizers(config: ml_collections.ConfigDict):
  """`(VAE optimiser, discriminator optimiser or None)`: their numbers read under the names
  `optim` and `disc_optim` inside the step (`optim.hyperparameter_inputs`)."""
  vae_tx = optim.make_optimizer(config.optim, config.train.steps)
  disc_tx = (optim.make_optimizer(config.disc_optim, config.train.steps,
                                  name="disc_optim")
             if uses_discriminator(config) else None)
  return vae_tx, disc_tx


def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """The VAE step's optimisers' numbers, by name (`optim.hyperparameters`): inputs of the
  compiled step, not constants of it."""
  names = ("optim", "disc_optim") if uses_discriminator(config) else ("optim",)
  return {n: optim.hyperparameters(config[n], config.train.steps) for n in names}


def vae_state_shardings(config: ml_collections.ConfigDict, mesh: Mesh) -> VAEState:
  """Shardings of the VAE train state by `config.sharding.rules`."""
  rules = configs.sharding_rules(config)
  _, params, stats, _, disc_params = abstract_models(config)
  vae_tx, disc_tx = make_optimizers(config)
  p = state_shardings(params, mesh, rules)
  out = {"params": p, "opt_state": optimizer_shardings(vae_tx, array_shapes(params), p, mesh),
         "stats": jax.tree.map(lambda _: replicated(mesh), nnx.to_pure_dict(stats)),
         "step": replicated(mesh), "rng": replicated(mesh)}
  if disc_params is not None:
    d = state_shardings(disc_params, mesh, rules)
    out["disc_params"] = d
    out["disc_opt_state"] = optimizer_shardings(disc_tx, array_shapes(disc_params), d, mesh)
  return out


def abstract_vae_state(config: ml_collections.ConfigDict, shardings: VAEState) -> VAEState:
  """`ShapeDtypeStruct`s with shardings of the VAE train state: the target of a restore."""
  _, params, stats, _, disc_params = abstract_models(config)
  vae_tx, disc_tx = make_optimizers(config)
  param_shapes = array_shapes(params)
  shapes = {"params": param_shapes, "opt_state": jax.eval_shape(vae_tx.init, param_shapes),
            "stats": array_shapes(stats), "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  if disc_params is not None:
    shapes["disc_params"] = array_shapes(disc_params)
    shapes["disc_opt_state"] = jax.eval_shape(disc_tx.init, shapes["disc_params"])
  return with_shardings(shapes, shardings)


def create_vae_state(config: ml_collections.ConfigDict, mesh: Mesh,
                     shardings: VAEState | None = None, weights: dict[str, Any] | None = None
                     ) -> tuple[VAEState, VAEState]:
  """Initialises the VAE train state directly in its sharded layout: `(state, shardings)`.
  `shardings`: `vae_state_shardings(config, mesh)`, when the caller has them.

  `weights`: `{"params", "stats"}` of a trained VAE of this architecture to start from (a
  fine-tune, `train.init_from`), given up (donated) to the state; then no VAE is drawn at
  random (its initialisers would be most of the program): only the optimiser state and any
  discriminator (drawn from the seed's stream) are new."""
  if shardings is None:
    shardings = vae_state_shardings(config, mesh)
  vae_tx, disc_tx = make_optimizers(config)

  def init(seed_key: jax.Array, weights: dict[str, Any] | None) -> VAEState:
    rngs = nnx.Rngs(jax.random.fold_in(seed_key, 0))
    if weights is None:
      vae, disc = build_models(config, rngs)
      params = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
      stats = nnx.to_pure_dict(nnx.state(vae, LatentStat))
    else:
      params, stats, disc = weights["params"], weights["stats"], build_discriminator(config, rngs)
    state = {"params": params, "opt_state": vae_tx.init(params), "stats": stats,
             "step": jnp.zeros((), jnp.int32), "rng": jax.random.fold_in(seed_key, 1)}
    if disc is not None:
      disc_params = nnx.to_pure_dict(nnx.state(disc, nnx.Param))
      state["disc_params"] = disc_params
      state["disc_opt_state"] = disc_tx.init(disc_params)
    return state

  if weights is not None:
    weights = jax.device_put({"params": weights["params"], "stats": weights["stats"]},
                             {"params": shardings["params"], "stats": shardings["stats"]})
  state = jax.jit(init, out_shardings=shardings, donate_argnums=1)(
      jax.random.PRNGKey(config.seed), weights)
  return state, shardings


def merge_vae(graphdef: nnx.GraphDef, params: Any, stats: Any):
  """The `VideoVAE` of a graph definition, parameters and latent statistics (pure dicts)."""
  return nnx.merge(graphdef, params, stats)


def noisy_reconstruction(vae, video: jax.Array, key: jax.Array, latent_noise: float
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(reconstruction, mean, logvar)` like `vae(video, key)`, but decoded from the posterior
  sample plus Gaussian noise of `u * latent_noise` times each channel's spread over the
  batch (u ~ U(0, 1) per clip; the spread a constant of the gradient, so the encoder
  cannot outgrow the noise by scaling its latents).

  A decoder trained so must draw each clip from latents some way off its encoder's, as a
  diffusion model's samples are (what it changed on the procedural world:
  docs/results/demo.md, "Squares, stochastic steps...").
  """
  sample_key, share_key, noise_key = jax.random.split(key, 3)
  mean, logvar = vae.encode(video)
  z = posterior_sample(mean, logvar, sample_key)
  spread = jax.lax.stop_gradient(jnp.std(mean, axis=tuple(range(mean.ndim - 1))))   # [Z]
  share = latent_noise * jax.random.uniform(share_key, (mean.shape[0],) + (1,) * (mean.ndim - 1))
  z = z + share * spread * jax.random.normal(noise_key, mean.shape, mean.dtype)
  return vae.decode(z.astype(video.dtype)), mean, logvar


def make_vae_train_step(config: ml_collections.ConfigDict, shardings: VAEState, mesh: Mesh
                        ) -> Callable[[VAEState, dict[str, jax.Array]],
                                      tuple[VAEState, dict[str, jax.Array]]]:
  """`step(state, {"video": [B, T, H, W, 3]}) -> (state, metrics)`, jitted, state donated
  (`step.lower(state, batch)` lowers it ahead of time). The optimisers' numbers
  (`hyperparameters`: learning-rate schedules, betas, weight decay, clip) are inputs of
  the compiled step, not constants of it.

  Generator loss: `l1 * |x - x'| + l2 * (x - x')^2 + kl * KL / pixels` (+ `disc_weight *`
  the hinge generator loss once `step >= disc_start`), with x' decoded from a posterior
  sample (plus noise with `vae_loss.latent_noise`: `noisy_reconstruction`). The
  discriminator (hinge loss on x vs. stop_gradient(x')) updates only from `disc_start` on.
  Metrics: loss, l1, l2, kl, psnr, grad_norm, learning_rate (+ disc_loss, gen_adv_loss,
  disc_grad_norm), skipped (1 when a loss or gradient was not finite: nothing was updated).

  Longer than most functions here: the losses and the step are closures over the
  compiled settings (loss weights, dtype, graph definitions, optimisers), read top down.
  """
  rules = configs.sharding_rules(config)
  loss_cfg = config.vae_loss
  dtype = jnp.dtype(config.train.compute_dtype)
  graphdef, _, _, disc_graphdef, _ = abstract_models(config)
  vae_tx, disc_tx = make_optimizers(config)
  schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
  numbers = hyperparameters(config)
  with_disc = disc_graphdef is not None

  def generator_loss(params, stats, disc_params, video, key, adv_on):
    vae = merge_vae(graphdef, cast_floats(params, dtype), stats)
    if loss_cfg.latent_noise:
      recon, mean, logvar = noisy_reconstruction(vae, video.astype(dtype), key,
                                                 loss_cfg.latent_noise)
    else:
      recon, mean, logvar = vae(video.astype(dtype), key)
    recon = recon.astype(jnp.float32)
    l1 = jnp.abs(recon - video).mean()
    l2 = jnp.square(recon - video).mean()
    kl = (kl_divergence(mean, logvar) / (video[0].size)).mean()
    loss = loss_cfg.l1_weight * l1 + loss_cfg.l2_weight * l2 + loss_cfg.kl_weight * kl
    metrics = {"l1": l1, "l2": l2, "kl": kl,
               "psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(l2, 1e-10))}   # [-1, 1] range
    if with_disc:
      disc = nnx.merge(disc_graphdef, cast_floats(disc_params, dtype))
      adv = hinge_generator_loss(disc(recon.astype(dtype)))
      loss = loss + adv_on * loss_cfg.disc_weight * adv
      metrics["gen_adv_loss"] = adv
    return loss, (metrics, recon)

  def step(state: VAEState, batch: dict[str, jax.Array], numbers: dict[str, Any]):
    with optim.hyperparameter_inputs(numbers):
      return step_body(state, batch)

  def step_body(state: VAEState, batch: dict[str, jax.Array]):
    video = batch["video"].astype(jnp.float32)
    key = jax.random.fold_in(state["rng"], state["step"])
    adv_on = (state["step"] >= loss_cfg.disc_start).astype(jnp.float32) if with_disc else 0.0
    with activation_sharding(mesh, rules):
      (loss, (metrics, recon)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
          state["params"], state["stats"], state.get("disc_params"), video, key, adv_on)
    updates, opt_state = vae_tx.update(grads, state["opt_state"], state["params"])
    new_state = {**state, "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "step": state["step"] + 1}
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"])}
    if with_disc:
      def disc_loss(disc_params):
        disc = nnx.merge(disc_graphdef, cast_floats(disc_params, dtype))
        return hinge_discriminator_loss(disc(video.astype(dtype)),
                                        disc(jax.lax.stop_gradient(recon).astype(dtype)))
      with activation_sharding(mesh, rules):
        d_loss, d_grads = jax.value_and_grad(disc_loss)(state["disc_params"])
      d_updates, d_opt = disc_tx.update(d_grads, state["disc_opt_state"], state["disc_params"])
      d_params = optax.apply_updates(state["disc_params"], d_updates)
      # The discriminator waits for disc_start too.
      new_state.update(faults.keep_if_finite(
          adv_on > 0, {"disc_params": d_params, "disc_opt_state": d_opt},
          {"disc_params": state["disc_params"], "disc_opt_state": state["disc_opt_state"]}))
      metrics.update(disc_loss=d_loss, disc_grad_norm=optax.tree.norm(d_grads))
    # A non-finite loss or gradient leaves every trained array as it was.
    finite = faults.is_finite(*(metrics[k] for k in ("loss", "grad_norm", "disc_loss",
                                                     "disc_grad_norm") if k in metrics))
    trained = [k for k in ("params", "opt_state", "disc_params", "disc_opt_state")
               if k in state]
    new_state.update(faults.keep_if_finite(finite, {k: new_state[k] for k in trained},
                                           {k: state[k] for k in trained}))
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  batch_shardings = {"video": batch_sharding(mesh, rules, 5)}
  jitted = jax.jit(step, in_shardings=(shardings, batch_shardings, replicated(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))

  def run(state: VAEState, batch: dict[str, jax.Array]):
    return jitted(state, batch, numbers)
  run.lower = lambda state, batch: jitted.lower(state, batch, numbers)
  return run
