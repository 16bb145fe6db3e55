"""The jitted sampler: text -> video by integrating the flow with classifier-free guidance.

The whole loop (text encoding, every solver step with guidance, the decoder) is one
`jax.jit`-compiled function per (batch, frames, height, width, steps, guidance, solver);
`Sampler` caches the compiled functions. Each sample's noise comes from its own seed,
so a (prompt, seed) pair gives the same video whatever batch it is drawn in.
"""

from __future__ import annotations

import functools
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import configs
from sora_jax.data.pipeline import to_uint8
from sora_jax.diffusion import flow
from sora_jax.diffusion.solvers import SOLVERS
from sora_jax.models.autoencoder import Autoencoder
from sora_jax.models.autoencoder import make_autoencoder
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.tokenizer import Tokenizer
from sora_jax.parallel.sharding import make_mesh
from sora_jax.train import optim
from sora_jax.train import workdir as wd
from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.state import abstract_model
from sora_jax.train.state import abstract_train_state
from sora_jax.train.state import train_state_shardings


def initial_noise(seeds: jax.Array, shape: Sequence[int]) -> jax.Array:
  """`[B, *shape]` standard normal noise, row i drawn from `PRNGKey(seeds[i])`."""
  return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), tuple(shape)))(seeds)


def sample_video(params, graphdef: nnx.GraphDef, ids: jax.Array, mask: jax.Array,
                 null_ids: jax.Array, null_mask: jax.Array, seeds: jax.Array, *,
                 latent_shape: Sequence[int], steps: int, cfg_scale: float, shift: float,
                 solver: str, autoencoder: Autoencoder) -> jax.Array:
  """Generates videos `[B, T, H, W, C]` in [-1, 1] (pure; jit it with the keyword args static).

  Args:
    params: model parameters (the EMA weights).
    ids, mask: `[B, L]` prompt tokens; null_ids, null_mask: `[L]` the empty prompt.
    seeds: `[B]` int32 noise seeds.
    latent_shape: `(T', H', W', C')` of what the transformer diffuses.
    cfg_scale: guidance scale; 1 disables the unconditional pass.
  """
  model = nnx.merge(graphdef, params)
  b = ids.shape[0]
  guided = cfg_scale != 1.0
  if guided:
    ids = jnp.concatenate([ids, jnp.broadcast_to(null_ids, ids.shape)])
    mask = jnp.concatenate([mask, jnp.broadcast_to(null_mask, mask.shape)])
  text = model.text_encoder(ids, mask)

  def velocity(x, t):
    if not guided:
      return model.dit(x, t, text, mask)
    v = model.dit(jnp.concatenate([x, x]), jnp.concatenate([t, t]), text, mask)
    v_cond, v_uncond = v[:b], v[b:]
    return v_uncond + cfg_scale * (v_cond - v_uncond)

  x = initial_noise(seeds, latent_shape)
  x = SOLVERS[solver](velocity, x, flow.sampling_times(steps, shift))
  return autoencoder.decode(x)


class Sampler:
  """Generates videos from prompts with a trained model; caches one compiled function per shape."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
               graphdef: nnx.GraphDef, params):
    self.config, self.tokenizer, self.graphdef, self.params = config, tokenizer, graphdef, params
    self.autoencoder = make_autoencoder(config.autoencoder)
    self._compiled: dict[tuple, callable] = {}

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> "Sampler":
    """Loads the config, tokenizer and EMA weights of the latest (or given) checkpoint."""
    config = wd.load_config(workdir)
    tokenizer = Tokenizer(wd.tokenizer_path(workdir))
    checkpointer = Checkpointer(wd.checkpoint_dir(workdir), keep=1, every=1, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {wd.checkpoint_dir(workdir)}: train first.")
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    tx = optim.make_optimizer(config.optim, config.train.steps)
    shardings = train_state_shardings(config, tokenizer.vocab_size, mesh, tx)
    target = abstract_train_state(shardings, config, tokenizer.vocab_size, tx)
    params = checkpointer.restore(step, target)["ema"]
    checkpointer.close()
    graphdef, _ = abstract_model(config, tokenizer.vocab_size)
    return cls(config, tokenizer, graphdef, params)

  def _function(self, frames: int, height: int, width: int, steps: int, cfg_scale: float,
                 shift: float, solver: str):
    key = (frames, height, width, steps, float(cfg_scale), float(shift), solver)
    if key not in self._compiled:
      latent = self.autoencoder.latent_shape(frames, height, width, 3)
      patch = configs.decode_variant(self.config.model.variant)["patch"]
      shift = float(flow.token_shift(num_tokens(latent[:3], patch), shift,
                                     self.config.flow.get("shift_base_tokens", 0)))
      self._compiled[key] = jax.jit(functools.partial(
          sample_video, graphdef=self.graphdef, latent_shape=latent, steps=steps,
          cfg_scale=float(cfg_scale), shift=float(shift), solver=solver,
          autoencoder=self.autoencoder))
    return self._compiled[key]

  def generate(self, prompts: Sequence[str], seeds: Sequence[int], *,
               frames: int | None = None, height: int | None = None, width: int | None = None,
               steps: int | None = None, cfg_scale: float | None = None,
               shift: float | None = None, solver: str | None = None,
               batch_size: int | None = None) -> np.ndarray:
    """Videos for `prompts` (one per seed) as uint8 `[N, T, H, W, 3]`.

    Unset arguments come from the run's config (`world` sizes, `sample.*`). The time
    shift is `shift` scaled by the clip's token count when the run trained with
    `flow.shift_base_tokens` (see `flow.token_shift`).
    """
    if len(prompts) != len(seeds):
      raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds.")
    c, s = self.config, self.config.sample
    frames, height, width = frames or c.world.frames, height or c.world.height, width or c.world.width
    patch = configs.decode_variant(c.model.variant)["patch"]
    for name, size, p in zip(("frames", "height", "width"), (frames, height, width), patch):
      if size % p:
        raise ValueError(f"{name}={size} is not a multiple of the model's patch size {p}.")
    fn = self._function(frames, height, width, steps or s.steps,
                        s.cfg_scale if cfg_scale is None else cfg_scale,
                        s.shift if shift is None else shift, solver or s.solver)
    null_ids, null_mask = self.tokenizer.encode([""], c.data.text_length)
    batch_size = batch_size or s.batch_size
    out = []
    for start in range(0, len(prompts), batch_size):
      chunk = list(prompts[start:start + batch_size])
      chunk_seeds = np.asarray(seeds[start:start + batch_size], np.int32)
      pad = batch_size - len(chunk)  # pad to a fixed batch: one compilation
      ids, mask = self.tokenizer.encode(chunk + [""] * pad, c.data.text_length)
      chunk_seeds = np.concatenate([chunk_seeds, np.zeros(pad, np.int32)])
      video = fn(self.params, ids=ids, mask=mask, null_ids=null_ids[0], null_mask=null_mask[0],
                 seeds=chunk_seeds)
      out.append(to_uint8(jax.device_get(video))[:len(chunk)])
    return np.concatenate(out)
