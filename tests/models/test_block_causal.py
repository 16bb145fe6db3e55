"""Block-causal attention (autoregressive video): every backend against a float64 reference,
causality of the transformer, and a KV-cached chunked pass equal to the whole causal pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_params, stack_blocks
from sora_jax.models import embeddings
from sora_jax.models.attention import (block_causal_mask, cudnn_attention, dot_product_attention,
                                       segment_mask, splash_attention)
from sora_jax.models.dit import DiffusionTransformer, DiTConfig
from sora_jax.models.layers import KVCache
from sora_jax.parallel.context import cached_attention, ring_attention
from sora_jax.configs.schema import DIT_RULES
from sora_jax.parallel.sharding import activation_sharding, make_mesh


def _numpy_attention(q, k, v, allowed):
  """float64 softmax attention `[B, Q, H, D]`; allowed `[B, Q, K]` bool."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(allowed[:, None], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _inputs(n, seed=0, b=2, h=2, d=16):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(3))


def _allowed(blocks, segments=None):
  blocks = np.asarray(blocks)
  allowed = blocks[:, None, :] <= blocks[:, :, None]
  if segments is not None:
    segments = np.asarray(segments)
    allowed &= segments[:, :, None] == segments[:, None, :]
  return allowed


def _loss(fn, q, k, v):
  return jnp.sum(jnp.sin(fn(q, k, v)))


def test_block_causal_mask_is_the_block_rule():
  blocks = jnp.asarray([[0, 0, 1, 1, 2]])
  mask = np.asarray(block_causal_mask(blocks))[0, 0]
  np.testing.assert_array_equal(mask, _allowed(blocks)[0])
  assert mask[1, 0] and mask[1, 1] and not mask[1, 2] and mask[4].all()


# 200 tokens in blocks of 50 (frames): splash pads them to 256 and its 128-token kernel
# blocks cut across causal blocks.
@pytest.mark.parametrize("backend", ["xla", "dot_product", "splash"])
def test_block_causal_backends_match_float64(backend):
  n, block = 200, 50
  q, k, v = _inputs(n)
  blocks = jnp.broadcast_to(jnp.arange(n) // block, (2, n))
  mask = block_causal_mask(blocks)
  fns = {"xla": lambda q, k, v: dot_product_attention(q, k, v, mask=mask),
         "dot_product": lambda q, k, v: cudnn_attention(q, k, v, mask=mask),
         "splash": lambda q, k, v: splash_attention(q, k, v, causal_block=block, block=128)}
  fn = fns[backend]
  np.testing.assert_allclose(fn(q, k, v), _numpy_attention(q, k, v, _allowed(blocks)),
                             atol=2e-5)
  if backend != "xla":      # gradients against the reference's (tested against float64)
    for got, want in zip(jax.grad(lambda *a: _loss(fn, *a), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(lambda *a: _loss(fns["xla"], *a), argnums=(0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(got, want, atol=5e-5)


def test_splash_block_causal_with_segments_matches_float64():
  n = 200
  q, k, v = _inputs(n, seed=3)
  seg = np.ones((2, n), np.int32)
  seg[0, 120:] = 2
  seg = jnp.asarray(seg)
  blocks = jnp.broadcast_to(jnp.arange(n) // 30, (2, n))
  out = splash_attention(q, k, v, segment_ids=seg, causal_block=30, block=128)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, _allowed(blocks, seg)), atol=2e-5)


# A sequence-sharded mesh: causal blocks of 6 tokens cross the ring's chunks of 4 and 8;
# with packed segments too, and kv blocks of 3 (chunks padded inside).
@pytest.mark.parametrize("mesh_shape,kv_block", [({"sequence": 8}, 512),
                                                 ({"sequence": 4, "data": 2}, 3)])
@pytest.mark.parametrize("segments", [False, True])
def test_ring_attention_block_causal_matches_float64(devices, mesh_shape, kv_block, segments):
  mesh = make_mesh(mesh_shape, devices=devices)
  n = 32
  q, k, v = _inputs(n, seed=1, h=4, d=8)
  blocks = jnp.broadcast_to(jnp.arange(n) // 6, (2, n))
  seg = None
  if segments:
    seg = np.ones((2, n), np.int32)
    seg[1, 13:] = 2
    seg = jnp.asarray(seg)

  def ring(q, k, v):
    return ring_attention(q, k, v, mesh=mesh, segment_ids=seg, causal_blocks=blocks,
                          kv_block=kv_block)

  np.testing.assert_allclose(jax.jit(ring)(q, k, v),
                             _numpy_attention(q, k, v, _allowed(blocks, seg)), atol=2e-5)
  mask = block_causal_mask(blocks) if seg is None else block_causal_mask(blocks) & segment_mask(seg)
  reference = lambda q, k, v: dot_product_attention(q, k, v, mask=mask)  # noqa: E731
  for got, want in zip(jax.jit(jax.grad(lambda *a: _loss(ring, *a), argnums=(0, 1, 2)))(q, k, v),
                       jax.grad(lambda *a: _loss(reference, *a), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


# A chunk of 8 tokens (causal blocks of 3) after a cache of 16 slots, 9 of them empty:
# the cache's tokens and the chunk's split over 4 and 2 devices, with batch and heads
# split too; keys whole on each device or 4 at a time. Over 4 devices the last holds, for
# the first row, only empty slots and chunk keys of the last block: no key that the
# chunk's first two blocks may attend to.
@pytest.mark.parametrize("mesh_shape,kv_block", [({"sequence": 4, "data": 2}, 512),
                                                 ({"sequence": 4, "data": 2}, 4),
                                                 ({"sequence": 2, "tensor": 2, "fsdp": 2}, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_cached_attention_on_a_sequence_mesh_matches_float64(devices, mesh_shape, kv_block,
                                                            causal):
  mesh = make_mesh(mesh_shape, devices=devices)
  q, k, v = _inputs(8, seed=4, h=4, d=8)
  past_k, past_v, _ = _inputs(16, seed=5, h=4, d=8)
  valid = np.ones((2, 16), bool)
  valid[0, [1, 6, 7, 12, 13, 14, 15]] = False
  valid[1, [0, 15]] = False
  blocks = jnp.broadcast_to(jnp.arange(8) // 3, (2, 8)) if causal else None
  out = jax.jit(lambda *a: cached_attention(*a, mesh=mesh, causal_blocks=blocks,
                                            kv_block=kv_block))(
      q, k, v, past_k, past_v, jnp.asarray(valid))
  own = _allowed(blocks) if causal else np.ones((2, 8, 8), bool)
  allowed = np.concatenate([np.broadcast_to(valid[:, None], (2, 8, 16)), own], axis=-1)
  reference = _numpy_attention(q, jnp.concatenate([past_k, k], 1),
                               jnp.concatenate([past_v, v], 1), allowed)
  np.testing.assert_allclose(out, reference, atol=2e-5)
  assert out.sharding.spec[1] == "sequence"
  with pytest.raises(ValueError, match="must each divide"):
    cached_attention(q[:, :6], k[:, :6], v[:, :6], past_k[:, :13], past_v[:, :13],
                     jnp.asarray(valid[:, :13]), mesh=mesh)


# The transformer ----------------------------------------------------------------------

def _causal_dit(scan_layers=False, causal_frames=1):
  cfg = DiTConfig(width=32, depth=2, heads=2, patch=(1, 2, 2), in_channels=3, text_width=16,
                  causal_frames=causal_frames, scan_layers=scan_layers)
  with nnx.use_eager_sharding(False):
    model = DiffusionTransformer(cfg, rngs=nnx.Rngs(0))
  params = random_params(nnx.state(model, nnx.Param), seed=2)
  nnx.update(model, params)
  return model


@functools.partial(nnx.jit, static_argnames=("return_kv",))
def _run(model, x, t, text, mask, positions=None, kv_cache=None, return_kv=False):
  """The transformer, compiled (one program per shape, not an eager compile per op)."""
  return model(x, t, text, mask, positions=positions, kv_cache=kv_cache, return_kv=return_kv)


def _video_inputs(frames=6):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, frames, 4, 6, 3)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  tokens = frames * 2 * 3
  # Per-token times: each frame its own noise level (diffusion forcing).
  frame_times = jnp.asarray(rng.uniform(size=(2, frames)), jnp.float32)
  return x, jnp.repeat(frame_times, tokens // frames, axis=1), text, mask


@pytest.mark.parametrize("causal_frames", [1, 2])
def test_causal_transformer_output_ignores_the_future(causal_frames):
  model = _causal_dit(causal_frames=causal_frames)
  x, t, text, mask = _video_inputs()
  out = _run(model, x, t, text, mask)
  changed = _run(model, x.at[:, 4:].add(1.0), t, text, mask)
  np.testing.assert_allclose(changed[:, :4], out[:, :4], atol=1e-5)
  assert np.abs(np.asarray(changed[:, 4:] - out[:, 4:])).max() > 1e-3
  # Frames 2 and 3 form one block when causal_frames = 2: frame 2 sees frame 3.
  moved = _run(model, x.at[:, 3].add(1.0), t, text, mask)
  assert (np.abs(np.asarray(moved[:, 2] - out[:, 2])).max() > 1e-3) == (causal_frames == 2)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cached_chunks_equal_the_whole_causal_pass(scan_layers):
  """Chunks of 2 frames, each after the cache of all earlier ones (RoPE positions carried
  from the whole video's grid), give the whole pass's velocity; with per-frame times."""
  model = _causal_dit(scan_layers=scan_layers)
  x, t, text, mask = _video_inputs()
  whole = _run(model, x, t, text, mask)
  per_frame = 6
  positions = embeddings.grid_positions((6, 2, 3))
  depth, heads, head_dim = 2, 2, 16
  cache = KVCache(jnp.zeros((depth, 2, 0, heads, head_dim)),
                  jnp.zeros((depth, 2, 0, heads, head_dim)), jnp.zeros((2, 0), bool))
  for start in (0, 2, 4):
    tokens = slice(start * per_frame, (start + 2) * per_frame)
    chunk_positions = jnp.broadcast_to(positions[tokens], (2, 2 * per_frame, 3))
    out, (keys, values) = _run(model, x[:, start:start + 2], t[:, tokens], text, mask,
                                positions=chunk_positions, kv_cache=cache, return_kv=True)
    np.testing.assert_allclose(out, whole[:, start:start + 2], atol=2e-5)
    assert keys.shape == (depth, 2, 2 * per_frame, heads, head_dim)
    cache = KVCache(jnp.concatenate([cache.keys, keys], 2),
                    jnp.concatenate([cache.values, values], 2),
                    jnp.concatenate([cache.valid, jnp.ones((2, 2 * per_frame), bool)], 1))


def test_rope_positions_matter_across_chunks():
  """The chunk's positions are part of its result: the last chunk at the first chunk's
  positions gives another velocity than at its own (RoPE is carried, not restarted)."""
  model = _causal_dit()
  x, t, text, mask = _video_inputs(frames=4)
  positions = jnp.broadcast_to(embeddings.grid_positions((4, 2, 3)), (2, 24, 3))
  _, (keys, values) = _run(model, x[:, :2], t[:, :12], text, mask,
                           positions=positions[:, :12],
                           kv_cache=KVCache(jnp.zeros((2, 2, 0, 2, 16)),
                                            jnp.zeros((2, 2, 0, 2, 16)),
                                            jnp.zeros((2, 0), bool)), return_kv=True)
  cache = KVCache(keys, values, jnp.ones((2, 12), bool))
  carried = _run(model, x[:, 2:], t[:, 12:], text, mask, positions=positions[:, 12:],
                 kv_cache=cache)
  restarted = _run(model, x[:, 2:], t[:, 12:], text, mask, positions=positions[:, :12],
                   kv_cache=cache)
  np.testing.assert_allclose(carried, _run(model, x, t, text, mask)[:, 2:], atol=2e-5)
  assert np.abs(np.asarray(carried - restarted)).max() > 1e-3


def test_empty_cache_slots_are_ignored_and_a_bidirectional_model_refuses_a_cache():
  model = _causal_dit()
  x, t, text, mask = _video_inputs(frames=2)
  junk = jnp.full((2, 2, 7, 2, 16), 3.0)
  empty = KVCache(junk, junk, jnp.zeros((2, 7), bool))
  np.testing.assert_allclose(_run(model, x, t, text, mask, kv_cache=empty),
                             _run(model, x, t, text, mask),
                             atol=2e-5)
  bidirectional = _causal_dit(causal_frames=0)
  with pytest.raises(ValueError, match="block-causal"):
    bidirectional(x, t, text, mask, kv_cache=empty)


def test_scan_layout_cache_matches_the_loop():
  loop = _causal_dit()
  scan = _causal_dit(scan_layers=True)
  nnx.update(scan, stack_blocks(nnx.to_pure_dict(nnx.state(loop, nnx.Param))))
  x, t, text, mask = _video_inputs(frames=2)
  a, kv_a = _run(loop, x, t, text, mask, return_kv=True)
  b, kv_b = _run(scan, x, t, text, mask, return_kv=True)
  np.testing.assert_allclose(a, b, atol=2e-5)
  for p, q in zip(kv_a, kv_b):
    np.testing.assert_allclose(p, q, atol=2e-5)


# (mesh, backend): splash per device (batch over data), and ring and Ulysses attention over
# a sequence axis of 2 (each device a chunk of 36 tokens: causal blocks of 6 cross devices).
@pytest.mark.parametrize("mesh_shape,backend", [({"data": 2}, "splash"),
                                                ({"sequence": 2}, "ring"),
                                                ({"sequence": 2}, "ulysses")])
def test_causal_transformer_on_a_mesh_matches_the_reference(devices, mesh_shape, backend):
  """The block-causal transformer under a sharding context runs its self-attention on
  `backend` (splash with the static block-causal mask of rows of one video; ring with the
  causal block indices travelling with the keys) and gives the XLA reference's output."""
  model = _causal_dit()
  x, t, text, mask = _video_inputs()
  reference = _run(model, x, t, text, mask)
  mesh = make_mesh(mesh_shape, devices=devices[:2])
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x, t):
    return nnx.merge(graphdef, state)(x, t, text, mask)

  with activation_sharding(mesh, DIT_RULES, backend):
    out = forward(state, x, t)
  np.testing.assert_allclose(out, reference, atol=2e-5)


@pytest.mark.parametrize("backend", ["ring", "ulysses"])
def test_kv_cached_chunks_on_a_sequence_mesh_equal_the_whole_causal_pass(devices, backend):
  """As `test_kv_cached_chunks_equal_the_whole_causal_pass`, on a mesh that splits the
  tokens over 2 devices and heads over 2: the chunks attend to the cache where its tokens
  lie (`context.cached_attention`), and the keys they return stay split too."""
  model = _causal_dit()
  x, t, text, mask = _video_inputs()
  whole = _run(model, x, t, text, mask)
  mesh = make_mesh({"sequence": 2, "tensor": 2}, devices=devices[:4])
  graphdef, state = nnx.split(model)

  @jax.jit
  def chunk(state, x, t, positions, cache):
    return nnx.merge(graphdef, state)(x, t, text, mask, positions=positions, kv_cache=cache,
                                      return_kv=True)

  per_frame = 6
  positions = embeddings.grid_positions((6, 2, 3))
  cache = KVCache(jnp.zeros((2, 2, 0, 2, 16)), jnp.zeros((2, 2, 0, 2, 16)),
                  jnp.zeros((2, 0), bool))
  with activation_sharding(mesh, DIT_RULES, backend):
    for start in (0, 2, 4):
      tokens = slice(start * per_frame, (start + 2) * per_frame)
      out, (keys, values) = chunk(state, x[:, start:start + 2], t[:, tokens],
                                  jnp.broadcast_to(positions[tokens], (2, 2 * per_frame, 3)),
                                  cache)
      np.testing.assert_allclose(out, whole[:, start:start + 2], atol=2e-5)
      cache = KVCache(jnp.concatenate([cache.keys, keys], 2),
                      jnp.concatenate([cache.values, values], 2),
                      jnp.concatenate([cache.valid, jnp.ones((2, 2 * per_frame), bool)], 1))
