"""Ring and Ulysses attention over the `sequence` mesh axis equal reference attention, with
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models.attention import block_causal_mask, dot_product_attention, splash_attention
from sora_jax.parallel.context import ring_attention, ulysses_attention, ulysses_degree
from sora_jax.parallel.sharding import make_mesh


def _inputs(seed=0, b=2, n=32, h=4, d=8):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(3))
  # Packed rows: segments of uneven lengths that cross chunk boundaries, then padding (0).
  seg = np.zeros((b, n), np.int32)
  seg[0, :11], seg[0, 11:27] = 1, 2
  seg[1, :5], seg[1, 5:9], seg[1, 9:30] = 1, 2, 3
  return q, k, v, jnp.asarray(seg)


def _reference(q, k, v, seg):
  mask = None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None]
  return dot_product_attention(q, k, v, mask=mask)


# (mesh, kv_block): chunks of 4, 8 and 16 tokens; blocks of 2, 3 and 4 keys within a
# chunk (3: chunks of 8 padded to 9 with keys no query attends to).
@pytest.mark.parametrize("mesh_shape,kv_block", [({"sequence": 8}, 512),
                                                 ({"sequence": 4, "data": 2}, 2),
                                                 ({"sequence": 4, "data": 2}, 3),
                                                 ({"sequence": 2, "tensor": 2, "fsdp": 2}, 4)])
@pytest.mark.parametrize("segments", [False, True])
def test_ring_attention_matches_reference(devices, mesh_shape, kv_block, segments):
  mesh = make_mesh(mesh_shape, devices=devices)
  q, k, v, seg = _inputs()
  seg = seg if segments else None

  def ring(q, k, v):
    return ring_attention(q, k, v, mesh=mesh, segment_ids=seg, kv_block=kv_block)

  out = jax.jit(ring)(q, k, v)
  np.testing.assert_allclose(out, _reference(q, k, v, seg), atol=2e-5, rtol=2e-5)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  ring_grads = jax.jit(jax.grad(lambda *a: loss(ring, *a), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.grad(lambda *a: loss(lambda q, k, v: _reference(q, k, v, seg), *a),
                       argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(ring_grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


def _reference_attend(q, k, v, seg, blocks):
  """Ulysses' `attend` on the XLA reference: seg / blocks are (queries', keys') pairs."""
  mask = None if seg is None else (seg[0][:, :, None] == seg[1][:, None, :])[:, None]
  if blocks is not None:
    mask = block_causal_mask(*blocks) if mask is None else mask & block_causal_mask(*blocks)
  return dot_product_attention(q, k, v, mask=mask)


# (mesh, heads, degree): heads 4 over sequence 8 (all-to-all in groups of 4, keys and
# values gathered across 2 groups; and, with degree 8, plain Ulysses on 4 zero-padded
# heads); over sequence 4 (one head each); over sequence 2 with the heads also split by
# tensor 2 (one local head: gathered only); heads 3 over sequence 2 (gathered only).
@pytest.mark.parametrize("mesh_shape,heads,degree", [({"sequence": 8}, 4, None),
                                                     ({"sequence": 8}, 4, 8),
                                                     ({"sequence": 4, "data": 2}, 4, None),
                                                     ({"sequence": 2, "tensor": 2, "fsdp": 2},
                                                      4, None),
                                                     ({"sequence": 2}, 3, None)])
@pytest.mark.parametrize("segments,causal", [(False, False), (True, False), (False, True)])
def test_ulysses_attention_matches_reference(devices, mesh_shape, heads, degree, segments,
                                             causal):
  mesh = make_mesh(mesh_shape, devices=devices[:int(np.prod(list(mesh_shape.values())))])
  q, k, v, seg = _inputs(h=heads)
  seg = seg if segments else None
  blocks = jnp.broadcast_to(jnp.arange(32) // 6, (2, 32)) if causal else None   # 6-token frames

  def ulysses(q, k, v):
    return ulysses_attention(q, k, v, mesh=mesh, attend=_reference_attend, segment_ids=seg,
                             causal_blocks=blocks, degree=degree)

  def reference(q, k, v):
    return _reference_attend(q, k, v, None if seg is None else (seg, seg),
                             None if blocks is None else (blocks, blocks))

  out = jax.jit(ulysses)(q, k, v)
  assert out.shape == q.shape
  np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5, rtol=2e-5)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  got = jax.jit(jax.grad(lambda *a: loss(ulysses, *a), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_ulysses_degree_is_the_largest_divisor_of_both():
  assert [ulysses_degree(h, 8) for h in (12, 16, 40, 5, 1)] == [4, 8, 8, 1, 1]
  assert ulysses_degree(12, 6) == 6 and ulysses_degree(40, 32) == 8


def test_ulysses_attention_runs_a_splash_kernel_per_device(devices):
  """Each device's attention as the splash kernel (Pallas' interpreter here), as it runs
  on TPU, with packed rows' segment ids: 2 heads over sequence 4, so each device attends
  the queries of half the sequence (its group's) to the whole of it."""
  mesh = make_mesh({"sequence": 4}, devices=devices[:4])
  q, k, v, seg = _inputs(h=2)

  def attend(q, k, v, seg, blocks):
    return splash_attention(q, k, v, segment_ids=seg, interpret=True)

  out = jax.jit(lambda q, k, v: ulysses_attention(q, k, v, mesh=mesh, attend=attend,
                                                  segment_ids=seg))(q, k, v)
  np.testing.assert_allclose(out, _reference(q, k, v, seg), atol=2e-5, rtol=2e-5)
