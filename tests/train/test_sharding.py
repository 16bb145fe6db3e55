"""The train step gives the same result on 1 device and on 8 with fsdp and tensor sharding."""

import jax
import numpy as np
import pytest

from sora_jax import configs
from sora_jax.data.pipeline import to_global_batch
from sora_jax.models.autoencoder import IdentityAutoencoder
from sora_jax.parallel.sharding import (activation_sharding, logical_to_spec, make_mesh,
                                        tokens_split)
from sora_jax.train import optim
from sora_jax.train.state import create_train_state
from sora_jax.train.step import make_train_step
from jax.sharding import NamedSharding, PartitionSpec as P

# One worker runs the module, so its single-device reference run is computed once.
pytestmark = pytest.mark.xdist_group("sharding")


def _batch(config, seed):
  rng = np.random.default_rng(seed)
  w, b, length = config.world, config.data.batch_size, config.data.text_length
  ids = rng.integers(3, 20, size=(b, length)).astype(np.int32)
  ids[:, 6:] = 0
  ids[:, 5] = 1
  return {"video": rng.uniform(-1, 1, (b, w.frames, w.height, w.width, 3)).astype(np.float32),
          "text_ids": ids, "text_mask": ids != 0}


def _run(config, devices, steps=2):
  mesh = make_mesh(configs.mesh_shape(config), devices=devices)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  graphdef, state, shardings = create_train_state(config, 24, mesh, tx)
  null_ids = np.array([1] + [0] * (config.data.text_length - 1), np.int32)
  step = make_train_step(config, graphdef, tx, shardings, mesh, IdentityAutoencoder(),
                         null_ids, null_ids != 0)
  losses = []
  for i in range(steps):
    state, metrics = step(state, to_global_batch(_batch(config, i), mesh,
                                                 configs.sharding_rules(config)))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state["params"]), state


@pytest.fixture(scope="module")
def single_device_run(data_dir, devices):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, **{"model.width": 64, "model.heads": 4})
  return _run(config, devices[:1])[:2]


# (data, fsdp, tensor, sequence); sequence-parallel layouts run self-attention as ring
# attention, the others as plain XLA attention on GSPMD-sharded activations. (Pure data
# parallelism on 8 devices is what the reference run and the multi-process test use.)
# data x fsdp x tensor, and fsdp x sequence (ring attention); fsdp over all 8 devices is
# the Wan presets' layout, compiled for TPU slices in tests/plan.
@pytest.mark.parametrize("layout", [(2, 2, 2, 1), (1, 2, 1, 4)], ids=str)
def test_sharded_step_matches_single_device(config, devices, layout, single_device_run):
  single_losses, single_params = single_device_run
  config.model.update(width=64, heads=4, attention="ring" if layout[3] > 1 else "xla")
  config.mesh.update(**dict(zip(("data", "fsdp", "tensor", "sequence"), layout)))
  losses, params, state = _run(config, devices)
  # The parameters really are sharded as the rules say: the width over fsdp and sequence
  # (the mesh axes of size 1 dropped), the MLP's hidden width over tensor.
  kernel = state["params"]["dit"]["blocks"][0]["mlp"]["fc1"]["kernel"]
  width = tuple(a for a, n in (("fsdp", layout[1]), ("sequence", layout[3])) if n > 1)
  expected = P(width if len(width) > 1 else (width or (None,))[0],
               "tensor" if layout[2] > 1 else None)
  assert kernel.sharding.spec == expected
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params, single_params)


def test_logical_rules_never_reuse_a_mesh_axis(devices):
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=devices)
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))
  assert logical_to_spec(("embed", "mlp"), rules, mesh) == P("fsdp", "tensor")
  assert logical_to_spec(("batch", "length", "embed"), rules, mesh) == P(("data", "fsdp"), None,
                                                                          None)
  assert logical_to_spec(("mlp", "heads"), rules, mesh) == P("tensor", None)
  # Axes of size 1 are dropped.
  small = make_mesh({"data": 8}, devices=devices)
  assert logical_to_spec(("embed", "mlp"), rules, small) == P(None, None)


def test_tokens_are_split_only_over_a_sequence_axis(config, devices):
  """`model.token_chunks` chunks the tokens each device holds whole, never a split axis."""
  rules = configs.sharding_rules(config)
  assert not tokens_split()                                       # outside any context
  for shape, split in [({"data": 2, "fsdp": 2, "tensor": 2}, False), ({"fsdp": 8}, False),
                       ({"fsdp": 2, "sequence": 4}, True)]:
    with activation_sharding(make_mesh(shape, devices=devices), rules):
      assert tokens_split() == split, shape


def test_token_chunks_gather_each_fsdp_weight_once(config, devices):
  """In token chunks under FSDP, a weight is gathered once for all chunks (and its
  gradient reduce-scattered once), not once per chunk: the compiled forward and backward
  of an MLP hold as many all-gathers in 4 chunks as whole, and the same values."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.models.layers import MLP  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel import axes  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel.sharding import state_shardings  # pylint: disable=g-import-not-at-top
  rules = configs.sharding_rules(config)
  mesh = make_mesh({"fsdp": 8}, devices=devices)
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (8, 64, 32)),
                     NamedSharding(mesh, P("fsdp")))             # the batch, as a step has it
  programs, values = {}, {}
  for chunks in (1, 4):
    with nnx.use_eager_sharding(False):
      mlp = MLP(32, 128, 32, (axes.EMBED, axes.MLP, axes.EMBED), token_chunks=chunks,
                rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mlp)
    state = jax.device_put(nnx.to_pure_dict(state), state_shardings(state, mesh, rules))

    def loss(state, x):
      with activation_sharding(mesh, rules):
        return jax.numpy.sum(nnx.merge(graphdef, state)(x) ** 2)

    grad = jax.jit(jax.value_and_grad(loss))
    programs[chunks] = grad.lower(state, x).compile().as_text()
    values[chunks] = grad(state, x)
  gathers = {c: text.count(" all-gather(") + text.count(" all-gather-start(")
             for c, text in programs.items()}
  assert gathers[1] > 0 and gathers[4] == gathers[1], gathers
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               values[4], values[1])


@pytest.mark.slow
def test_scanned_rematerialised_model_shards_like_the_loop(config, devices):
  # In token chunks (the Wan presets' setting), on both sides.
  config.model.update(width=64, heads=4, depth=2, scan_layers=True, remat="dots",
                      token_chunks=3)
  single_losses, single_params, _ = _run(config, devices[:1])
  config.mesh.update(data=2, fsdp=2, tensor=2)
  losses, params, state = _run(config, devices)
  kernel = state["params"]["dit"]["blocks"]["mlp"]["fc1"]["kernel"]
  assert kernel.shape[0] == 2 and kernel.sharding.spec == P(None, "fsdp", "tensor")
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params, single_params)


def test_splash_attention_trains_like_the_reference(config, devices, single_device_run):
  """Splash runs per device under `shard_map` (batch over data, heads over tensor), as the
  TPU compiler requires of a Pallas kernel. (dot_product is XLA on CPU; its agreement is
  tested at the attention level.)"""
  single_losses, single_params = single_device_run
  config.model.update(width=64, heads=4, attention="splash")
  config.mesh.update(data=2, fsdp=1, tensor=2)
  losses, params, _ = _run(config, devices[:4])
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params, single_params)
