"""Reading a downloaded Wan 2.1 diffusers directory into a sora_jax inference directory.

  sora-jax import-wan --model-dir Wan2.1-T2V-1.3B-Diffusers --out runs/wan1.3b \
      --config configs/wan2_1_t2v.py:1.3B

The output holds what `sora-jax sample` and `train.init_from` read (see
`sora_jax.train.restore`): `config.json` (the preset with the model, text-encoder and
autoencoder sections taken from the directory), `tokenizer.model` (its `spiece.model`),
`params/` (an Orbax checkpoint of the transformer and UMT5 parameters, written from
their sharded layout on the config's mesh) and `export.json`. The VAE stays in the
diffusers directory, read from `autoencoder.path` when sampling.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import orbax.checkpoint as ocp

from sora_jax import configs
from sora_jax.interop import tensors
from sora_jax.interop.load import (load_sentencepiece_tokenizer, load_umt5_encoder,
                                   load_wan_transformer, module_params, read_config)
from sora_jax.interop.wan import dit_config_from_diffusers
from sora_jax.interop.umt5 import text_encoder_config_from_hf
from sora_jax.parallel.sharding import make_mesh
from sora_jax.train import workdir as wd
from sora_jax.train.restore import params_dir
from sora_jax.train.state import abstract_model, array_shapes

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae")


def wan_config(model_dir: str, preset: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`preset` (configs/wan2_1_t2v.py) with the architecture read from `model_dir`:
  the transformer's sizes, the text encoder's and `autoencoder.path = <model_dir>/vae`."""
  missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(model_dir, c))]
  if missing:
    raise FileNotFoundError(f"{model_dir!r} lacks {missing}: expected a diffusers Wan 2.1 "
                            f"directory with {list(COMPONENTS)}.")
  config = ml_collections.ConfigDict(preset.to_dict())
  dit = dit_config_from_diffusers(read_config(os.path.join(model_dir, "transformer")))
  text = text_encoder_config_from_hf(read_config(os.path.join(model_dir, "text_encoder")))
  if dit.text_width != text.width:
    raise ValueError(f"{model_dir!r}: the transformer takes text of width {dit.text_width}, "
                     f"the text encoder gives {text.width}.")
  variant = config.model.variant.split("/")[0] + "/" + "x".join(str(p) for p in dit.patch)
  config.model.update(variant=variant, width=dit.width, depth=dit.depth, heads=dit.heads,
                      mlp_hidden=dit.mlp_width, cross_attn_norm=dit.cross_attn_norm,
                      qk_norm=dit.qk_norm, freq_dim=dit.freq_dim, eps=dit.eps,
                      modulation="shared", text_projection="mlp", text_padding="zeros")
  config.text_encoder.update(width=text.width, depth=text.depth, heads=text.heads,
                             mlp_width=text.mlp_width, num_buckets=text.num_buckets,
                             max_distance=text.max_distance, vocab_size=text.vocab_size,
                             eps=text.eps)
  config.autoencoder.update(name="wan", path=os.path.abspath(os.path.join(model_dir, "vae")))
  return config


def import_wan(model_dir: str, out: str, preset: ml_collections.ConfigDict) -> str:
  """Writes the sora_jax inference directory of a Wan 2.1 diffusers directory to `out`
  (which must not exist); returns `out`. Parameters are loaded straight into the
  shardings of the preset's mesh, tensor by tensor, and saved from there."""
  if os.path.exists(out):
    raise FileExistsError(f"{out!r} exists; import-wan writes a new directory.")
  config = wan_config(model_dir, preset)
  tokenizer = load_sentencepiece_tokenizer(os.path.join(model_dir, "tokenizer"))
  mesh = make_mesh(configs.mesh_shape(config))
  rules = configs.sharding_rules(config)
  scan, remat = bool(config.model.get("scan_layers", False)), config.model.get("remat", "none")
  dit = load_wan_transformer(os.path.join(model_dir, "transformer"), mesh=mesh, rules=rules,
                             scan_layers=scan, remat=remat)
  text = load_umt5_encoder(os.path.join(model_dir, "text_encoder"), mesh=mesh, rules=rules)
  params = {"text_encoder": module_params(text), "dit": module_params(dit)}
  _, abstract = abstract_model(config, tokenizer.vocab_size)
  want, have = array_shapes(abstract), params
  if (tensors.dotted_names(want) != tensors.dotted_names(have)
      or any(a.shape != b.shape for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(have)))):
    raise ValueError(f"{model_dir!r}: the imported parameters do not fit the config's model.")
  tmp = out.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir(tmp), params)
  shutil.copyfile(tokenizer.path, wd.tokenizer_path(tmp))
  with open(wd.config_path(tmp), "w", encoding="utf-8") as f:
    f.write(configs.to_json(config))
  with open(os.path.join(tmp, "export.json"), "w", encoding="utf-8") as f:
    json.dump({"step": 0, "ema": True, "source": os.path.abspath(model_dir),
               "format": "orbax-params"}, f, indent=2)
  os.replace(tmp, out)
  return out

