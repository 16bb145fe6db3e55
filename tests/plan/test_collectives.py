"""Collectives read from a compiled program's HLO, loops counted per iteration."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sora_jax.parallel.sharding import make_mesh
from sora_jax.plan.collectives import collectives, host_loop_bytes


def test_a_scanned_all_gather_counts_once_per_layer(devices):
  """A 4-layer scan whose weights are sharded over fsdp: XLA gathers each layer's weight
  inside the loop body, so the count is 4 per call and the bytes 4 x the gathered size."""
  mesh = make_mesh({"fsdp": 8}, devices=devices)
  layers, width = 4, 64
  w_sharding = NamedSharding(mesh, P(None, "fsdp", None))
  x_sharding = NamedSharding(mesh, P())

  def forward(w, x):
    def layer(x, w):
      w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
      return jnp.tanh(x @ w), None
    return jax.lax.scan(layer, x, w)[0]

  compiled = jax.jit(forward, in_shardings=(w_sharding, x_sharding),
                     out_shardings=x_sharding).lower(
      jax.ShapeDtypeStruct((layers, width, width), jnp.float32, sharding=w_sharding),
      jax.ShapeDtypeStruct((2, width), jnp.float32, sharding=x_sharding)).compile()
  found = collectives(compiled.as_text())
  gathers = found["kinds"]["all-gather"]
  assert not found["unknown_trip_counts"]
  assert gathers["count"] == layers, found
  assert gathers["bytes"] == layers * width * width * 4
  assert found["total_bytes"] >= gathers["bytes"]


def test_parsing_of_a_hand_written_module():
  """Trip counts multiply through nested loops; reduce-scatter counts its input."""
  hlo = """HloModule m

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(s32[] %i, f32[8]{0} %ar)
}

%outer_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %w = (s32[], f32[8]) while((s32[], f32[8]) %p), condition=%cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %rs = f32[2]{0} reduce-scatter(f32[16]{0} %y), replica_groups=[2,8]<=[16], dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(s32[] %i, f32[8]{0} %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%cond, body=%outer_body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %cp = f32[8]{0} collective-permute(f32[8]{0} %a), source_target_pairs={{0,1}}
}
"""
  found = collectives(hlo)["kinds"]
  assert found["all-reduce"] == {"count": 15, "bytes": 15 * 32}
  assert found["reduce-scatter"] == {"count": 5, "bytes": 5 * 2 * 4 * 8}
  assert found["collective-permute"] == {"count": 1, "bytes": 32}
  np.testing.assert_equal(found["all-gather"], {"count": 0, "bytes": 0})


def test_host_memory_a_layer_loop_carries():
  """Arrays in memory space S(5) (host) that a while loop carries are summed; device
  arrays and host arrays outside loops are not."""
  hlo = """HloModule m

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %h = bf16[4,16]{1,0:T(8,128)S(5)} copy(bf16[4,16]{1,0} %b)
  %w = (s32[], bf16[30,2,16]{2,1,0:T(8,128)(2,1)S(5)}, bf16[30,4]{1,0:T(4,128)S(5)}, f32[30,64]{1,0}) while((s32[], f32[8]) %t), condition=%cond, body=%body
  ROOT %r = f32[8]{0} copy(f32[8]{0} %a)
}
"""
  assert host_loop_bytes(hlo) == 30 * 2 * 16 * 2 + 30 * 4 * 2
