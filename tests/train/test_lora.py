"""LoRA: adapters in the model (`sora_jax.models.lora`) and LoRA runs (`lora.*`): only the
adapters train and are checkpointed, the base stays fixed, resume is exact, and the run
samples and exports as its merged weights."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import world_tiny  # configs/, on the path through tests/conftest.py
from helpers import random_params, stack_blocks
from sora_jax import cli, configs
from sora_jax.interop.tensors import path_leaves
from sora_jax.models import lora
from sora_jax.models.dit import DiffusionTransformer
from sora_jax.models.layers import in_token_chunks
from sora_jax.sample import Sampler
from sora_jax.train import optim
from sora_jax.train.loop import train
from sora_jax.train.restore import base_params, restore_adapters, restore_params, without_adapters
from sora_jax.train.state import abstract_model, initial_model_params, train_state_shardings


class Net(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Linear(5, 7, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(7, 7, rngs=rngs) for _ in range(2)])

  def __call__(self, x):
    x = self.q(x)
    for block in self.blocks:
      x = block(x)
    return x


def test_adapted_linear_matches_float64_and_starts_at_the_base():
  net = Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
  before = net(x)
  assert sorted(lora.add_adapters(net, ["q", "blocks.1"], rank=3, alpha=6.0,
                                  rngs=nnx.Rngs(2))) == ["blocks.1", "q"]
  assert isinstance(net.blocks[1], lora.LoRALinear) and isinstance(net.blocks[0], nnx.Linear)
  np.testing.assert_array_equal(net(x), before)             # B starts at zero
  a = np.asarray(net.q.lora_a[...])
  chex.assert_shape(a, (5, 3))
  assert np.abs(a).max() <= 5 ** -0.5 and np.abs(a).std() > 0.1   # PEFT's uniform init
  net.q.lora_b[...] = jax.random.normal(jax.random.PRNGKey(3), (3, 7))
  q = net.q
  want = (np.asarray(x, np.float64) @ np.asarray(q.kernel[...], np.float64) + np.asarray(q.bias[...])
          + 2.0 * np.asarray(x, np.float64) @ a @ np.asarray(q.lora_b[...], np.float64))
  np.testing.assert_allclose(q(x), want, rtol=1e-5, atol=1e-5)
  params = nnx.to_pure_dict(nnx.state(net, nnx.Param))
  adapters, rest = lora.split_adapters(params)
  assert sorted(adapters) == ["blocks", "q"] and "lora_a" not in rest["q"]
  assert lora.merge_trees(rest, adapters) == params
  merged = lora.merged_weights(params, 2.0)
  np.testing.assert_allclose(merged["q"]["kernel"],
                             np.asarray(q.kernel[...]) + 2.0 * a @ np.asarray(q.lora_b[...]),
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"match no linear layer.*'q'"):
    lora.add_adapters(Net(nnx.Rngs(0)), ["mlp.*"], rank=2, alpha=2.0, rngs=nnx.Rngs(0))


def test_dropout_only_in_training_unbiased_and_per_layer():
  net = Net(nnx.Rngs(0))
  lora.add_adapters(net, ["q"], rank=3, alpha=3.0, rngs=nnx.Rngs(2), dropout=0.5)
  net.q.lora_b[...] = jax.random.normal(jax.random.PRNGKey(3), (3, 7))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
  plain = net.q(x)
  with lora.dropout_randomness(None):
    np.testing.assert_array_equal(net.q(x), plain)            # no key: deterministic
  graphdef, state = nnx.split(net.q)

  def dropped(key, layer=0):
    with lora.dropout_randomness(key), lora.stack_layer(layer):
      return nnx.merge(graphdef, state)(x)

  one = dropped(jax.random.PRNGKey(5))
  assert np.abs(one - plain).max() > 1e-3
  np.testing.assert_array_equal(dropped(jax.random.PRNGKey(5)), one)   # a key's own mask
  assert np.abs(dropped(jax.random.PRNGKey(5), layer=1) - one).max() > 1e-3
  # Inverted dropout: over many masks the mean is the deterministic output.
  many = jax.vmap(dropped)(jax.random.split(jax.random.PRNGKey(6), 4000))
  np.testing.assert_allclose(many.mean(0), plain, atol=0.1 * np.abs(plain).max())
  # In token chunks (`model.token_chunks`), each chunk of the same inputs its own mask.
  tokens = jnp.broadcast_to(x[0], (1, 8, 5))
  with lora.dropout_randomness(jax.random.PRNGKey(5)):
    chunked = in_token_chunks(nnx.merge(graphdef, state), 2, tokens)
  assert np.abs(chunked[0, :4] - chunked[0, 4:]).max() > 1e-3


def test_scanned_and_looped_blocks_drop_alike(data_dir):
  """One model as a loop over blocks and as a scan (the same weights, stacked): in
  training they drop the same inputs, each layer its own."""
  config = lora_config(data_dir)
  models = []
  for scan in (False, True):
    config.model.scan_layers = scan
    with nnx.use_eager_sharding(False):
      dit = DiffusionTransformer(configs.dit_config(config, text_width=8), rngs=nnx.Rngs(0))
      lora.add_adapters(dit, ["blocks*q"], rank=2, alpha=2.0, rngs=nnx.Rngs(1), dropout=0.5)
    models.append(dit)
  loop, scanned = models
  params = random_params(nnx.to_pure_dict(nnx.state(loop, nnx.Param)))
  nnx.update(loop, params)
  nnx.update(scanned, stack_blocks(params))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8, 8, 3))
  inputs = (jnp.full((1,), 0.5), jax.random.normal(jax.random.PRNGKey(1), (1, 3, 8)),
            jnp.ones((1, 3), bool))
  with lora.dropout_randomness(jax.random.PRNGKey(2)):
    dropped = [model(x, *inputs) for model in models]
  np.testing.assert_allclose(dropped[1], dropped[0], rtol=1e-4, atol=1e-4)   # scan == loop
  assert np.abs(dropped[0] - loop(x, *inputs)).max() > 1e-3                 # it drops


def lora_config(data_dir, **train):
  config = world_tiny.get_config("test-lora")
  config.world.data_dir = data_dir
  config.optim.update(lr=3e-2, warmup_steps=0)
  config.train.update(**{"steps": 4, "log_every": 1, "checkpoint_every": 2,
                         "keep_checkpoints": 4, **train})
  return config


def test_adapters_of_scanned_layers_are_stacked_and_alone_in_the_state(data_dir):
  config = lora_config(data_dir)
  config.model.scan_layers = True
  _, abstract = abstract_model(config, 64)
  params = nnx.to_pure_dict(abstract)
  depth = configs.dit_config(config, text_width=config.text_encoder.width).depth
  q = params["dit"]["blocks"]["self_attn"]["q"]
  chex.assert_shape([q["lora_a"], q["lora_b"]], [(depth, q["kernel"].shape[1], 8),
                                                 (depth, 8, q["kernel"].shape[2])])
  names = abstract["dit"]["blocks"]["self_attn"]["q"]["lora_a"].get_metadata()["out_sharding"]
  assert names[0] == "layers" and names[-1] is None
  from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  mesh = make_mesh({"data": 2, "fsdp": 4})
  shardings = train_state_shardings(config, 64, mesh, optim.for_run(config), abstract=abstract)
  leaves = jax.tree_util.tree_flatten_with_path(shardings["params"])[0]
  assert leaves and all(str(path[-1].key) in lora.ADAPTER_NAMES for path, _ in leaves)
  # per (stacked) block: q, k, v, out of both attentions and the MLP's fc1, fc2; A and B each
  assert len(leaves) == 2 * (4 * 2 + 2)
  # Without train.init_from the base is the plain model's initialisation from the seed.
  base = base_params(config, 64, make_mesh({"data": 1}, jax.devices()[:1]), abstract=abstract)
  plain = jax.jit(lambda key: initial_model_params(without_adapters(config), 64, key))(
      jax.random.PRNGKey(config.seed))
  assert set(path_leaves(base)) == set(path_leaves(plain))
  for path, value in path_leaves(plain).items():
    np.testing.assert_array_equal(path_leaves(base)[path], value, err_msg=str(path))


@pytest.fixture(scope="module")
def lora_run(data_dir, reference_run, tmp_path_factory):
  """A 4-step LoRA run of the test config (a checkpoint every 2 steps, adapter dropout) on the trained
  reference run (an untrained base has adaLN-Zero's gates at zero: no gradient reaches
  the blocks' adapters)."""
  config = lora_config(data_dir, init_from=reference_run[1])
  config.lora.dropout = 0.1       # resumes exactly and samples deterministically all the same
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  return config, workdir, train(config, workdir, progress=False)


@pytest.mark.xdist_group("reference")
def test_only_adapters_train_and_the_base_stays(lora_run):
  config, workdir, result = lora_run
  assert result["step"] == 4 and np.isfinite(result["loss"])
  saved, adapters, step = restore_adapters(workdir, ema=False)
  assert step == 4 and saved.lora.rank == 8
  assert all(path[-1] in lora.ADAPTER_NAMES for path in path_leaves(adapters))
  assert any(np.abs(np.asarray(b)).max() > 0 for p, b in path_leaves(adapters).items()
             if p[-1] == "lora_b")                         # B moved away from zero
  # The merged weights: the base everywhere, plus scale * A B on the adapted kernels.
  merged = restore_params(workdir, ema=False)
  assert merged.config.lora.rank == 0
  base = restore_params(config.train.init_from).params
  got, want = path_leaves(merged.params), path_leaves(base)
  assert set(got) == set(want)
  adapted = {p[:-1] for p in path_leaves(adapters)}
  for path, value in got.items():
    if path[:-1] in adapted and path[-1] == "kernel":
      a, b = (np.asarray(path_leaves(adapters)[path[:-1] + (n,)]) for n in lora.ADAPTER_NAMES)
      np.testing.assert_allclose(value, np.asarray(want[path]) + a @ b, rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(value, want[path], err_msg=str(path))


@pytest.mark.xdist_group("reference")
def test_lora_run_resumes_exactly(lora_run, data_dir, tmp_path):
  config, workdir, _ = lora_run
  again = str(tmp_path / "again")
  train(config, again, progress=False, stop_at=2)
  train(config, again, progress=False)
  for run in (False, True):
    first, second = (restore_adapters(w, ema=run)[1] for w in (workdir, again))
    for path, value in path_leaves(first).items():
      np.testing.assert_array_equal(value, path_leaves(second)[path], err_msg=str(path))


@pytest.mark.xdist_group("reference")
def test_lora_run_samples_and_exports_merged(lora_run, tmp_path):
  _, workdir, _ = lora_run
  sampler = Sampler.from_workdir(workdir)
  assert sampler.config.lora.rank == 0
  video = sampler.generate(["a red circle moves left"], [3], steps=2)
  chex.assert_shape(video, (1, 4, 16, 16, 3))
  out = str(tmp_path / "merged")
  cli.main(["sora-jax", "export", "--workdir", workdir, "--to", "safetensors", "--out", out])
  np.testing.assert_array_equal(
      Sampler.from_workdir(out).generate(["a red circle moves left"], [3], steps=2), video)
  with pytest.raises(SystemExit, match="Wan transformers"):
    cli.main(["sora-jax", "export", "--workdir", workdir, "--to", "lora",
              "--out", str(tmp_path / "adapters")])
  with pytest.raises(SystemExit, match="no LoRA run"):
    cli.main(["sora-jax", "export", "--workdir", out, "--to", "lora",
              "--out", str(tmp_path / "none")])


def test_bad_lora_values_are_named(data_dir):
  for key, value, message in (("rank", -1, "lora.rank=-1"), ("alpha", -2.0, "lora.alpha"),
                              ("targets", (), "lora.targets is empty"),
                              ("dropout", 1.0, "lora.dropout=1.0")):
    config = lora_config(data_dir)
    config.lora[key] = value
    with pytest.raises(ValueError, match=message):
      configs.validate(config)
