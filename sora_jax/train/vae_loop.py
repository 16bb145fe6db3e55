"""Training the video VAE, flat: config -> mesh -> data -> sharded init or resume ->
jitted step -> the shared loop (`sora_jax.train.runner`), then latent statistics,
held-out PSNR/SSIM and side-by-side videos.

A VAE workdir keeps `config.json`, `checkpoints/<step>/` (parameters, optimiser,
latent statistics, data iterator), `metrics.jsonl`, `tensorboard/`, and after training
`latent_stats.json`, `vae_eval.json` and `reconstructions/` (input | reconstruction).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from sora_jax import configs, video_io
from sora_jax.data.pipeline import (make_train_dataset, normalise_video, pad_with_last,
                                    to_global_batch, to_uint8)
from sora_jax.data.resize import fit_clip
from sora_jax.data.sources import CheckedSource, DataStats, pixel_source
from sora_jax.evaluation.reconstruction import psnr_ssim, summarise
from sora_jax.models.vae import VideoVAE
from sora_jax.parallel.distributed import sync
from sora_jax.parallel.sharding import array_shapes, batch_sharding, make_mesh, replicated
from sora_jax.train import workdir as wd
from sora_jax.train.checkpoint import Checkpointer, checkpoint_to_read
from sora_jax.train.metrics import MetricWriter
from sora_jax.train.restore import check_init_from
from sora_jax.train.runner import Hooks, open_checkpointer, resume_or_start, run_steps
from sora_jax.train.vae_step import (VAEState, abstract_models, abstract_vae_state,
                                     create_vae_state, make_vae_train_step, merge_vae,
                                     vae_state_shardings)

STATS_FILE = "latent_stats.json"
EVAL_FILE = "vae_eval.json"
EXPORTED = ("params", "stats")      # what a VAE export keeps of the train state


def train_vae(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
              stop_at: int | None = None, evaluate: bool = True) -> dict[str, Any]:
  """Trains (or resumes) the VAE run in `workdir` up to `config.train.steps`.

  When the last step is reached, computes the latent statistics (saved in the final
  checkpoint and `latent_stats.json`) and, with `evaluate`, the held-out PSNR/SSIM
  (`vae_eval.json`) and side-by-side reconstruction videos.

  Returns:
    `{"step", "loss", "history": [(step, loss), ...], "eval": summary or None}`.
  """
  # Config and workdir.
  configs.validate_vae(config)
  config = configs.filled(config)   # missing keys (an older run's) at the schema's defaults
  t = configs.typed(config)
  wd.save_config(workdir, config)

  # Mesh.
  mesh = make_mesh(configs.mesh_shape(config))
  rules = configs.sharding_rules(config)

  # Data.
  iterator = iter(_vae_dataset(config, t))
  data_stats = DataStats(t.data.max_skipped_fraction)

  # State (initialised sharded, or restored).
  shardings = vae_state_shardings(config, mesh)
  checkpointer = open_checkpointer(workdir, t.train)
  state, _ = resume_or_start(checkpointer, iterator, what="the VAE",
                             target=lambda: abstract_vae_state(config, shardings),
                             start=lambda: start_vae_state(config, mesh, shardings))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  step_fn = make_vae_train_step(config, shardings, mesh)

  # Loop; the last step's checkpoint holds the latent statistics.
  def final_statistics(done: int, state: VAEState) -> VAEState:
    if done != t.train.steps:
      return state
    state = {**state, "stats": latent_statistics(config, state, mesh, iterator)}
    write_latent_stats(workdir, state["stats"])
    return state

  result = run_steps(
      state, iterator, step_fn, mesh=mesh, rules=rules, checkpointer=checkpointer,
      workdir=workdir, train=t.train, data_stats=data_stats,
      end=t.train.steps if stop_at is None else min(stop_at, t.train.steps),
      desc=f"train-vae ({num_params / 1e6:.2f}M params)", progress=progress,
      hooks=Hooks(postfix=lambda m: {"psnr": f"{float(m['psnr']):.1f}dB"},
                  after_step=final_statistics))
  state = result.state

  summary = None
  if evaluate and not result.preempted and int(state["step"]) == t.train.steps:
    vae = merge_vae(abstract_models(config)[0], state["params"], state["stats"])
    summary = evaluate_reconstruction(config, vae, workdir, mesh)
    writer = MetricWriter(workdir)
    for name, value in summary.items():
      if isinstance(value, float):
        writer.write(int(state["step"]), {f"eval/{name}": value})
    writer.close()
  return {"step": int(state["step"]), "loss": result.loss, "history": result.history,
          "eval": summary, "data": data_stats.summary(), "preempted": result.preempted,
          "skipped_steps": result.skipped_steps}


def start_vae_state(config: ml_collections.ConfigDict, mesh, shardings: VAEState) -> VAEState:
  """A new run's state: initialised, with the parameters and latent statistics of the VAE
  run (or export) `train.init_from` when it names one (a fine-tune; the optimiser and
  any discriminator start afresh). Another architecture is refused before compiling."""
  init_from = configs.typed(config).train.init_from
  weights = _vae_weights(init_from, None)[2] if init_from else None
  if weights is not None:    # a fine-tune keeps the architecture
    check_init_from(init_from, weights["params"], array_shapes(abstract_models(config)[1]),
                    "vae.*")
  return create_vae_state(config, mesh, shardings, weights)[0]


def _vae_dataset(config: ml_collections.ConfigDict, t: configs.Config):
  """The VAE's training clips at the world's size (process 0 writes the dataset; the
  others then read it)."""
  if jax.process_index() == 0:
    pixel_source(config)
  sync("sora_jax_vae_data_ready")
  d = t.data
  source = CheckedSource(pixel_source(config), max_side=d.max_side)
  return make_train_dataset(source, tokenizer=None, text_length=0,
                            global_batch_size=d.batch_size, seed=d.shuffle_seed,
                            num_threads=d.num_threads, prefetch=d.prefetch,
                            num_workers=d.num_workers,
                            size=(t.world.frames, t.world.height, t.world.width))


# After training -------------------------------------------------------------------

def latent_statistics(config: ml_collections.ConfigDict, state: VAEState, mesh,
                      batches: Iterator[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
  """Per-channel mean and std of the posterior means over `eval.stats_batches` batches.

  Returns `{"latent_mean": [Z], "latent_std": [Z]}`, replicated over `mesh`. Reads the
  next batches of `batches` (the training iterator, once training is done; the final
  checkpoint, written after this, records its position).
  """
  rules = configs.sharding_rules(config)
  graphdef = abstract_models(config)[0]

  @jax.jit
  def moments(params, stats, video):
    mean, _ = merge_vae(graphdef, params, stats).encode(video)
    flat = mean.reshape(-1, mean.shape[-1]).astype(jnp.float32)
    return flat.sum(0), jnp.square(flat).sum(0), flat.shape[0]

  total = total_sq = count = 0
  for _ in range(config.eval.stats_batches):
    s, sq, n = moments(state["params"], state["stats"],
                       to_global_batch(next(batches), mesh, rules)["video"])
    total, total_sq, count = total + s, total_sq + sq, count + n
  mean = total / count
  std = jnp.sqrt(jnp.maximum(total_sq / count - jnp.square(mean), 1e-12))
  return jax.device_put({"latent_mean": mean, "latent_std": std}, replicated(mesh))


def write_latent_stats(workdir: str, stats: dict[str, jax.Array]) -> None:
  if jax.process_index() == 0:
    values = {k: [float(v) for v in np.asarray(a.addressable_data(0))]   # replicated
              for k, a in stats.items()}
    with open(os.path.join(workdir, STATS_FILE), "w", encoding="utf-8") as f:
      json.dump(values, f, indent=2)


def held_out_videos(config: ml_collections.ConfigDict, count: int) -> np.ndarray:
  """The first `count` clips of the held-out split (fitted to the `world` size), float32 `[N, T, H, W, 3]` in [-1, 1]."""
  source = pixel_source(configs.filled(config), "test")
  size = (config.world.frames, config.world.height, config.world.width)
  count = min(count, len(source))
  return np.stack([normalise_video(fit_clip(source[i]["video"], size)) for i in range(count)])


def evaluate_reconstruction(config: ml_collections.ConfigDict, vae: VideoVAE, workdir: str,
                            mesh) -> dict[str, Any]:
  """PSNR/SSIM per frame position on `eval.num_examples` held-out clips (posterior means),
  written to `vae_eval.json`; `eval.num_videos` side-by-side reconstructions as mp4 + PNG."""
  rules = configs.sharding_rules(config)
  videos = held_out_videos(config, config.eval.num_examples)
  b = config.eval.batch_size
  sharding = batch_sharding(mesh, rules, 5)

  graphdef, weights = nnx.split(vae)

  @jax.jit
  def reconstruct(weights, video):
    model = nnx.merge(graphdef, weights)
    recon = model.decode(model.encode(video)[0])
    psnr, ssim = psnr_ssim(video, recon)
    return recon, psnr, ssim

  psnrs, ssims, recons = [], [], []
  for start in range(0, len(videos), b):
    chunk = videos[start:start + b]
    pad = b - len(chunk)
    chunk = pad_with_last(chunk, b)
    local = np.split(chunk, jax.process_count())[jax.process_index()]
    recon, psnr, ssim = reconstruct(weights, jax.make_array_from_process_local_data(sharding, local))
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))[:b - pad]
    psnrs.append(gather(psnr))
    ssims.append(gather(ssim))
    if sum(len(r) for r in recons) < config.eval.num_videos:
      recons.append(gather(recon))
  summary = summarise(np.concatenate(psnrs), np.concatenate(ssims))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, EVAL_FILE), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    n = config.eval.num_videos
    write_side_by_side(os.path.join(workdir, "reconstructions"), videos[:n],
                       np.concatenate(recons)[:n])
  return summary


def write_side_by_side(out_dir: str, inputs: np.ndarray, reconstructions: np.ndarray,
                       scale: int = 4) -> list[str]:
  """Writes `input | reconstruction` videos (`[N, T, H, W, 3]` in [-1, 1]) as mp4s and one
  PNG contact sheet (rows alternate input, reconstruction); returns the paths."""
  pairs = np.concatenate([to_uint8(inputs), to_uint8(reconstructions)], axis=3)  # [N, T, H, 2W, 3]
  paths = [video_io.write_mp4(os.path.join(out_dir, f"reconstruction_{i:02d}.mp4"), pair,
                              fps=8, scale=scale) for i, pair in enumerate(pairs)]
  rows = np.stack([to_uint8(inputs), to_uint8(reconstructions)], 1).reshape(
      (-1,) + inputs.shape[1:])
  paths.append(video_io.write_contact_sheet(os.path.join(out_dir, "contact_sheet.png"), rows,
                                            scale=2))
  return paths


# Loading a trained VAE --------------------------------------------------------------

def _vae_weights(workdir: str, step: int | None) -> tuple[ml_collections.ConfigDict, int, dict]:
  """`(config, step, {"params", "stats"})` of a VAE workdir's latest (or given) checkpoint,
  or of an export of one, on one device (nothing else of the train state is read)."""
  config = wd.load_config(workdir)
  if "vae" not in config:
    raise ValueError(f"{workdir!r} is not a VAE workdir (its config.json has no 'vae' section).")
  checkpointer, step = checkpoint_to_read(wd.checkpoint_dir(workdir), step,
                                          advice="run train-vae first")
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  target = abstract_vae_state(config, vae_state_shardings(config, mesh))
  state = checkpointer.restore(step, {key: target[key] for key in EXPORTED})
  checkpointer.close()
  return config, step, state


def load_vae(workdir: str, step: int | None = None) -> tuple[VideoVAE, ml_collections.ConfigDict]:
  """The VAE (parameters and latent statistics) of a `train-vae` workdir's latest (or
  given) checkpoint, or of an export of one (`write_vae_weights`), on one device, and its config.
  Only the parameters and statistics are read (not the optimiser or discriminator)."""
  config, _, state = _vae_weights(workdir, step)
  return merge_vae(abstract_models(config)[0], state["params"], state["stats"]), config


def write_vae_weights(workdir: str, out: str, step: int | None = None) -> int:
  """Writes what using a trained VAE takes into the directory `out`: the run's config, one
  checkpoint of its parameters and latent statistics alone (no optimiser, discriminator
  or data iterator: a third of a training checkpoint), and its latent statistics,
  held-out evaluation and ShapesBench ceiling files where it has them. `out` then reads
  like the run wherever a VAE workdir is named (`autoencoder.workdir`, `load_vae`); what
  `sora-jax export --to orbax-params` of a VAE run writes. Returns the step written."""
  config, step, state = _vae_weights(workdir, step)
  wd.save_config(out, config)
  writer = Checkpointer(wd.checkpoint_dir(out), keep=1, every=1, async_save=False)
  writer.save(step, state, force=True)
  writer.close()
  for name in (STATS_FILE, EVAL_FILE, "vae_shapes.json"):
    if os.path.isfile(os.path.join(workdir, name)):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(out, name))
  return step
