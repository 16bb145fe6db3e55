"""`models.abstract.abstract_module`: traced once per key, every caller its own copy."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.abstract import abstract_module


class _Pair(nnx.Module):

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.a = nnx.Linear(3, width, rngs=rngs)
    self.count = nnx.BatchStat(jnp.zeros(()))


def test_a_key_traces_once_and_callers_get_their_own_copies():
  built = []

  def build(width):
    built.append(width)
    return _Pair(width, nnx.Rngs(0))

  graphdef, params, rest = abstract_module(("pair", 4), lambda: build(4), nnx.Param, ...)
  assert built == [4]
  assert isinstance(params["a"]["kernel"].get_value(), jax.ShapeDtypeStruct)
  assert params["a"]["kernel"].get_value().shape == (3, 4)
  # Filling the first caller's copy leaves what the next caller gets abstract.
  nnx.replace_by_pure_dict(params, {"a": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}})
  module = nnx.merge(graphdef, params, rest)
  np.testing.assert_allclose(module.a(jnp.ones((1, 3))), [[3.0] * 4])
  _, again, _ = abstract_module(("pair", 4), lambda: build(4), nnx.Param, ...)
  assert built == [4]
  assert isinstance(again["a"]["kernel"].get_value(), jax.ShapeDtypeStruct)
  # Another key (another architecture) is traced; no key is traced every time.
  _, wide, _ = abstract_module(("pair", 8), lambda: build(8), nnx.Param, ...)
  assert wide["a"]["kernel"].get_value().shape == (3, 8) and built == [4, 8]
  abstract_module(None, lambda: build(4), nnx.Param, ...)
  abstract_module(None, lambda: build(4), nnx.Param, ...)
  assert built == [4, 8, 4, 4]


def test_one_key_split_by_other_filters_is_another_entry():
  graphdef, state = abstract_module(("pair", 5), lambda: _Pair(5, nnx.Rngs(0)))
  _, params, rest = abstract_module(("pair", 5), lambda: _Pair(5, nnx.Rngs(0)), nnx.Param, ...)
  assert set(nnx.to_pure_dict(state)) == {"a", "count"}
  assert set(nnx.to_pure_dict(params)) == {"a"} and set(nnx.to_pure_dict(rest)) == {"count"}
  assert isinstance(graphdef, nnx.GraphDef)
