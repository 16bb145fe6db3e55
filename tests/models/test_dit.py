import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_params, stack_blocks
from sora_jax.models import attention, embeddings
from sora_jax.models.attention import dot_product_attention
from sora_jax.models.dit import DiffusionTransformer, DiTConfig, pooled_text
from sora_jax.models.text import TextEncoder, TextEncoderConfig, relative_position_bucket


def make_dit(**overrides) -> DiffusionTransformer:
  cfg = DiTConfig(**{"width": 32, "depth": 2, "heads": 2, "patch": (1, 2, 2), "in_channels": 3,
                     "text_width": 16, **overrides})
  with nnx.use_eager_sharding(False):
    return DiffusionTransformer(cfg, rngs=nnx.Rngs(0))


def _randomise(module: nnx.Module, seed: int = 1) -> None:
  nnx.update(module, random_params(nnx.state(module, nnx.Param), seed))


def _inputs(b=2, t=3, h=4, w=6):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, t, h, w, 3)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(b, 5, 16)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:b]
  return x, jnp.asarray([0.3, 0.9])[:b], text, mask


@pytest.mark.parametrize("modulation", ["per_block", "shared"])
@pytest.mark.parametrize("qk_norm", ["rms", "rms_across_heads", "none"])
@pytest.mark.parametrize("text_projection", ["mlp", "linear"])
def test_dit_output_shape_and_dtype(modulation, qk_norm, text_projection):
  model = make_dit(modulation=modulation, qk_norm=qk_norm, text_projection=text_projection)
  x, t, text, mask = _inputs()
  out = model(x, t, text, mask)
  chex.assert_shape(out, x.shape)
  chex.assert_type(out, jnp.float32)
  # adaLN-Zero: a fresh model predicts zero velocity.
  np.testing.assert_array_equal(out, 0.0)


def test_dit_bfloat16_compute():
  model = make_dit()
  _randomise(model)
  x, t, text, mask = _inputs()
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
  out = model(x.astype(jnp.bfloat16), t, text.astype(jnp.bfloat16), mask)
  chex.assert_type(out, jnp.bfloat16)
  chex.assert_tree_all_finite(out)


def test_dit_ignores_padded_text_tokens_and_depends_on_time_and_text():
  model = make_dit()
  _randomise(model)
  x, t, text, mask = _inputs()
  out = model(x, t, text, mask)
  padded = text.at[0, 3:].set(100.0)  # example 0 has 3 real tokens
  np.testing.assert_allclose(model(x, t, padded, mask), out, atol=1e-5)
  assert not np.allclose(model(x, t + 0.1, text, mask), out, atol=1e-4)
  assert not np.allclose(model(x, t, text.at[0, 0].add(1.0), mask)[0], out[0], atol=1e-4)


def test_dit_examples_are_independent():
  model = make_dit()
  _randomise(model)
  x, t, text, mask = _inputs()
  out = model(x, t, text, mask)
  alone = model(x[1:], t[1:], text[1:], mask[1:])
  np.testing.assert_allclose(alone, out[1:], atol=1e-5)


def test_pooled_text_starts_as_the_model_without_it_then_reads_the_caption_mean():
  plain, pooled = make_dit(), make_dit(pooled_text=True)
  _randomise(plain)
  params = nnx.to_pure_dict(nnx.state(pooled, nnx.Param))
  params.update(nnx.to_pure_dict(nnx.state(plain, nnx.Param)))   # all but the pooled MLP
  nnx.update(pooled, params)
  x, t, text, mask = _inputs()
  np.testing.assert_allclose(pooled(x, t, text, mask), plain(x, t, text, mask), atol=1e-6)
  nnx.update(pooled.pooled_text_mlp, random_params(nnx.state(pooled.pooled_text_mlp), seed=4))
  out = pooled(x, t, text, mask)
  assert not np.allclose(out, plain(x, t, text, mask), atol=1e-4)
  # Only the real tokens' mean reaches the pooled input: padding is ignored.
  np.testing.assert_allclose(pooled(x, t, text.at[0, 3:].set(100.0), mask), out, atol=1e-5)


def test_pooled_text_is_each_segments_mean_of_real_tokens():
  rng = np.random.default_rng(0)
  text = rng.normal(size=(2, 6, 4))
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 1]], bool)
  segments = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 3, 3, 3]])
  got = np.asarray(pooled_text(jnp.asarray(text), jnp.asarray(mask), jnp.asarray(segments), 3))
  chex.assert_shape(got, (2, 3, 4))
  for b in range(2):
    for k in range(3):
      rows = text[b][(segments[b] == k + 1) & mask[b]]
      want = rows.mean(axis=0) if len(rows) else np.zeros(4)   # an empty caption: zeros
      np.testing.assert_allclose(got[b, k], want, atol=1e-6)
  whole = np.asarray(pooled_text(jnp.asarray(text), jnp.asarray(mask), None, 1))
  np.testing.assert_allclose(whole[:, 0], [text[b][mask[b]].mean(axis=0) for b in range(2)],
                             atol=1e-6)


def test_attention_matches_float64_reference():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, s, 3, 8)) for s in (5, 7, 7))
  mask = rng.random((2, 1, 5, 7)) > 0.3
  mask[..., 0] = True
  bias = rng.normal(size=(1, 3, 5, 7))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8) + bias
  logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
  out = dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
                              mask=jnp.asarray(mask), bias=jnp.asarray(bias, jnp.float32))
  np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("queries,keys,mask_shape,bias_shape", [
    (300, 200, (2, 1, 300, 200), (1, 3, 300, 200)),   # 3 blocks (padded), per-query mask/bias
    (300, 7, (2, 1, 1, 7), (1, 3, 1, 7)),             # cross-attention: key mask, shared bias
    (260, 260, None, None),
])
def test_blocked_attention_gradients_match_float64(queries, keys, mask_shape, bias_shape,
                                                   monkeypatch):
  """The query-blocked attention's custom VJP (recomputed weights from the log-sum-exp)
  gives the gradients of softmax attention w.r.t. q, k, v and the bias."""
  monkeypatch.setattr(attention, "WHOLE_LOGITS_BYTES", 0)    # blocks even at these sizes
  rng = np.random.default_rng(1)
  q = rng.normal(size=(2, queries, 3, 8))
  k, v = rng.normal(size=(2, 2, keys, 3, 8))
  mask = None if mask_shape is None else rng.random(mask_shape) > 0.3
  if mask is not None:
    mask[..., 0] = True
  bias = None if bias_shape is None else rng.normal(size=bias_shape)

  def reference(q, k, v, bias):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    logits = logits if bias is None else logits + bias
    logits = logits if mask is None else jnp.where(mask, logits, -1e300)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)

  def loss(fn, q, k, v, bias):
    return jnp.sum(jnp.sin(fn(q, k, v, bias)))

  blocked = lambda q, k, v, bias: dot_product_attention(  # noqa: E731
      q, k, v, mask=None if mask is None else jnp.asarray(mask), bias=bias, query_block=128)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  ours = jax.grad(functools.partial(loss, blocked), argnums)(
      *(None if a is None else jnp.asarray(a, jnp.float32) for a in (q, k, v, bias)))
  with jax.enable_x64():
    expected = jax.grad(functools.partial(loss, reference), argnums)(
        *(None if a is None else jnp.asarray(a, jnp.float64) for a in (q, k, v, bias)))
    out = reference(*(jnp.asarray(a) if a is not None else None for a in (q, k, v, bias)))
  np.testing.assert_allclose(blocked(*(None if a is None else jnp.asarray(a, jnp.float32)
                                       for a in (q, k, v, bias))), out, atol=2e-6)
  for got, want in zip(ours, expected):
    chex.assert_equal_shape([got, want])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def _t5_bucket(relative: int, num_buckets: int, max_distance: int) -> int:
  """T5's bucketing written out for one scalar (n = -relative, bidirectional)."""
  n = -relative
  half = num_buckets // 2
  offset = half if n < 0 else 0
  n = abs(n)
  max_exact = half // 2
  if n < max_exact:
    return offset + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (half - max_exact))
  return offset + min(large, half - 1)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 64), (16, 20)])
def test_relative_position_bucket_matches_t5_definition(num_buckets, max_distance):
  rel = np.arange(-300, 301)
  expected = [_t5_bucket(int(r), num_buckets, max_distance) for r in rel]
  np.testing.assert_array_equal(relative_position_bucket(rel, num_buckets, max_distance), expected)


def test_text_encoder_shape_and_padding_mask():
  cfg = TextEncoderConfig(vocab_size=20, width=16, depth=2, heads=2, mlp_width=32)
  with nnx.use_eager_sharding(False):
    encoder = TextEncoder(cfg, rngs=nnx.Rngs(0))
  ids = jnp.asarray([[5, 6, 7, 1, 0, 0], [3, 4, 1, 0, 0, 0]], jnp.int32)
  mask = ids != 0
  out = encoder(ids, mask)
  chex.assert_shape(out, (2, 6, 16))
  changed = encoder(ids.at[0, 4:].set(9), mask)  # change padding only
  np.testing.assert_allclose(changed[0, :4], out[0, :4], atol=1e-5)


# "full" is jax's own everything-recomputed policy, not tested here for the suite's time.
@pytest.mark.parametrize("remat", ["none", "dots", "dots_offload"])
def test_scanned_and_rematerialised_blocks_match_the_loop(remat):
  loop = make_dit(depth=3)
  _randomise(loop)
  scanned = make_dit(depth=3, scan_layers=True, remat=remat)
  params = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
  nnx.update(scanned, stack_blocks(params))
  kernel = nnx.state(scanned, nnx.Param)["blocks"]["mlp"]["fc1"]["kernel"]
  assert kernel.shape == (3, 32, 128)
  assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  x, t, text, mask = _inputs()
  forward = nnx.jit(lambda module: module(x, t, text, mask))
  np.testing.assert_allclose(forward(scanned), forward(loop), atol=2e-5)

  def loss(module):
    return jnp.sum(jnp.sin(module(x, t, text, mask)))

  grads_loop = stack_blocks(nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(loop)))
  grads_scan = nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(scanned))
  # Two programs sum the same float32 terms in different orders (XLA fuses a scan body
  # and an unrolled loop differently): 1e-4 absolute on gradients of order 0.1.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
               grads_scan, grads_loop)


def test_token_chunks_give_the_same_values_and_gradients():
  """`model.token_chunks` splits the tokens of the MLP and of self-attention's queries and
  keys (36 here; 5 chunks: uneven) and changes nothing but the order of the work; checked
  inside the scanned, rematerialised blocks it serves."""
  whole = make_dit(depth=2, scan_layers=True, remat="dots")
  _randomise(whole)
  chunked = make_dit(depth=2, scan_layers=True, remat="dots", token_chunks=5)
  nnx.update(chunked, nnx.state(whole, nnx.Param))
  x, t, text, mask = _inputs()

  def loss(module):
    return jnp.sum(jnp.sin(module(x, t, text, mask)))

  forward = nnx.jit(lambda module: module(x, t, text, mask))
  np.testing.assert_allclose(forward(chunked), forward(whole), atol=1e-6)
  grads_whole = nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(whole))
  grads_chunked = nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(chunked))
  # Weight gradients are sums over tokens, here in five parts: float32 rounding (of
  # gradients up to about 20).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5),
               grads_chunked, grads_whole)
  for layer in ("mlp", "self_attn"):
    kernel = grads_whole["blocks"][layer]["fc1" if layer == "mlp" else "q"]["kernel"]
    assert np.abs(kernel).max() > 1e-3


@pytest.mark.parametrize("cond_channels", [0, 4])
def test_data_prediction_is_turned_into_a_velocity(cond_channels):
  # A data-predicting model runs the same network and returns (x_t - x0) / max(t, 0.05):
  # checked in float64 numpy against the velocity model with the same weights, whole
  # videos and per-token times (t below the clip), with and without a conditioning input.
  from sora_jax.diffusion.flow import MIN_DATA_TIME
  velocity_model = make_dit(cond_channels=cond_channels)
  data_model = make_dit(cond_channels=cond_channels, prediction="data")
  params = random_params(nnx.state(velocity_model, nnx.Param), 3)
  nnx.update(velocity_model, params)
  nnx.update(data_model, params)
  x, t, text, mask = _inputs()
  cond = (jnp.asarray(np.random.default_rng(1).normal(size=x.shape[:4] + (4,)), jnp.float32)
          if cond_channels else None)
  n = 3 * 2 * 3                                               # tokens of [3, 4, 6] at 1x2x2
  per_token = jnp.tile(jnp.linspace(0.0, 0.9, n)[None], (2, 1))
  def pixels(v):   # [2, 18] per token -> [2, 3, 4, 6, 1] per pixel
    return np.repeat(np.repeat(v.reshape(2, 3, 2, 3), 2, 2), 2, 3)[..., None]

  for times, expand in ((t, lambda v: v[:, None, None, None, None]), (per_token, pixels)):
    data = np.asarray(velocity_model(x, times, text, mask, conditioning=cond), np.float64)
    velocity = np.asarray(data_model(x, times, text, mask, conditioning=cond), np.float64)
    clipped = np.maximum(np.asarray(times, np.float64), MIN_DATA_TIME)
    expected = (np.asarray(x, np.float64) - data) / expand(clipped)
    np.testing.assert_allclose(velocity, expected, rtol=1e-5, atol=1e-5)


def test_mlp_head_is_two_layers_whose_patches_span_more_than_the_width():
  """`output_head="mlp"`: each token's patch is `gelu_tanh(h W1 + b1) W2 + b2` of its final
  state (float64 reference), zero at initialisation like the linear head; its patches span
  more dimensions than the width, where a linear head's lie in a `width`-dimensional
  affine subspace."""
  from helpers import compiled  # pylint: disable=g-import-not-at-top

  def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  model = make_dit(width=16, heads=2, patch=(1, 4, 4), output_head="mlp", head_hidden=64)
  forward = compiled()
  xs = jnp.asarray(np.random.default_rng(2).normal(size=(8, 3, 8, 12, 3)), jnp.float32)
  t, text, mask = jnp.full((8,), 0.5), jnp.zeros((8, 5, 16)), jnp.ones((8, 5), bool)
  np.testing.assert_array_equal(forward(model, xs, t, text, mask), 0.0)
  _randomise(model)
  drawn = np.asarray(forward(model, xs, t, text, mask)).reshape(-1, 48)   # a row per token
  assert np.linalg.matrix_rank(drawn - drawn.mean(0), tol=1e-4) > 16
  head = model.mlp_out
  h = np.random.default_rng(3).normal(size=(2, 5, 16))
  w1, b1, w2, b2 = (np.asarray(p, np.float64) for p in (
      head.fc1.kernel, head.fc1.bias, head.fc2.kernel, head.fc2.bias))
  np.testing.assert_allclose(compiled()(head, jnp.asarray(h, jnp.float32)),
                             gelu_tanh(h @ w1 + b1) @ w2 + b2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_overlapping_head_cross_fades_its_tokens_patches(prediction):
  """`head_overlap`: the head draws each token's patch grown by the overlap, and the model
  outputs their cross-fade (`embeddings.unpatchify_overlapping`, then the data prediction
  turned into a velocity); zero at initialisation like the other heads; packed rows
  (no grid) are refused."""
  model = make_dit(width=16, heads=2, patch=(1, 4, 4), head_overlap=1, prediction=prediction)
  x, t, text, mask = _inputs(t=2, h=8, w=12)
  times = np.asarray(t, np.float64)[:, None, None, None, None]
  np.testing.assert_allclose(model(x, t, text, mask),       # a zero patch: x_0 = 0 for data
                             0.0 if prediction == "velocity" else np.asarray(x) / times,
                             rtol=1e-5, atol=1e-6)
  _randomise(model)
  drawn = []
  head = model.proj_out
  model.proj_out = lambda h: drawn.append(head(h)) or drawn[-1]
  out = np.asarray(model(x, t, text, mask), np.float64)
  chex.assert_shape(drawn[0], (2, 2 * 2 * 3, 6 * 6 * 3))
  blended = np.asarray(embeddings.unpatchify_overlapping(drawn[0], (2, 2, 3), (1, 4, 4), 3, 1),
                       np.float64)
  if prediction == "data":
    blended = (np.asarray(x, np.float64) - blended) / times
  np.testing.assert_allclose(out, blended, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="head_overlap"):
    make_dit(patch=(1, 2, 2), head_overlap=2)
  with pytest.raises(ValueError, match="blends whole raster videos"):
    model.forward_tokens(embeddings.patchify(x, (1, 4, 4)),
                         jnp.broadcast_to(embeddings.grid_positions((2, 2, 3)), (2, 12, 3)),
                         t[:, None], text, mask)
