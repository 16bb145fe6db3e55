"""Autoregressive sampling of a block-causal transformer: video of any length, a chunk at a time.

A model trained with block-causal attention (`model.causal_frames`) and per-frame flow times
(`flow.frame_times`, Diffusion Forcing) can denoise a chunk of latent frames after a clean
past. `sample_chunk` does that for one chunk: it integrates the chunk's flow with
classifier-free guidance, every evaluation attending to the keys and values of the chunks
before it (a `KVCache`, as in CausVid and Self-Forcing), then runs the finished chunk once
at flow time 0 and writes its keys and values into the cache. The cache is a rolling window
of `window` chunks (a ring buffer: chunk c goes to slot c mod window), so memory and time
per chunk stay constant however long the video gets; RoPE positions keep counting (chunk c
sits at latent frames c * chunk ...), so attention sees the true distance to what it
remembers. One compiled function serves every chunk (the chunk index is an input). On a
mesh (`Sampler` with one, `sora-jax sample --stream --sharded`) the cache is sharded state:
its tokens split over the `sequence` axis (`layers.cache_sharding`), which the ring and
Ulysses backends attend to where it lies (`parallel.context.cached_attention`), so a long
window's cache is spread over the devices instead of held by each.

`stream` drives it from a `Sampler`: prompt in, uint8 frames out chunk by chunk, decoded
as they come (`Autoencoder.decode_next` carries the causal decoder's state), with the
timings a streaming server reports.

Shape letters: B videos, c latent frames per chunk, H' W' latent size, C latent channels,
L cache tokens (window chunks), N tokens per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterator, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import configs
from sora_jax.data.pipeline import to_uint8
from sora_jax.diffusion import flow
from sora_jax.diffusion.solvers import SOLVERS
from sora_jax.models.dit import DiTConfig
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.kv_cache import chunk_positions, empty_cache, insert_chunk
from sora_jax.models.layers import KVCache, cache_sharding
from sora_jax.sample import Sampler, SamplingOptions

# Noise stream of chunk c: PRNGKey(seed) folded with NOISE_STREAM, then c (another stream
# than a whole-video sample's, `sample.initial_noise`).
NOISE_STREAM = 7


def chunk_noise(seeds: jax.Array, index: jax.Array, shape: Sequence[int]) -> jax.Array:
  """`[B, *shape]` starting noise of chunk `index`, each row from its own seed."""
  def draw(seed):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), NOISE_STREAM), index)
    return jax.random.normal(key, tuple(shape))
  return jax.vmap(draw)(seeds)


def guidance_rows(cfg_scale: float, cfg: DiTConfig) -> int:
  """Passes per evaluation: 2 with classifier-free guidance (text, empty text), else 1 (no
  guidance, or a distilled student: its guidance is an input or folded in)."""
  student = cfg.guidance_embedding or cfg.step_embedding
  return 1 if cfg_scale == 1.0 or student else 2


def sample_chunk(params, graphdef: nnx.GraphDef, text: jax.Array, mask: jax.Array,
                 null_text: jax.Array, null_mask: jax.Array, cache: KVCache,
                 seeds: jax.Array, index: jax.Array, *, chunk_shape: Sequence[int],
                 options: SamplingOptions, window: int,
                 cache_layout: KVCache | None = None,
                 option_values: dict[str, jax.Array] | None = None
                 ) -> tuple[jax.Array, KVCache]:
  """Generates chunk `index` of latent frames after the cache (pure; jit it with the
  keyword args static but `option_values`).

  Args:
    params, graphdef: the model (its `dit` block-causal, `causal_frames > 0`).
    text, mask: `[B, S, D]` the prompts' text states, `[B, S]` bool; null_text `[1, S, D]`,
      null_mask `[S]`: the empty prompt's.
    cache: `[depth, G B, L, H, D]` keys and values of earlier chunks (G = `guidance_rows`:
      the conditional rows, then the unconditional ones), `empty_cache` for chunk 0.
      A distilled student (`model.guidance_embedding` or `step_embedding`) runs one pass.
    seeds: `[B]` int32; index: scalar int32 chunk index.
    chunk_shape: `(c, H', W', C)` latent frames per chunk and the latent size.
    options: solver, steps, shift, schedule and `cfg_scale` (text guidance only).
    window: chunks the cache holds (L = window * N).
    cache_layout: the cache's shardings (`layers.cache_sharding`), which the returned cache
      keeps; None: the compiler's choice.
    option_values: `cfg_scale` and `shift` as arrays (`SamplingOptions.traced_values`),
      for a program compiled once for all their values (`options.structure()`; whether
      `cfg_scale` is 1 still decides the passes); None: `options`' own.

  Returns:
    `(latent chunk [B, c, H', W', C] float32, the cache with this chunk added)`.
  """
  model = nnx.merge(graphdef, params)
  dit_graph, dit_state = nnx.split(model.dit)
  cfg: DiTConfig = model.dit.cfg
  b = text.shape[0]
  rows = guidance_rows(options.cfg_scale, cfg)
  settings = option_values or options.traced_values()
  # A distilled student runs one pass: the guidance scale as its input (CFG-distilled), or
  # the step size of its few uniform steps (a shortcut student, guidance folded in).
  scalars = {}
  if cfg.guidance_embedding:
    scalars["guidance"] = jnp.full((b,), settings["cfg_scale"], jnp.float32)
  if cfg.step_embedding:
    scalars["step_size"] = jnp.full((b,), 1.0 / options.steps, jnp.float32)
  texts = text if rows == 1 else jnp.concatenate([text, jnp.broadcast_to(null_text, text.shape)])
  masks = mask if rows == 1 else jnp.concatenate([mask, jnp.broadcast_to(null_mask, mask.shape)])
  grid = tuple(s // p for s, p in zip(chunk_shape[:3], cfg.patch))
  positions = jnp.broadcast_to(chunk_positions(index, grid), (rows * b, num_tokens(
      chunk_shape[:3], cfg.patch), 3))

  def call(x, t, **kwargs):
    # Rebuilt inside the solver's loop (NNX transforms refuse modules of an outer trace).
    dit = nnx.merge(dit_graph, dit_state, copy=True)
    return dit(jnp.concatenate([x] * rows), jnp.concatenate([t] * rows), texts, masks,
               positions=positions, kv_cache=cache, **scalars, **kwargs)

  def velocity(x, t):
    v = call(x, t)
    if rows == 1:
      return v
    conditional, unconditional = v[:b], v[b:]
    return unconditional + settings["cfg_scale"] * (conditional - unconditional)

  times = flow.sampling_times(options.steps, settings["shift"], options.schedule)
  x = SOLVERS[options.solver](velocity, chunk_noise(seeds, index, chunk_shape), times)
  _, (keys, values) = call(x, jnp.zeros((b,), jnp.float32), return_kv=True)
  cache = insert_chunk(cache, keys, values, index % window)
  if cache_layout is not None:
    cache = jax.lax.with_sharding_constraint(cache, cache_layout)
  return x.astype(jnp.float32), cache


@dataclasses.dataclass
class StreamStats:
  """What `stream` measured: seconds from the call to the first frames (compiling
  included on a first call), seconds per chunk after the first, frames written."""
  first_frames_s: float = 0.0
  chunk_s: list[float] = dataclasses.field(default_factory=list)
  frames: int = 0
  frames_after_first: int = 0

  @property
  def frames_per_s(self) -> float | None:
    """Frames per second after the first chunk (None before a second chunk)."""
    if not self.chunk_s or self.frames == 0:
      return None
    return self.frames_after_first / sum(self.chunk_s)


def stream_plan(sampler: Sampler, frames: int, height: int, width: int,
                chunk_latents: int | None, window: int | None) -> tuple[int, int, int]:
  """`(chunks, chunk_latents, window)` for a `frames`-frame video, checking the model and
  the sizes (one clear line each): the model must be block-causal; a chunk is whole causal
  blocks (default one); the latent frames must divide into chunks; window >= 1 (default
  `sample.stream_window`)."""
  t = configs.typed(sampler.config)
  causal = t.model.causal_frames
  if not causal:
    raise ValueError("streaming needs a block-causal model (model.causal_frames > 0, trained "
                     "so); this run's model is bidirectional: sample it whole or with "
                     "--extend.")
  patch = configs.decode_variant(t.model.variant)["patch"]
  chunk_latents = chunk_latents or causal * patch[0]
  if chunk_latents % (causal * patch[0]):
    raise ValueError(f"chunk={chunk_latents} latent frames: a chunk is whole causal blocks "
                     f"of {causal * patch[0]} latent frames.")
  latent = sampler.autoencoder.latent_shape(frames, height, width, 3)
  if latent[0] % chunk_latents:
    raise ValueError(f"frames={frames}: {latent[0]} latent frames do not divide into chunks "
                     f"of {chunk_latents}; choose frames giving a multiple of {chunk_latents} "
                     "latent frames.")
  for name, size, p in zip(("height", "width"), latent[1:3], patch[1:]):
    if size % p:
      raise ValueError(f"{name}={size} (diffused) is not a multiple of the patch size {p}.")
  window = window or t.sample.stream_window
  if window < 1:
    raise ValueError(f"window={window}: the cache holds at least one chunk.")
  return latent[0] // chunk_latents, chunk_latents, window


def stream(sampler: Sampler, prompt: str, seed: int, *, frames: int | None = None,
           height: int | None = None, width: int | None = None,
           chunk_latents: int | None = None, window: int | None = None,
           stats: StreamStats | None = None, **options) -> Iterator[np.ndarray]:
  """Yields the uint8 frames `[t, H, W, 3]` of one video chunk by chunk as they are made.

  Args:
    sampler: a loaded block-causal model (`Sampler.from_workdir`).
    prompt, seed: what to generate and its noise.
    frames, height, width: the whole video's size (default: the run's `world` size).
    chunk_latents: latent frames per chunk (default: one causal block).
    window: chunks of past the cache keeps (default `sample.stream_window`).
    stats: filled in with the timings as frames come (`StreamStats`).
    **options: `SamplingOptions` fields (steps, cfg_scale, shift, solver, schedule); options
      of whole-video sampling only (given frames, guidance intervals, step caching) are
      refused.
  """
  opts = sampler.options(**options)
  unsupported = [f"{k}={getattr(opts, k)!r}" for k, v in (
      ("cache_threshold", 0.0), ("strength", 1.0), ("image_cfg_scale", 1.0),
      ("guidance_interval", (0.0, 1.0)), ("eta", 0.0)) if getattr(opts, k) != v]
  if unsupported:
    raise ValueError(f"{', '.join(unsupported)}: streaming samples text to video with plain "
                     "classifier-free guidance.")
  frames, height, width = sampler.clip_size(frames, height, width)
  chunks, chunk_latents, window = stream_plan(sampler, frames, height, width, chunk_latents,
                                              window)
  latent = sampler.autoencoder.latent_shape(frames, height, width, 3)
  chunk_shape = (chunk_latents,) + tuple(latent[1:])
  t = configs.typed(sampler.config)
  patch = configs.decode_variant(t.model.variant)["patch"]
  tokens = num_tokens(chunk_shape[:3], patch)
  # The shift of a whole clip of the length the model trained on (the chunk's own token
  # count would shift less than the training clips' noise levels were shifted).
  trained = sampler.autoencoder.latent_shape(*sampler.clip_size(None, height, width), 3)
  if not t.model.step_embedding:     # a few-step student's grid is its own
    opts = dataclasses.replace(opts, shift=float(flow.token_shift(
        num_tokens(trained[:3], patch), opts.shift, t.flow.shift_base_tokens)))
  dit_cfg = configs.dit_config(sampler.config, text_width=t.text_encoder.width,
                               in_channels=latent[-1])
  rows = guidance_rows(opts.cfg_scale, dit_cfg)
  layout = (None if sampler.mesh is None else
            cache_sharding(sampler.mesh, rows, window * tokens, dit_cfg.heads))
  # The guidance scale and shift are inputs: all values share their structure's program.
  values, opts = opts.traced_values(), opts.structure()
  key = ("stream", chunk_shape, opts, window)
  fn = functools.partial(sampler.compiled(key, lambda: jax.jit(functools.partial(
      sample_chunk, graphdef=sampler.graphdef, chunk_shape=chunk_shape, options=opts,
      window=window, cache_layout=layout), donate_argnames=("cache",))),
                         option_values=values)
  encode = sampler.compiled(("stream-text",), lambda: jax.jit(_encode_text,
                                                               static_argnames=("graphdef",)))
  decode = sampler.compiled(("stream-decode", chunk_shape),
                            lambda: jax.jit(sampler.autoencoder.decode_next))
  c = sampler.config
  ids, mask = sampler.tokenizer.encode([prompt], c.data.text_length)
  null_ids, null_mask = sampler.tokenizer.encode([""], c.data.text_length)
  stats = stats if stats is not None else StreamStats()
  start = time.perf_counter()
  with sampler.sharding_context():
    text, null_text = encode(sampler.params, ids, mask, null_ids, null_mask,
                             graphdef=sampler.graphdef)
    cache = empty_cache(dit_cfg, rows, window * tokens, text.dtype, layout)
    state = None
    seeds = jnp.asarray([seed], jnp.int32)
    for index in range(chunks):
      x, cache = fn(sampler.params, text=text, mask=jnp.asarray(mask), null_text=null_text,
                    null_mask=jnp.asarray(null_mask[0]), cache=cache, seeds=seeds,
                    index=jnp.asarray(index, jnp.int32))
      video, state = decode(x, state)
      out = to_uint8(np.asarray(jax.device_get(video)))[0]
      now = time.perf_counter()
      if index == 0:
        stats.first_frames_s = now - start
      else:
        stats.chunk_s.append(now - start)
        stats.frames_after_first += len(out)
      start = now
      stats.frames += len(out)
      yield out


def _encode_text(params, ids, mask, null_ids, null_mask, *, graphdef):
  """Text states of the prompt `[1, S, D]` and of the empty prompt `[1, S, D]`."""
  model = nnx.merge(graphdef, params)
  return model.text_encoder(ids, mask), model.text_encoder(null_ids, null_mask)


def stream_summary(stats: StreamStats, chunks: int) -> dict[str, Any]:
  """The timings of a stream as a record (for a report or a manifest)."""
  return {"chunks": chunks, "frames": stats.frames,
          "first_frames_s": round(stats.first_frames_s, 3),
          "chunk_s": [round(s, 3) for s in stats.chunk_s],
          "frames_per_s_after_first": (None if stats.frames_per_s is None
                                       else round(stats.frames_per_s, 3))}
