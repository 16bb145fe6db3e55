"""Ring attention over the `sequence` mesh axis equals reference attention, with gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models.attention import dot_product_attention
from sora_jax.parallel.context import ring_attention
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
