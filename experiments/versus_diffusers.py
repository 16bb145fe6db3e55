"""sora_jax against diffusers on the same Wan 2.1 architecture, weights and inputs, in one run.

  python -m experiments.versus_diffusers [--sizes demo,small,medium] [--repeats 15] \
      [--sampling-steps 10] [--out docs/results/versus_diffusers.json]

For each size a random Wan 2.1 pipeline (transformer, a small UMT5 and tokenizer, VAE,
flow-matching Euler scheduler) is saved by diffusers and imported with `sora-jax
import-wan`'s code (`sora_jax.interop.wan_import`), so both sides hold the same
weights. Then, in this process, with the same inputs on both sides:

  forward   the transformer on a classifier-free-guidance batch (the prompt's and the
            empty prompt's text states): sora_jax's jitted `dit` vs. the diffusers module
            under `torch.no_grad`, outputs compared;
  train     one training step: sora_jax's own `make_train_step` (rectified-flow loss,
            gradients, clipping, AdamW; cached text states, so the text encoder is
            frozen and unused, no EMA) vs. the same work in torch (flow-matching loss,
            backward, `clip_grad_norm_`, `torch.optim.AdamW`);
  sampling  N Euler steps with guidance and the VAE decode, from precomputed text states
            on both sides: `sora_jax.sample.sample_from_text_states` (jitted) vs.
            `WanPipeline(prompt_embeds=..., negative_prompt_embeds=...)`, videos compared.

Each side warms up until three calls in a row agree within 5% (torch's CPU kernels take
a dozen calls to settle on a new shape); then `--repeats` rounds call both sides in turn,
so that the machine's slow and fast moments fall on both alike. Reported: each side's
median and spread (10th to 90th percentile) and the median of the per-round ratios.
Measure on a quiet machine: a busy one stalls torch's OpenMP threads more than XLA's
(the load average is recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments.report import report
from experiments.wan_interop import relative_error
from sora_jax import configs
from sora_jax.data.pipeline import to_global_batch
from sora_jax.interop import export
from sora_jax.interop.wan_import import import_wan
from sora_jax.models.autoencoder import IdentityAutoencoder
from sora_jax.models.tokenizer import train_tokenizer
from sora_jax.parallel.sharding import make_mesh
from sora_jax.sample import Sampler, SamplingOptions, initial_noise, sample_from_text_states
from sora_jax.train import optim
from sora_jax.train.autoencoders import make_autoencoder
from sora_jax.train.restore import initial_params
from sora_jax.train.state import cast_floats, create_train_state
from sora_jax.train.step import make_train_step
from sora_jax.train.workdir import load_config

# Transformer sizes (Wan 2.1's architecture; head dim 64 as in Wan 1.3B) and latent grids
# [T', H', W'] of 16 channels, patch 1x2x2.
SIZES = {
    "tiny": dict(heads=1, layers=2, ffn=64, latents=(2, 4, 4), text_dim=32,
                 text_length=16, vae_base_dim=8),                     # the CPU test's
    "demo": dict(heads=2, layers=4, ffn=512, latents=(4, 16, 16)),        # 128 wide, 256 tok
    "small": dict(heads=4, layers=4, ffn=1024, latents=(4, 32, 32)),      # 256 wide, 1,024 tok
    "medium": dict(heads=8, layers=4, ffn=2048, latents=(8, 32, 32)),     # 512 wide, 2,048 tok
}
HEAD_DIM, LATENT_CHANNELS, TEXT_LENGTH = 64, 16, 512
PROMPT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Case:
  """One size: the transformer's shape, the latent grid, batch and text."""
  name: str
  heads: int
  layers: int
  ffn: int
  latents: tuple[int, int, int]
  text_dim: int = 128
  text_length: int = TEXT_LENGTH
  batch: int = 2
  vae_base_dim: int = 16         # Wan 2.1's VAE: 96
  vae_res_blocks: int = 1        # Wan 2.1's VAE: 2

  @property
  def width(self) -> int:
    return self.heads * HEAD_DIM

  @property
  def tokens(self) -> int:
    t, h, w = self.latents
    return t * (h // 2) * (w // 2)

  @property
  def video(self) -> tuple[int, int, int]:
    """(frames, height, width) the VAE decodes the latent grid to (4x temporal, 8x spatial)."""
    t, h, w = self.latents
    return 4 * (t - 1) + 1, 8 * h, 8 * w


def case(name: str, **overrides) -> Case:
  return Case(name=name, **{**SIZES[name], **overrides})


# Timing ----------------------------------------------------------------------

def warm_up(fn: Callable[[], Any], *, max_calls: int = 25, settle: float = 0.05) -> int:
  """Calls `fn` until three consecutive calls agree within `settle` (at least 4 calls, at
  most `max_calls`); returns the number of calls."""
  times = []
  while len(times) < max_calls:
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
    last = times[-3:]
    if len(times) >= 4 and (max(last) - min(last)) <= settle * statistics.median(last):
      break
  return len(times)


def _summary(seconds: Sequence[float], warmup_calls: int) -> dict[str, float]:
  ms = np.asarray(seconds) * 1e3
  return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
          "p90_ms": float(np.percentile(ms, 90)), "warmup_calls": warmup_calls,
          "repeats": len(ms)}


def timed_pair(ours: Callable[[], Any], theirs: Callable[[], Any], *, repeats: int,
               max_warmup: int = 25) -> tuple[dict[str, float], dict[str, float], float]:
  """Times two calls interleaved (ours, theirs, ours, ...) after warming each up, so that
  the machine's slow and fast moments fall on both sides alike. Returns each side's median
  and spread (10th-90th percentile, ms) and the median of the per-round time ratios
  theirs / ours."""
  warm = warm_up(ours, max_calls=max_warmup), warm_up(theirs, max_calls=max_warmup)
  times: tuple[list[float], list[float]] = ([], [])
  for _ in range(repeats):
    for fn, out in zip((ours, theirs), times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  ratio = float(np.median(np.asarray(times[1]) / np.asarray(times[0])))
  return _summary(times[0], warm[0]), _summary(times[1], warm[1]), ratio


# The shared pipeline ---------------------------------------------------------

def save_wan_pipeline(c: Case, root: str) -> str:
  """A random diffusers Wan 2.1 pipeline of case `c` saved under `root`; returns its path."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(PROMPT_SEED)
  captions = [f"a {c} {s} moves {d}" for c in ("red", "green", "blue")
              for s in ("circle", "square") for d in ("left", "right")]
  spiece = os.path.join(root, "spiece.model")
  train_tokenizer(captions * 3, spiece, vocab_size=50)
  export.save_t5_tokenizer(spiece, os.path.join(root, "tokenizer"), max_length=c.text_length)
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
  text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=97, d_model=c.text_dim, d_kv=32, d_ff=2 * c.text_dim, num_layers=1,
      num_heads=c.text_dim // 32, relative_attention_num_buckets=8,
      relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
      dropout_rate=0.0)).eval()
  transformer = diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=c.heads, attention_head_dim=HEAD_DIM,
      in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=c.text_dim,
      freq_dim=256, ffn_dim=c.ffn, num_layers=c.layers, cross_attn_norm=True,
      qk_norm="rms_norm_across_heads").eval()
  with torch.no_grad():   # the zero-initialised output layers would make every output 0
    for p in transformer.parameters():
      p.add_(0.02 * torch.randn_like(p))
  vae = diffusers.AutoencoderKLWan(base_dim=c.vae_base_dim, z_dim=LATENT_CHANNELS,
                                   dim_mult=[1, 2, 4, 4], num_res_blocks=c.vae_res_blocks,
                                   temperal_downsample=[False, True, True]).eval()
  pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                               transformer=transformer, vae=vae,
                               scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
  path = os.path.join(root, "wan")
  pipe.save_pretrained(path)
  shutil.copyfile(spiece, os.path.join(path, "tokenizer", "spiece.model"))
  return path


def preset(c: Case, *, scan_layers: bool, remat: str, compute_dtype: str = "float32",
           attention: str = "auto"):
  """configs/wan2_1_t2v.py's tiny preset, sized for case `c` (the import sets the
  architecture), trained on cached latents and text with AdamW and no EMA."""
  configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs")
  if configs_dir not in sys.path:   # the preset imports world_tiny beside it
    sys.path.insert(0, configs_dir)
  spec = importlib.util.spec_from_file_location(
      "wan2_1_t2v", os.path.join(configs_dir, "wan2_1_t2v.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  frames, height, width = c.video
  config.world.update(frames=frames, height=height, width=width)
  config.model.update(scan_layers=scan_layers, remat=remat, attention=attention)
  config.data.update(batch_size=c.batch, text_length=c.text_length, cache_text=True)
  config.optim.update(ema_decay=0.0, weight_decay=0.0, warmup_steps=0)
  config.train.update(steps=1000, compute_dtype=compute_dtype)
  return config


# sora_jax --------------------------------------------------------------------

class SoraJax:
  """The imported model on the sora_jax side: forward, train step and sampler."""

  def __init__(self, workdir: str, c: Case, config):
    """`config`: the imported run's (the preset with the architecture read); forward and
    sampling compute in its `train.compute_dtype` (the transformer's weights cast)."""
    self.c, self.workdir = c, workdir
    self.sampler = Sampler.from_workdir(workdir)
    self.config = config
    params = self.sampler.params
    self.params = {**params, "dit": cast_floats(params["dit"], config.train.compute_dtype)}
    self.dtype = jnp.dtype(config.train.compute_dtype)

  def forward(self, x: np.ndarray, t: np.ndarray, text: np.ndarray) -> Callable[[], Any]:
    """`x [B, T, H, W, C]`, `t [B]` flow time, `text [B, L, D]` -> a call of the jitted dit."""
    graphdef = self.sampler.graphdef
    fn = jax.jit(lambda p, x, t, text, mask: nnx.merge(graphdef, p).dit(x, t, text, mask))
    args = (self.params, jnp.asarray(x, self.dtype), jnp.asarray(t),
            jnp.asarray(text, self.dtype), jnp.ones(text.shape[:2], bool))
    return lambda: jax.block_until_ready(fn(*args))

  def train_step(self, latents: np.ndarray, text: np.ndarray) -> Callable[[], Any]:
    """One call of sora_jax's real train step (state donated and carried between calls)."""
    config = self.config
    config.data.latents_dir = self.workdir      # the batch holds latents and text states
    mesh = make_mesh(configs.mesh_shape(config), devices=jax.local_devices()[:1])  # as torch
    vocab = self.sampler.tokenizer.vocab_size
    tx = optim.make_optimizer(config.optim, config.train.steps)
    params = initial_params(self.workdir, config, vocab, mesh)
    graphdef, state, shardings = create_train_state(config, vocab, mesh, tx, params)
    null_ids, null_mask = self.sampler.tokenizer.encode([""], config.data.text_length)
    null_text = jnp.zeros((1,) + text.shape[1:], jnp.float32)
    step = make_train_step(config, graphdef, tx, shardings, mesh,
                           make_autoencoder(config.autoencoder), null_ids[0], null_mask[0],
                           null_text=null_text)
    ids = np.ones(text.shape[:2], np.int32)
    batch = to_global_batch({"latent": latents, "text_ids": ids, "text_mask": ids != 0,
                             "text_states": text}, mesh, configs.sharding_rules(config))
    holder = {"state": state}

    def call():
      holder["state"], metrics = step(holder["state"], batch)
      return jax.block_until_ready(metrics)
    return call

  def sampling(self, text: np.ndarray, null_text: np.ndarray, steps: int, cfg_scale: float,
               decode: bool = True, cache_skips: tuple[bool, ...] | None = None
               ) -> tuple[Callable[[], Any], Callable[[], np.ndarray]]:
    """(a timed call, the video in [0, 1] `[B, T, H, W, 3]`) of whole sampling from text
    states: Euler with guidance, then the VAE decode (`decode=False`: the latents, the
    transformer's share), in one jitted function, compiled here. `cache_skips`: step
    caching's schedule (`sora_jax.diffusion.step_cache`), None: off."""
    s = self.sampler
    frames, height, width = self.c.video
    options = SamplingOptions(steps=steps, cfg_scale=cfg_scale, shift=3.0, solver="euler",
                              schedule="flow_match_euler")
    fn = jax.jit(functools.partial(
        sample_from_text_states, graphdef=s.graphdef, options=options,
        latent_shape=s.autoencoder.latent_shape(frames, height, width, 3),
        autoencoder=s.autoencoder if decode else IdentityAutoencoder(),
        cache_skips=cache_skips))
    mask = jnp.ones(text.shape[:2], bool)
    args = dict(params=self.params, text=jnp.asarray(text, self.dtype), mask=mask,
                null_text=jnp.asarray(null_text, self.dtype), null_mask=mask[0],
                seeds=jnp.zeros(text.shape[0], jnp.int32))
    fn = fn.lower(**args).compile()
    return (lambda: jax.block_until_ready(fn(**args)),
            lambda: np.clip((np.asarray(fn(**args), np.float64) + 1) / 2, 0, 1))

  def timed_sampling(self, text: np.ndarray, null_text: np.ndarray, steps: int,
                     cfg_scale: float, cache_skips: tuple[bool, ...] | None = None
                     ) -> dict[str, float]:
    """One whole sampling, timed in two measured parts: the solver's steps to latents
    (the transformer's share) and the VAE decode, two jitted calls back to back
    (`end_to_end_s` is the wall time of both). Compiles first, untimed."""
    latents_call, _ = self.sampling(text, null_text, steps, cfg_scale, decode=False,
                                    cache_skips=cache_skips)
    latent = latents_call()
    decode = jax.jit(self.sampler.autoencoder.decode).lower(latent).compile()
    jax.block_until_ready(decode(latent))
    start = time.perf_counter()
    latent = latents_call()
    middle = time.perf_counter()
    jax.block_until_ready(decode(latent))
    end = time.perf_counter()
    return {"transformer_s": middle - start, "decode_s": end - middle,
            "end_to_end_s": end - start}


# diffusers / torch -------------------------------------------------------------

class Diffusers:
  """The same pipeline on the diffusers side: the transformer in `dtype` for inference,
  the VAE in float32 (as diffusers runs Wan)."""

  def __init__(self, wan_dir: str, device: str = "cpu", dtype=None):
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.device = torch, device
    self.dtype = dtype or torch.float32
    self.pipe = diffusers.WanPipeline.from_pretrained(wan_dir)
    self.pipe.transformer.to(self.dtype)
    self.pipe.to(device)
    self.pipe.set_progress_bar_config(disable=True)
    self.model = self.pipe.transformer

  def tensor(self, x: np.ndarray, channels_first: bool = False):
    x = np.moveaxis(x, -1, 1).copy() if channels_first else x
    return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

  def sync(self):
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def forward(self, x, t, text) -> tuple[Callable[[], Any], Callable[[], np.ndarray]]:
    torch = self.torch
    args = (self.tensor(x, True).to(self.dtype), self.tensor(t * 1000),
            self.tensor(text).to(self.dtype))

    def call():
      with torch.no_grad():
        out = self.model(*args, return_dict=False)[0]
      self.sync()
      return out
    return call, lambda: np.moveaxis(call().float().cpu().numpy(), 1, -1)

  def train_step(self, latents, text, grad_clip: float, lr: float, *,
                 checkpointing: bool = False) -> Callable[[], Any]:
    """Flow-matching loss, backward, clipping and AdamW, on a float32 copy of the
    pipeline's transformer (which stays as loaded), under `torch.autocast(dtype)` when
    `dtype` is not float32 (mixed precision, as sora_jax's float32 weights with a
    bfloat16 `train.compute_dtype`). `checkpointing`: diffusers' gradient checkpointing
    of every block."""
    torch = self.torch
    mixed = self.dtype != torch.float32
    model = copy.deepcopy(self.model).float().train()
    if checkpointing:
      model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0,
                            fused=self.device == "cuda")
    x0 = self.tensor(latents, True)
    context = self.tensor(text)
    generator = torch.Generator(self.device).manual_seed(0)
    autocast = (torch.autocast(self.device, dtype=self.dtype) if mixed
                else contextlib.nullcontext())

    def call():
      opt.zero_grad(set_to_none=True)
      t = torch.rand(x0.shape[0], device=self.device, generator=generator)
      noise = torch.randn(x0.shape, device=self.device, generator=generator)
      tt = t.view(-1, 1, 1, 1, 1)
      x_t = (1 - tt) * x0 + tt * noise
      with autocast:
        pred = model(x_t, t * 1000, context, return_dict=False)[0]
      loss = (pred.float() - (noise - x0)).square().mean()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
      opt.step()
      self.sync()
      return loss
    return call

  def _pipeline_args(self, c: Case, text, null_text, cfg_scale: float,
                     output_type: str) -> dict[str, Any]:
    """`WanPipeline` arguments for case `c` from precomputed text states (no steps)."""
    frames, height, width = c.video
    return dict(prompt_embeds=self.tensor(text).to(self.dtype),
                negative_prompt_embeds=self.tensor(null_text).to(self.dtype),
                num_frames=frames, height=height, width=width, guidance_scale=cfg_scale,
                output_type=output_type)

  def sampling(self, c: Case, text, null_text, noise, steps: int, cfg_scale: float,
               decode: bool = True):
    """(a timed call, the video in [0, 1]) of `WanPipeline` from the given text states
    and starting noise; `decode=False`: the latents (`output_type="latent"`)."""
    call_args = self._pipeline_args(c, text, null_text, cfg_scale,
                                    "np" if decode else "latent")
    latents = self.tensor(noise, True).to(self.dtype)

    def video():
      with self.torch.no_grad():
        out = self.pipe(latents=latents.clone(), num_inference_steps=steps,
                        **call_args).frames
      self.sync()
      return out
    return video, lambda: np.asarray(video(), np.float64)

  def timed_sampling(self, c: Case, text, null_text, noise, steps: int,
                     cfg_scale: float) -> dict[str, float]:
    """One whole `WanPipeline` call (after a 2-step warm-up call), timed in two measured
    parts: to the end of the last denoising step (a step-end callback waits for the
    device there) and the rest (the VAE decode and post-processing)."""
    marks = {}

    def at_step_end(pipe, i, t, kwargs):
      del pipe, t
      if i == steps - 1:
        self.sync()
        marks["denoised"] = time.perf_counter()
      return kwargs

    call_args = self._pipeline_args(c, text, null_text, cfg_scale, "np")
    latents = self.tensor(noise, True).to(self.dtype)
    with self.torch.no_grad():
      self.pipe(latents=latents.clone(), num_inference_steps=2, **call_args)
      self.sync()
      start = time.perf_counter()
      self.pipe(latents=latents.clone(), num_inference_steps=steps,
                callback_on_step_end=at_step_end, **call_args)
      self.sync()
      end = time.perf_counter()
    return {"transformer_s": marks["denoised"] - start, "decode_s": end - marks["denoised"],
            "end_to_end_s": end - start}


# The study ---------------------------------------------------------------------

def run_case(c: Case, *, repeats: int, sampling_steps: int, sampling_repeats: int,
             scan_layers: bool, remat: str, work: str, parts: Sequence[str]) -> list[dict]:
  """Times the parts of case `c` on both sides; one row per part."""
  root = tempfile.mkdtemp(prefix=f"versus_{c.name}_", dir=work)
  wan_dir = save_wan_pipeline(c, root)
  config = preset(c, scan_layers=scan_layers, remat=remat)
  imported = import_wan(wan_dir, os.path.join(root, "imported"), config)
  ours = SoraJax(imported, c, load_config(imported))
  theirs = Diffusers(wan_dir)
  rng = np.random.default_rng(0)
  t, h, w = c.latents
  latents = rng.standard_normal((c.batch, t, h, w, LATENT_CHANNELS)).astype(np.float32)
  text = rng.standard_normal((1, c.text_length, c.text_dim)).astype(np.float32)
  null_text = rng.standard_normal((1, c.text_length, c.text_dim)).astype(np.float32)
  common = dict(size=c.name, width=c.width, layers=c.layers, tokens=c.tokens,
                latents=list(c.latents), text_length=c.text_length)
  rows = []
  if "forward" in parts:   # one prompt with guidance: its and the empty prompt's states
    x = np.concatenate([latents[:1]] * 2)
    tt = np.full((2,), 0.7, np.float32)
    cfg_text = np.concatenate([text, null_text])
    ours_call = ours.forward(x, tt, cfg_text)
    theirs_call, theirs_out = theirs.forward(x, tt, cfg_text)
    error = relative_error(np.asarray(ours_call()), theirs_out())
    rows.append(dict(common, part="forward (CFG batch 2)", rel_error=error,
                     **_compare(ours_call, theirs_call, repeats=repeats)))
  if "train" in parts:
    batch_text = np.concatenate([text] * c.batch)
    ours_call = ours.train_step(latents, batch_text)
    theirs_call = theirs.train_step(latents, batch_text, grad_clip=config.optim.grad_clip,
                                    lr=config.optim.lr)
    rows.append(dict(common, part=f"train step (batch {c.batch})", rel_error=None,
                     **_compare(ours_call, theirs_call, repeats=repeats)))
  if "sampling" in parts:
    noise = np.asarray(initial_noise(np.zeros(1, np.int32), (t, h, w, LATENT_CHANNELS)))
    ours_call, ours_video = ours.sampling(text, null_text, sampling_steps, cfg_scale=5.0)
    theirs_call, theirs_video = theirs.sampling(c, text, null_text, noise, sampling_steps, 5.0)
    error = float(np.abs(ours_video() - theirs_video()).max())
    rows.append(dict(common, part=f"sampling ({sampling_steps} steps, CFG, VAE decode)",
                     rel_error=None, max_pixel_error=error,
                     **_compare(ours_call, theirs_call, repeats=sampling_repeats, max_warmup=6)))
    # Where the time goes: one more run per side, the denoising and the decode measured.
    rows[-1]["parts_s"] = {
        "sora_jax": ours.timed_sampling(text, null_text, sampling_steps, 5.0),
        "diffusers": theirs.timed_sampling(c, text, null_text, noise, sampling_steps, 5.0)}
  shutil.rmtree(root, ignore_errors=True)
  return rows


def _compare(ours: Callable[[], Any], theirs: Callable[[], Any], **kwargs) -> dict[str, Any]:
  mine, other, ratio = timed_pair(ours, theirs, **kwargs)
  return {"sora_jax": mine, "diffusers": other, "speedup": ratio}


def _ms(r: dict[str, float]) -> str:
  return f"{r['median_ms']:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f})"


COLUMNS = [
    ("size", lambda r: f"{r['size']} ({r['width']} wide, {r['layers']} layers, "
                       f"{r['tokens']:,} tokens)"),
    ("part", lambda r: r["part"]),
    ("sora_jax ms (p10-p90)", lambda r: _ms(r["sora_jax"])),
    ("diffusers ms (p10-p90)", lambda r: _ms(r["diffusers"])),
    ("diffusers time / sora_jax time (median of rounds)", lambda r: f"{r['speedup']:.2f}x"),
    ("sampling: denoising / VAE decode (s), sora_jax vs diffusers", lambda r: (
        "{:.2f} / {:.2f} vs {:.2f} / {:.2f}".format(
            r["parts_s"]["sora_jax"]["transformer_s"], r["parts_s"]["sora_jax"]["decode_s"],
            r["parts_s"]["diffusers"]["transformer_s"], r["parts_s"]["diffusers"]["decode_s"])
        if "parts_s" in r else "-")),
    ("agreement", lambda r: (f"rel. error {r['rel_error']:.1e}" if r.get("rel_error") is not None
                             else f"max pixel diff {r['max_pixel_error']:.1e}"
                             if r.get("max_pixel_error") is not None else "-")),
]


def environment() -> dict[str, Any]:
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
          "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "machine": platform.processor() or platform.machine(),
          "load_average_before": os.getloadavg()}


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="demo,small,medium",
                      help=f"Comma-separated sizes of {sorted(SIZES)}.")
  parser.add_argument("--parts", default="forward,train,sampling",
                      help="Comma-separated parts: forward, train, sampling.")
  parser.add_argument("--repeats", type=int, default=15, help="Timed calls per side.")
  parser.add_argument("--sampling-steps", type=int, default=10, help="Solver steps.")
  parser.add_argument("--sampling-repeats", type=int, default=5, help="Timed samplings per side.")
  parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                      help="sora_jax: blocks under a scan (model.scan_layers).")
  parser.add_argument("--remat", default="dots", help="sora_jax: model.remat of the train step.")
  parser.add_argument("--layers", type=int, default=None, help="Override every size's depth.")
  parser.add_argument("--out", default="versus_diffusers.json", help="JSON output.")
  args = parser.parse_args(argv)
  sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
  unknown = [s for s in sizes if s not in SIZES]
  if unknown:
    raise SystemExit(f"versus_diffusers: unknown sizes {unknown}; expected some of "
                     f"{sorted(SIZES)}.")
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  if not parts or set(parts) - {"forward", "train", "sampling"}:
    raise SystemExit(f"versus_diffusers: --parts={args.parts!r}; expected some of "
                     "forward, train, sampling.")
  env = environment()
  rows = []
  with tempfile.TemporaryDirectory(prefix="versus_diffusers_") as work:
    for name in sizes:
      overrides = {} if args.layers is None else {"layers": args.layers}
      rows += run_case(case(name, **overrides), repeats=args.repeats,
                       sampling_steps=args.sampling_steps,
                       sampling_repeats=args.sampling_repeats, scan_layers=args.scan_layers,
                       remat=args.remat, work=work, parts=parts)
      print(f"({name} done)", flush=True)
  env["load_average_after"] = os.getloadavg()
  report(rows, COLUMNS, args.out, environment=env,
         settings=dict(scan_layers=args.scan_layers, remat=args.remat,
                       sampling_steps=args.sampling_steps, repeats=args.repeats,
                       dtype="float32"))


if __name__ == "__main__":
  main()
