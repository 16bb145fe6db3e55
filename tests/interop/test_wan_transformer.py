"""Wan 2.1's transformer: sora_jax's DiffusionTransformer loaded from a tiny randomly
initialised diffusers `WanTransformer3DModel` gives its outputs; export round trips."""

import dataclasses
import json
import os

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.interop import export, tensors, wan
from sora_jax.interop.load import load_wan_transformer
from sora_jax.models.dit import DiffusionTransformer, folded
from sora_jax.parallel.sharding import make_mesh

from helpers import (WAN_TINY as TINY, compiled, make_torch_model, random_params,
                     relative_error, torch_forward)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

@pytest.mark.parametrize("size", [(3, 4, 6), (1, 6, 4), (4, 2, 8)])
def test_forward_matches_diffusers(tmp_path, size):
  model, path = make_torch_model(tmp_path)
  ours = load_wan_transformer(path)
  rng = np.random.default_rng(0)
  frames, height, width = size
  x = rng.standard_normal((2, frames, height, width, 4)).astype(np.float32)
  text = rng.standard_normal((2, 7, 20)).astype(np.float32)
  mask = np.ones((2, 7), bool)
  mask[1, 4:] = False                      # the second prompt is 4 tokens long
  theirs_text = np.where(mask[..., None], text, 0).astype(np.float32)   # Wan's zero padding
  call = compiled()
  for timestep in (0.0, 437.5, 999.0):
    t = np.full((2,), timestep, np.float32)
    expected = torch_forward(model, x, t, theirs_text)
    got = call(ours, jnp.asarray(x), jnp.asarray(t / 1000.0), jnp.asarray(text),
               jnp.asarray(mask))
    chex.assert_shape(got, x.shape)
    assert relative_error(got, expected) < 1e-4, timestep


def test_scanned_and_sharded_load_match(tmp_path):
  """Stacked (scan) layers and a load straight into a 2x4 fsdp x tensor mesh give the
  same outputs as the plain load."""
  _, path = make_torch_model(tmp_path)
  plain = load_wan_transformer(path)
  mesh = make_mesh({"fsdp": 2, "tensor": 4})
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("modulation", "tensor"),
           ("patch", None), ("norm", None), ("layers", None))
  scanned = load_wan_transformer(path, mesh=mesh, rules=rules, scan_layers=True)
  kernel = scanned.blocks.mlp.fc1.kernel[...]
  chex.assert_shape(kernel, (2, 24, 40))
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len(kernel.addressable_shards) == 8
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 2, 4, 4, 4)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((1, 5, 20)), jnp.float32)
  args = (x, jnp.array([0.3]), text, jnp.ones((1, 5), bool))
  call = compiled()
  np.testing.assert_allclose(call(scanned, *args), call(plain, *args), rtol=1e-5, atol=1e-5)


def test_export_loads_in_diffusers_and_round_trips(tmp_path):
  model, path = make_torch_model(tmp_path)
  ours = load_wan_transformer(path)
  out = str(tmp_path / "exported")
  export.save_wan_transformer(ours, out)
  # import -> export gives back the same tensors
  original = tensors.SafetensorsCheckpoint(path)
  again = tensors.SafetensorsCheckpoint(out)
  assert again.names() == original.names()
  for name in original.names():
    np.testing.assert_array_equal(again.read(name), original.read(name), err_msg=name)
  # diffusers loads the export and computes what it computed before
  reloaded = diffusers.WanTransformer3DModel.from_pretrained(out).eval()
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 3, 4, 4, 4)).astype(np.float32)
  text = rng.standard_normal((1, 6, 20)).astype(np.float32)
  t = np.array([250.0], np.float32)
  # The tensors are bitwise equal (above); torch's threaded CPU reductions are not bitwise
  # reproducible between two calls under load, so the outputs compare with a tolerance.
  np.testing.assert_allclose(torch_forward(reloaded, x, t, text),
                             torch_forward(model, x, t, text), rtol=1e-5, atol=1e-5)


def test_a_distilled_student_exports_folded_for_diffusers(tmp_path):
  """A student's guidance and step inputs, fixed at export (`dit.folded`), move into the
  timestep MLP's last bias: diffusers' `WanTransformer3DModel` of the export computes the
  student's velocity at those inputs, which differs from its teacher's."""
  _, path = make_torch_model(tmp_path)
  teacher = load_wan_transformer(path)
  cfg = dataclasses.replace(teacher.cfg, guidance_embedding=True, step_embedding=True)
  with nnx.use_eager_sharding(False):
    student = DiffusionTransformer(cfg, rngs=nnx.Rngs(3))
  new = nnx.to_pure_dict(nnx.state(student, nnx.Param))
  inputs = {k: random_params(new[k], seed=i) for i, k in enumerate(("guidance_mlp", "step_mlp"))}
  nnx.update(student, {**nnx.to_pure_dict(nnx.state(teacher, nnx.Param)), **inputs})
  out = str(tmp_path / "student")
  export.save_wan_transformer(folded(student, guidance=3.5, step_size=0.25), out)
  reloaded = diffusers.WanTransformer3DModel.from_pretrained(out).eval()
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
  text = rng.standard_normal((2, 6, 20)).astype(np.float32)
  t = np.array([1000.0, 437.5], np.float32)
  args = (jnp.asarray(x), jnp.asarray(t / 1000), jnp.asarray(text), jnp.ones((2, 6), bool))
  want = student(*args, guidance=jnp.full((2,), 3.5), step_size=jnp.full((2,), 0.25))
  assert relative_error(torch_forward(reloaded, x, t, text), want) < 1e-4
  assert relative_error(teacher(*args), want) > 1e-2


def test_mismatched_checkpoint_names_the_tensor(tmp_path):
  _, path = make_torch_model(tmp_path)
  checkpoint = tensors.SafetensorsCheckpoint(path)
  all_tensors = {n: checkpoint.read(n) for n in checkpoint.names()}
  config = json.load(open(os.path.join(path, "config.json")))

  def write(name, tensors_, config_):
    d = tmp_path / name
    tensors.save_safetensors(tensors_, str(d), "diffusion_pytorch_model")
    json.dump(config_, open(d / "config.json", "w"))
    return str(d)

  missing = dict(all_tensors)
  del missing["blocks.1.attn2.to_k.weight"]
  with pytest.raises(tensors.CheckpointMismatch, match=r"missing.*blocks\.1\.attn2\.to_k\.weight"):
    load_wan_transformer(write("missing", missing, config))
  wrong = dict(all_tensors, **{"proj_out.bias": np.zeros(5, np.float32)})
  with pytest.raises(tensors.CheckpointMismatch, match=r"wrong shape: proj_out\.bias"):
    load_wan_transformer(write("wrong", wrong, config))
  extra = dict(all_tensors, **{"blocks.2.norm2.weight": np.zeros(24, np.float32)})
  with pytest.raises(tensors.CheckpointMismatch, match=r"unexpected.*blocks\.2\.norm2\.weight"):
    load_wan_transformer(write("extra", extra, config))
  with pytest.raises(tensors.CheckpointMismatch, match=r"blocks\.0\.ffn\.net\.0\.proj\.weight"):
    load_wan_transformer(write("config", all_tensors, dict(config, ffn_dim=48)))


def test_diffusers_config_round_trip():
  cfg = wan.dit_config_from_diffusers(TINY)
  assert cfg.width == 24 and cfg.mlp_width == 40 and cfg.text_padding == "zeros"
  assert wan.dit_config_from_diffusers(wan.diffusers_config_from_dit(cfg)) == cfg
  with pytest.raises(ValueError, match="modulation"):
    wan.diffusers_config_from_dit(dataclasses.replace(cfg, modulation="per_block"))
