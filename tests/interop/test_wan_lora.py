"""LoRA files for Wan transformers (`sora_jax.interop.lora`): a PEFT adapter saved by
diffusers, and the same adapter in original-Wan/ComfyUI naming, merged into sora_jax's
transformer give diffusers' outputs with the adapter active; bad files are named."""

import json
import re

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sora_jax.interop import lora as lora_lib
from sora_jax.interop.load import load_wan_transformer
from sora_jax.interop.tensors import CheckpointMismatch

from helpers import (LORA_RANK as RANK, LORA_ALPHA as ALPHA, add_peft_adapter, compiled,
                     make_torch_model, relative_error, save_diffusers_lora, torch_forward)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

def merged(module, files):
  """`module` (sora_jax's transformer) with `files` [(path, strength)] merged."""
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  for path, strength in files:
    params = lora_lib.merge_wan_lora(params, module.cfg, lora_lib.read_wan_lora(path),
                                     strength)
  graphdef, state = nnx.split(module)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory):
  """(the torch transformer with its adapter, the base's directory, the diffusers LoRA file)."""
  root = tmp_path_factory.mktemp("lora")
  model, base = make_torch_model(root)
  add_peft_adapter(model)
  return model, base, save_diffusers_lora(model, root / "diffusers_lora")


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((1, 3, 4, 6, 4)).astype(np.float32),
          np.array([437.5], np.float32), rng.standard_normal((1, 7, 20)).astype(np.float32))


_call = compiled()


def ours_forward(module, x, t, text):
  return np.asarray(_call(module, x, t / 1000.0, text, np.ones(text.shape[:2], bool)))


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_peft_lora_matches_diffusers_with_the_adapter_active(peft_model, strength):
  model, base, lora_file = peft_model
  x, t, text = inputs()
  model.set_adapters(["default"], weights=[strength])
  theirs = torch_forward(model, x, t, text)
  model.disable_adapters()
  without = torch_forward(model, x, t, text)
  model.enable_adapters()
  model.set_adapters(["default"], weights=[1.0])
  ours = ours_forward(merged(load_wan_transformer(base), [(lora_file, strength)]), x, t, text)
  assert relative_error(ours, theirs) < 1e-4
  assert relative_error(without, theirs) > 1e-2      # the adapter changes the output


def original_naming(diffusers_file, path, alpha=ALPHA):
  """The diffusers LoRA file rewritten in original-Wan/ComfyUI naming, with alpha tensors."""
  reverse = [(r"blocks.\1.self_attn.q", r"blocks\.(\d+)\.attn1\.to_q"),
             (r"blocks.\1.self_attn.k", r"blocks\.(\d+)\.attn1\.to_k"),
             (r"blocks.\1.self_attn.v", r"blocks\.(\d+)\.attn1\.to_v"),
             (r"blocks.\1.self_attn.o", r"blocks\.(\d+)\.attn1\.to_out\.0"),
             (r"blocks.\1.cross_attn.q", r"blocks\.(\d+)\.attn2\.to_q"),
             (r"blocks.\1.cross_attn.k", r"blocks\.(\d+)\.attn2\.to_k"),
             (r"blocks.\1.cross_attn.v", r"blocks\.(\d+)\.attn2\.to_v"),
             (r"blocks.\1.cross_attn.o", r"blocks\.(\d+)\.attn2\.to_out\.0"),
             (r"blocks.\1.ffn.0", r"blocks\.(\d+)\.ffn\.net\.0\.proj"),
             (r"blocks.\1.ffn.2", r"blocks\.(\d+)\.ffn\.net\.2"),
             ("text_embedding.0", r"condition_embedder\.text_embedder\.linear_1"),
             ("text_embedding.2", r"condition_embedder\.text_embedder\.linear_2"),
             ("time_embedding.0", r"condition_embedder\.time_embedder\.linear_1"),
             ("time_embedding.2", r"condition_embedder\.time_embedder\.linear_2"),
             ("time_projection.1", r"condition_embedder\.time_proj"),
             ("head.head", "proj_out")]
  out = {}
  for name, value in load_file(diffusers_file).items():
    module, kind = name.removeprefix("transformer.").rsplit(".lora_", 1)
    for replacement, pattern in reverse:
      if re.fullmatch(pattern, module):
        module = re.sub(pattern, replacement, module)
        break
    part = "lora_down" if kind.startswith("A") else "lora_up"
    if module.startswith("blocks."):
      out[f"diffusion_model.{module}.alpha"] = np.array(alpha, np.float32)
    elif part == "lora_up":   # diffusers reads alpha of the blocks' layers only: the
      value = value * (alpha / RANK)   # others carry their scale in lora_up (alpha = r)
    out[f"diffusion_model.{module}.{part}.weight"] = value
  save_file(out, path)
  return path


def test_original_naming_reads_as_diffusers_converts_it(peft_model, tmp_path):
  """The ComfyUI-named file: the same change of every weight as diffusers' own reading of
  it (`WanPipeline.lora_state_dict`, which folds alpha / r into the matrices), and the
  same outputs as the PEFT file."""
  model, base, lora_file = peft_model
  comfy = original_naming(lora_file, str(tmp_path / "comfy.safetensors"))
  theirs = diffusers.WanPipeline.lora_state_dict(comfy)
  theirs = theirs[0] if isinstance(theirs, tuple) else theirs
  adapters = {a.module: a for a in lora_lib.read_wan_lora(comfy)}
  assert len(adapters) == len(theirs) // 2 and len(adapters) > 20
  for module, adapter in adapters.items():
    down = theirs[f"transformer.{module}.lora_A.weight"].double().numpy()
    up = theirs[f"transformer.{module}.lora_B.weight"].double().numpy()
    np.testing.assert_allclose(adapter.kernel_delta(), (up @ down).T, rtol=1e-5, atol=1e-7,
                               err_msg=module)
  x, t, text = inputs(1)
  np.testing.assert_allclose(
      ours_forward(merged(load_wan_transformer(base), [(comfy, 1.0)]), x, t, text),
      ours_forward(merged(load_wan_transformer(base), [(lora_file, 1.0)]), x, t, text),
      rtol=1e-5, atol=1e-5)


def test_stacked_files_and_scanned_layers(peft_model, tmp_path):
  """Two files at their own strengths add up, into stacked (scan) layers as into a list."""
  _, base, lora_file = peft_model
  second, _ = make_torch_model(tmp_path)
  add_peft_adapter(second, seed=2)
  other = save_diffusers_lora(second, tmp_path / "second")
  files = [(lora_file, 0.7), (other, -0.4)]
  x, t, text = inputs(2)
  plain = ours_forward(merged(load_wan_transformer(base), files), x, t, text)
  scanned = ours_forward(merged(load_wan_transformer(base, scan_layers=True), files), x, t, text)
  np.testing.assert_allclose(scanned, plain, rtol=1e-5, atol=1e-5)
  one = ours_forward(merged(load_wan_transformer(base), files[:1]), x, t, text)
  assert relative_error(one, plain) > 1e-3


def test_bad_lora_files_are_named(peft_model, tmp_path):
  _, base, lora_file = peft_model
  module = load_wan_transformer(base)
  good = load_file(lora_file)

  def write(name, tensors_):
    path = str(tmp_path / f"{name}.safetensors")
    save_file(tensors_, path)
    return path

  def merge(path):
    return lora_lib.merge_wan_lora(nnx.to_pure_dict(nnx.state(module, nnx.Param)),
                                   module.cfg, lora_lib.read_wan_lora(path))

  no_up = {k: v for k, v in good.items() if k != "transformer.blocks.1.attn1.to_k.lora_B.weight"}
  with pytest.raises(CheckpointMismatch, match=r"blocks\.1\.attn1\.to_k: has \['down'\]"):
    merge(write("no_up", no_up))
  foreign = dict(good, **{"transformer.blocks.0.norm2.weight": np.ones(24, np.float32)})
  with pytest.raises(CheckpointMismatch, match=r"no LoRA tensor.*blocks\.0\.norm2\.weight"):
    merge(write("foreign", foreign))
  key = "transformer.blocks.0.ffn.net.2.lora_B.weight"
  wrong = dict(good, **{key: np.ones((30, RANK), np.float32)})
  with pytest.raises(CheckpointMismatch, match=r"wrong shape: blocks\.0\.ffn\.net\.2"):
    merge(write("wrong", wrong))
  extra = dict(good, **{"transformer.blocks.5.attn1.to_q.lora_A.weight": good[
      "transformer.blocks.0.attn1.to_q.lora_A.weight"],
                        "transformer.blocks.5.attn1.to_q.lora_B.weight": good[
      "transformer.blocks.0.attn1.to_q.lora_B.weight"]})
  with pytest.raises(CheckpointMismatch, match=r"does not have \['blocks\.5\.attn1\.to_q'\]"):
    merge(write("extra", extra))
  with pytest.raises(FileNotFoundError, match="no LoRA file"):
    lora_lib.read_wan_lora(str(tmp_path / "absent.safetensors"))
  (tmp_path / "text.safetensors").write_text(json.dumps({"not": "tensors"}))
  with pytest.raises(CheckpointMismatch, match="is not a safetensors file"):
    lora_lib.read_wan_lora(str(tmp_path / "text.safetensors"))
