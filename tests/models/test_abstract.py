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


def _test_model_config(**overrides):
  """The tiny test config at width 40 (no other test's architecture) with every section of
  the schema at its defaults (also those the test config leaves out), with dotted-key
  overrides."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(
      configs.as_dict(configs.typed(make_test_config("unused", **{"model.width": 40}))))
  config.update_from_flattened_dict(overrides)
  return config


def test_configs_of_one_architecture_share_its_abstract_model(monkeypatch):
  """`train.state.abstract_model` is keyed by the model's `ModelSpec`: configs that differ
  in how they train (steps, loss, optimiser, data, seed) trace one model; every input of
  the builder (an architecture key, frozen groups, adapters, the critic, the vocabulary)
  makes another spec."""
  from sora_jax.train import state  # pylint: disable=g-import-not-at-top
  built = []
  build = state.build_from_spec
  monkeypatch.setattr(state, "build_from_spec",
                      lambda spec, rngs: built.append(spec) or build(spec, rngs))
  config = _test_model_config()
  graphdef, params = state.abstract_model(config, 64)
  trained_otherwise = _test_model_config(**{
      "train.steps": 3, "flow.shift": 2.0, "optim.lr": 5e-4, "data.batch_size": 3,
      "seed": 7, "world.data_dir": "elsewhere"})
  again_graphdef, again = state.abstract_model(trained_otherwise, 64)
  assert len(built) == 1 and again_graphdef == graphdef
  assert jax.tree.map(lambda x: x.shape, again) == jax.tree.map(lambda x: x.shape, params)
  spec = state.model_spec(config, 64)
  for key, value in (("model.width", 48), ("text_encoder.width", 48), ("lora.rank", 2),
                     ("model.critic", True), ("optim.frozen", ("text_encoder",)),
                     ("model.qk_norm", "none"), ("model.boundary", 0.5)):
    assert state.model_spec(_test_model_config(**{key: value}), 64) != spec, key
  assert state.model_spec(config, 65) != spec
  adapters = lambda rank: state.model_spec(_test_model_config(**{"lora.rank": rank}), 64)
  assert adapters(2) != adapters(4)       # the adapters themselves, not only what they freeze
