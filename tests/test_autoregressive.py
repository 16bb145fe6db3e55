"""Autoregressive sampling with a KV cache equals sampling each chunk after its whole
uncached past; the rolling window keeps memory per chunk constant; streaming checks."""

import functools
import json
import os
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import random_model, run_cli, run_experiment
from sora_jax import autoregressive, video_io
from sora_jax.provenance import manifest, watermark
from sora_jax.provenance.outputs import GeneratedStream
from sora_jax.diffusion import flow
from sora_jax.diffusion.solvers import euler
from sora_jax.models.embeddings import grid_positions
from sora_jax.models.layers import KVCache, cache_sharding
from sora_jax.parallel.sharding import make_mesh
from sora_jax.sample import Sampler
from sora_jax.train import long_rollout
from sora_jax.train.state import abstract_model


def _text(sampler, prompt="a red circle moves left"):
  model = nnx.merge(sampler.graphdef, sampler.params)
  ids, mask = sampler.tokenizer.encode([prompt], sampler.config.data.text_length)
  null_ids, null_mask = sampler.tokenizer.encode([""], sampler.config.data.text_length)
  return (model, model.text_encoder(ids, mask), jnp.asarray(mask),
          model.text_encoder(null_ids, null_mask), jnp.asarray(null_mask[0]))


def _uncached_chunk(model, text, mask, null_text, null_mask, past, index, *, chunk, steps,
                    cfg_scale, seed):
  """Chunk `index` (latent frames `[1, c, H, W, C]`) sampled by running the transformer on
  the clean past `past [1, P, H, W, C]` (flow time 0) and the noisy chunk together, every
  evaluation, with positions of the whole video; its velocity is the chunk's part."""
  dit = model.dit
  p, c = past.shape[1], chunk[0]
  pt = dit.cfg.patch[0]
  grid = ((p + c) // pt, chunk[1] // dit.cfg.patch[1], chunk[2] // dit.cfg.patch[2])
  start = index * c - p                                  # the past's first latent frame
  positions = grid_positions(grid) + jnp.asarray([start // pt, 0, 0])
  per_frame = grid[1] * grid[2]
  past_tokens = p // pt * per_frame

  def velocity(x, t):
    video = jnp.concatenate([past, x], axis=1)
    times = jnp.concatenate([jnp.zeros((1, past_tokens)),
                             jnp.broadcast_to(t[:, None], (1, c // pt * per_frame))], axis=1)
    outs = [dit(video, times, txt, jnp.broadcast_to(m, mask.shape), positions=positions[None])
            for txt, m in ((text, mask), (null_text, null_mask))]
    cond, uncond = (o[:, p:] for o in outs)
    return uncond + cfg_scale * (cond - uncond)

  noise = autoregressive.chunk_noise(jnp.asarray([seed], jnp.int32), jnp.asarray(index), chunk)
  return euler(velocity, noise, flow.sampling_times(steps, 1.0))


def _windowed_chunk(model, text, mask, null_text, null_mask, past, index, *, chunk, steps,
                    cfg_scale, seed, window):
  """Chunk `index` sampled after the keys and values of the last `window` chunks of `past`
  as the whole uncached causal pass over `past` (flow time 0) computes them: a rolling
  cache keeps the keys it made, which saw the chunks since evicted."""
  dit = model.dit
  pt, c = dit.cfg.patch[0], chunk[0]
  per_frame = (chunk[1] // dit.cfg.patch[1]) * (chunk[2] // dit.cfg.patch[2])
  kept = window * c // pt * per_frame
  caches = []
  for txt, m in ((text, mask), (null_text, null_mask)):
    _, (keys, values) = dit(past, jnp.zeros((1,)), txt, jnp.broadcast_to(m, mask.shape),
                            return_kv=True)
    caches.append((keys[:, :, -kept:], values[:, :, -kept:]))
  grid = (c // pt, chunk[1] // dit.cfg.patch[1], chunk[2] // dit.cfg.patch[2])
  positions = autoregressive.chunk_positions(jnp.asarray(index), grid)[None]

  def velocity(x, t):
    outs = [dit(x, t, txt, jnp.broadcast_to(m, mask.shape), positions=positions,
                kv_cache=KVCache(k, v, jnp.ones((1, kept), bool)))
            for (txt, m), (k, v) in zip(((text, mask), (null_text, null_mask)), caches)]
    return outs[1] + cfg_scale * (outs[0] - outs[1])

  noise = autoregressive.chunk_noise(jnp.asarray([seed], jnp.int32), jnp.asarray(index), chunk)
  return euler(velocity, noise, flow.sampling_times(steps, 1.0))


@pytest.mark.parametrize("window", [4, 1])
def test_cached_chunks_equal_sampling_after_the_uncached_past(causal_sampler, window):
  """Four chunks of 2 latent frames (one causal block each). Window 4 keeps the whole past:
  each chunk equals sampling it after its whole uncached past. Window 1 keeps the chunk
  before: chunk 2 equals sampling it after the keys and values the uncached pass gives
  chunk 1 (later chunks' cached keys were made after their own window only, as CausVid's
  rolling cache makes them). One compiled function serves every chunk, its cache the same
  size."""
  model, text, mask, null_text, null_mask = _text(causal_sampler)
  chunk = (2, 16, 16, 3)
  options = causal_sampler.options(steps=2, cfg_scale=2.0, shift=1.0)
  fn = jax.jit(lambda params, cache, index: autoregressive.sample_chunk(
      params, causal_sampler.graphdef, text, mask, null_text, null_mask, cache,
      jnp.asarray([3], jnp.int32), index, chunk_shape=chunk, options=options, window=window))
  tokens = 1 * 4 * 4
  cfg = model.dit.cfg
  cache = autoregressive.empty_cache(cfg, 2, window * tokens)
  made = []
  for index in range(4):
    x, cache = fn(causal_sampler.params, cache, jnp.asarray(index, jnp.int32))
    chex.assert_shape(x, (1,) + chunk)
    chex.assert_shape(cache.keys, (cfg.depth, 2, window * tokens, cfg.heads,
                                   cfg.width // cfg.heads))
    if index <= window:
      past = jnp.concatenate(made, axis=1) if made else jnp.zeros((1, 0) + chunk[1:])
      reference = _uncached_chunk(model, text, mask, null_text, null_mask, past, index,
                                  chunk=chunk, steps=2, cfg_scale=2.0, seed=3)
    elif index == window + 1:
      reference = _windowed_chunk(model, text, mask, null_text, null_mask,
                                  jnp.concatenate(made, axis=1), index, chunk=chunk, steps=2,
                                  cfg_scale=2.0, seed=3, window=window)
    else:   # later chunks' keys saw only their window (the reference above would not)
      reference = x
    np.testing.assert_allclose(x, reference, atol=1e-4)
    made.append(x)
  assert fn._cache_size() == 1   # pylint: disable=protected-access


def test_a_sequence_sharded_cache_streams_the_same_video(causal_sampler, devices):
  """On a mesh that splits tokens over 2 devices (heads over 2), with ring attention, the
  cache is sharded state: each device holds half of its slots, before and after every
  chunk (`cache_sharding`, kept by the compiled chunk function), and the chunks are the
  unsharded sampler's."""
  config = causal_sampler.config.copy_and_resolve_references()
  config.model.attention = "ring"
  mesh = make_mesh({"sequence": 2, "tensor": 2}, devices=devices[:4])
  sharded = Sampler(config, causal_sampler.tokenizer, causal_sampler.graphdef,
                    jax.device_put(causal_sampler.params, NamedSharding(mesh, P())), mesh=mesh)
  model, text, mask, null_text, null_mask = _text(causal_sampler)
  chunk, window, tokens = (2, 16, 16, 3), 2, 16
  options = causal_sampler.options(steps=2, cfg_scale=2.0, shift=1.0)
  layout = cache_sharding(mesh, 2, window * tokens, model.dit.cfg.heads)
  assert layout.keys.spec == P(None, None, "sequence", "tensor", None)
  # Axes that do not divide a dimension leave it whole (4 data shards of 2 rows).
  assert cache_sharding(make_mesh({"data": 4, "sequence": 2}, devices), 2, 32,
                        2).keys.spec == P(None, None, "sequence", None, None)
  fns = [jax.jit(functools.partial(autoregressive.sample_chunk, graphdef=s.graphdef,
                                   chunk_shape=chunk, options=options, window=window,
                                   cache_layout=layout if s is sharded else None))
         for s in (causal_sampler, sharded)]
  caches = [autoregressive.empty_cache(model.dit.cfg, 2, window * tokens),
            autoregressive.empty_cache(model.dit.cfg, 2, window * tokens, layout=layout)]
  for index in range(3):
    outs = []
    for i, (s, fn) in enumerate(zip((causal_sampler, sharded), fns)):
      with s.sharding_context():
        x, caches[i] = fn(s.params, text=text, mask=mask, null_text=null_text,
                          null_mask=null_mask, cache=caches[i],
                          seeds=jnp.asarray([3], jnp.int32),
                          index=jnp.asarray(index, jnp.int32))
      outs.append(x)
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)
    for array in (caches[1].keys, caches[1].values):
      assert array.sharding.spec[2] == "sequence"
      assert {sh.data.shape[2] for sh in array.addressable_shards} == {window * tokens // 2}
  np.testing.assert_allclose(caches[1].keys, caches[0].keys, atol=1e-4)
  frames = [np.concatenate(list(autoregressive.stream(s, "a blue square moves up", 5,
                                                      frames=8, steps=2, window=2)))
            for s in (causal_sampler, sharded)]
  assert np.abs(frames[1].astype(int) - frames[0].astype(int)).max() <= 1


def test_a_training_rollout_is_the_stream_and_keeps_each_rows_cache(causal_sampler):
  """`train.long_rollout` (extended DMD's rollout, without gradient) makes the video that
  streaming makes from the same noise, one pass a step (cfg 1): five chunks of 2 latent
  frames through a window of 2, two rows with their own seeds; the cache it keeps for
  each row is the one streaming had before that row's chunk (0 and 3: empty, and full
  with chunks 1 and 2). A rollout that is not whole blocks is refused in one line."""
  model, text, mask, null_text, null_mask = _text(causal_sampler)
  text, mask = jnp.concatenate([text, text]), jnp.concatenate([mask, mask])
  chunk, window, tokens, chunks, steps = (2, 16, 16, 3), 2, 16, 5, 2
  seeds = jnp.asarray([3, 4], jnp.int32)
  options = causal_sampler.options(steps=steps, cfg_scale=1.0, shift=2.0, solver="euler",
                                   schedule="uniform")
  fn = jax.jit(lambda cache, index: autoregressive.sample_chunk(
      causal_sampler.params, causal_sampler.graphdef, text, mask, null_text, null_mask,
      cache, seeds, index, chunk_shape=chunk, options=options, window=window))
  cfg = model.dit.cfg
  cache = autoregressive.empty_cache(cfg, 2, window * tokens)
  streamed, before = [], []
  for index in range(chunks):
    before.append(cache)
    x, cache = fn(cache, jnp.asarray(index, jnp.int32))
    streamed.append(x)
  noise = jnp.concatenate([autoregressive.chunk_noise(seeds, jnp.asarray(j), chunk)
                           for j in range(chunks)], axis=1)
  at = lambda j: jnp.broadcast_to(autoregressive.chunk_positions(j, (1, 4, 4)), (2, tokens, 3))
  velocity = lambda x, j, t, size, cache: model.dit(x, t, text, mask, positions=at(j),
                                                    kv_cache=cache)
  keys_values = lambda x, j, cache: model.dit(x, jnp.zeros((2,)), text, mask,
                                              positions=at(j), kv_cache=cache,
                                              return_kv=True)[1]
  rollout = jax.jit(functools.partial(long_rollout.stream_rollout, velocity, keys_values,
                                      block=2, steps=steps, shift=2.0, window=window))
  video, kept = rollout(noise, autoregressive.empty_cache(cfg, 2, window * tokens),
                        jnp.asarray([0, 3]))
  chex.assert_shape(video, (2, 2 * chunks) + chunk[1:])
  np.testing.assert_allclose(video, jnp.concatenate(streamed, axis=1), atol=1e-4)
  for row, index in enumerate((0, 3)):
    for got, want in zip(jax.tree.leaves(kept), jax.tree.leaves(before[index])):
      got, want = np.asarray(got), np.asarray(want)
      axis = 0 if got.ndim == 2 else 1
      np.testing.assert_allclose(np.take(got, row, axis), np.take(want, row, axis), atol=1e-4)
  assert not np.asarray(kept.valid)[0].any() and np.asarray(kept.valid)[1].all()
  with pytest.raises(ValueError, match="do not split into causal blocks of 3"):
    long_rollout.stream_rollout(velocity, keys_values, noise, before[0], jnp.asarray([0, 0]),
                                  block=3, steps=steps, shift=2.0, window=window)


def test_stream_yields_every_frame_deterministically(causal_sampler):
  stats = autoregressive.StreamStats()
  chunks = list(autoregressive.stream(causal_sampler, "a blue square moves up", 5, frames=8,
                                      steps=2, stats=stats))
  assert [c.shape for c in chunks] == [(2, 16, 16, 3)] * 4
  assert stats.frames == 8 and stats.frames_after_first == 6 and len(stats.chunk_s) == 3
  again = list(autoregressive.stream(causal_sampler, "a blue square moves up", 5, frames=8,
                                     steps=2))
  np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate(again))
  other = np.concatenate(list(autoregressive.stream(causal_sampler, "a blue square moves up", 6,
                                                    frames=8, steps=2)))
  assert not np.array_equal(other, np.concatenate(chunks))
  # A longer video compiles nothing new: the chunk function is per chunk shape.
  compiled = causal_sampler.compiled_shapes
  longer = list(autoregressive.stream(causal_sampler, "a blue square moves up", 5, frames=16,
                                      steps=2))
  assert len(longer) == 8 and causal_sampler.compiled_shapes == compiled
  # The first chunks are the shorter video's: later frames do not change earlier ones.
  np.testing.assert_array_equal(np.concatenate(longer[:4]), np.concatenate(chunks))
  # Nor does another guidance scale or shift (the chunk function's inputs), which moves
  # the frames.
  swept = np.concatenate(list(autoregressive.stream(
      causal_sampler, "a blue square moves up", 5, frames=8, steps=2,
      cfg_scale=causal_sampler.config.sample.cfg_scale + 2.0, shift=4.0)))
  assert causal_sampler.compiled_shapes == compiled
  assert not np.array_equal(swept, np.concatenate(chunks))


def test_stream_refuses_what_it_cannot_do(causal_sampler, data_dir, tokenizer):
  with pytest.raises(ValueError, match="do not divide into chunks of 4"):
    next(autoregressive.stream(causal_sampler, "a red circle", 0, frames=6, chunk_latents=4))
  with pytest.raises(ValueError, match="whole causal blocks"):
    next(autoregressive.stream(causal_sampler, "a red circle", 0, frames=8, chunk_latents=3))
  with pytest.raises(ValueError, match="window=-1"):
    next(autoregressive.stream(causal_sampler, "a red circle", 0, frames=8, window=-1))
  with pytest.raises(ValueError, match="cache_threshold"):
    next(autoregressive.stream(causal_sampler, "a red circle", 0, frames=8,
                               cache_threshold=0.1))
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir)
  graphdef, abstract = abstract_model(config, tokenizer.vocab_size)
  bidirectional = Sampler(config, tokenizer, graphdef, None)
  with pytest.raises(ValueError, match="block-causal model"):
    next(autoregressive.stream(bidirectional, "a red circle", 0, frames=8))
  del abstract


def _frames_in(path: str, frames: int, timeout: float = 30.0) -> tuple[int, int]:
  """`(bytes, frames)` of the growing mp4 `path` once it holds `frames` frames (ffmpeg
  writes on its own time: waits up to `timeout` seconds)."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      found = len(video_io.read_video(path))
    except (OSError, ValueError):    # not created yet, or only its header
      found = 0
    if found >= frames or time.monotonic() > deadline:
      return os.path.getsize(path) if os.path.exists(path) else 0, found
    time.sleep(0.1)


def test_a_streamed_file_grows_while_sampling_and_ends_signed(causal_sampler, tmp_path):
  """Chunks of 2 frames: after every chunk the partial file is a readable video of the
  frames written so far (all but the last); the finished file is signed, watermarked and
  whole."""
  path = str(tmp_path / "long.mp4")
  out = GeneratedStream(path, config=causal_sampler.config, step=0, fps=2, scale=2,
                        generation={"mode": "stream"})
  grown = []
  for frames in autoregressive.stream(causal_sampler, "a red circle moves left", 1, frames=16,
                                      steps=2):
    out.write(frames)
    grown.append(_frames_in(out.partial, out.frames - 1))
  # A frame is in the file once the next one is encoded; the last one when it closes.
  assert [frames for _, frames in grown] == list(range(1, 16, 2)), grown
  assert all(b > a for (a, _), (b, _) in zip(grown, grown[1:])), grown
  assert not os.path.exists(path)
  record, message = out.finish(chunks=8)
  assert "signed" in message and not os.path.exists(out.partial)
  assert record["complete"] and record["frames_written"] == 16
  assert manifest.verify(path).status in ("trusted", "untrusted")
  assert video_io.read_video(path).shape == (16, 32, 32, 3)


def test_a_video_watermarked_chunk_by_chunk_is_detected_with_its_payload(causal_sampler,
                                                                           tmp_path):
  """Smooth frames (a random model's noise holds too little of the watermark at this size),
  written two at a time, carry the run's payload like a video marked whole."""
  rng = np.random.default_rng(0)
  video = np.repeat(np.repeat((rng.random((16, 4, 4, 3)) * 255).astype(np.uint8), 4, 1), 4, 2)
  path = str(tmp_path / "marked.mp4")
  out = GeneratedStream(path, config=causal_sampler.config, step=3, fps=2, scale=8)
  for start in range(0, 16, 2):
    out.write(video[start:start + 2])
  record, _ = out.finish()
  found = watermark.detect_file(path)
  assert found.detected, found.score
  ids = watermark.payload_ids(manifest.config_hash(causal_sampler.config), 3)
  assert (found.model_id, found.run_id) == ids
  assert record["watermark"]["payload"] == f"0x{(ids[0] << 16) | ids[1]:08x}"


def test_sample_stream_through_the_command_line(causal_export, tmp_path):
  """`sora-jax sample --stream` on an export of the causal model; a bidirectional run and
  an impossible length are refused in one line."""
  export = causal_export
  path = str(tmp_path / "streamed.mp4")
  code, out = run_cli("sample", "--workdir", export, "--prompt", "a red circle moves left",
                      "--out", path, "--stream", "--frames", "12", "--steps", "2", "--window",
                      "2", "--scale", "1")
  assert code == 0, out[-3000:]
  assert "Streaming into" in out and "12/12 frames" in out and "Wrote" in out
  assert video_io.read_video(path).shape == (12, 16, 16, 3)
  generation = manifest.verify(path).generation
  assert generation["mode"] == "stream" and generation["window"] == 2
  # (Arrays are kept as JSON text in a manifest: manifest._arrays_as_text.)
  assert generation["stream"]["chunks"] == 6
  assert len(json.loads(generation["stream"]["chunk_s"])) == 5
  code, out = run_cli("sample", "--workdir", export, "--prompt", "a red circle", "--out",
                      str(tmp_path / "x.mp4"), "--stream", "--frames", "7")
  assert code != 0 and "do not divide into chunks" in out.strip().splitlines()[-1]
  code, out = run_cli("sample", "--workdir", export, "--prompt", "a red circle", "--out",
                      str(tmp_path / "x.mp4"), "--chunk", "2")
  assert code != 0 and "--chunk and --window go with --stream" in out


@pytest.mark.xdist_group("reference")
def test_long_video_experiment_compares_both_ways_side_by_side(causal_export, reference_run,
                                                              tmp_path):
  """experiments/long_video.py at a tiny size: the causal export streams, the reference
  run (bidirectional, frame-conditioned) extends by windows; every second scored for both
  and the ground truth; memory against length measured."""
  out = str(tmp_path / "long.json")
  printed = run_experiment("experiments.long_video", "--causal", causal_export,
                           "--bidirectional", reference_run[1], "--seconds", "2", "--prompts",
                           "1", "--steps", "2", "--lengths", "1", "--out", out)
  assert "| autoregressive |" in printed and "| sliding windows |" in printed
  result = json.load(open(out))
  rows = {r["variant"]: r for r in result["rows"]}
  assert set(rows) == {"ground truth", "sliding windows", "autoregressive"}
  assert rows["ground truth"]["identity_held"] == 1.0
  for name in ("sliding windows", "autoregressive"):
    assert len(rows[name]["curves"]["count"]) == 2
    assert rows[name]["wall_s"] > 0 and rows[name]["first_frames_s"] > 0
  assert [(m["variant"], m["seconds"]) for m in result["memory"]] == [
      ("sliding windows", 2), ("autoregressive", 2), ("sliding windows", 1),
      ("autoregressive", 1)]
  assert os.path.exists(str(tmp_path / "long.png"))


@pytest.mark.parametrize("student", ["guidance_embedding", "step_embedding"])
def test_a_distilled_causal_student_streams_in_one_pass(data_dir, tokenizer, student):
  """A CFG-distilled student (the guidance scale an input) or a shortcut student (the step
  size an input) streams with one pass per evaluation: one cache row per video."""
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, **{"model.causal_frames": 1, f"model.{student}": True})
  if student == "step_embedding":
    config.sample.update(solver="euler", schedule="uniform", shift=1.0)
  graphdef, params = random_model(config, tokenizer.vocab_size, seed=7, scale=0.1)
  sampler = Sampler(config, tokenizer, graphdef, params)
  cfg = nnx.merge(graphdef, params).dit.cfg
  assert autoregressive.guidance_rows(4.0, cfg) == 1
  frames = list(autoregressive.stream(sampler, "a red circle moves left", 0, frames=4, steps=2))
  assert [f.shape for f in frames] == [(2, 16, 16, 3)] * 2
