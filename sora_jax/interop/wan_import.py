"""Reading a downloaded Wan 2.1 diffusers directory into a sora_jax inference directory.

  sora-jax import-wan --model-dir Wan2.1-T2V-1.3B-Diffusers --out runs/wan1.3b \
      --config configs/wan2_1_t2v.py:1.3B
  sora-jax import-wan --model-dir Wan2.1-I2V-14B-480P-Diffusers --out runs/wan-i2v \
      --config configs/wan2_1_t2v.py:14B

An image-to-video directory (its transformer has an image branch; it ships
`image_encoder/`, a CLIP vision model, and `image_processor/`) imports with the image
encoder, `conditioning.scheme="wan"` and the first frame (first and last for the
first-last-frame model) as what `sora-jax sample --image` gives. A Wan 2.2 A14B
directory (`transformer_2/`, the low-noise expert, and `boundary_ratio` in
model_index.json) imports both experts (`model.boundary`); its image-to-video variant
has the conditioning channels without an image encoder. A Wan 2.2 TI2V-5B directory
(`expand_timesteps` in model_index.json, the residual VAE with 48 latent channels)
imports with `conditioning.scheme="replace"`: it samples from text alone, or from text
and a first frame (`sora-jax sample --image`).

The output holds what `sora-jax sample` and `train.init_from` read (see
`sora_jax.train.restore`): `config.json` (the preset with the model, text-encoder and
autoencoder sections taken from the directory), `tokenizer.model` (its `spiece.model`),
`params/` (an Orbax checkpoint of the transformer and UMT5 parameters, written from
their sharded layout on the config's mesh) and `export.json`. The VAE stays in the
diffusers directory, read from `autoencoder.path` when sampling.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import ml_collections
import orbax.checkpoint as ocp

from sora_jax import configs
from sora_jax.interop import tensors
from sora_jax.interop.clip import vision_config_from_hf
from sora_jax.interop.load import (load_clip_vision, load_sentencepiece_tokenizer,
                                   load_umt5_encoder, load_wan_transformer, module_params,
                                   read_config, read_json)
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
  config.model.boundary = _boundary(model_dir, dit)
  if dit.image_width:
    _image_to_video(config, model_dir, dit)
  elif dit.cond_channels:   # Wan 2.2 A14B image-to-video: the channels without CLIP
    config.conditioning = configs.defaults("conditioning", probs={"first": 1.0},
                                           max_frames=1, scheme="wan")
  elif _expand_timesteps(model_dir):   # Wan 2.2 TI2V: text- and image-to-video in one
    config.conditioning = configs.defaults("conditioning", probs={"first": 1.0},
                                           max_frames=1, scheme="replace")
  return config


def _expand_timesteps(model_dir: str) -> bool:
  """Whether model_index.json asks for a flow time per token (Wan 2.2 TI2V-5B)."""
  if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
    return False
  return bool(read_json(model_dir, "model_index.json").get("expand_timesteps"))


def _boundary(model_dir: str, dit) -> float:
  """Wan 2.2 A14B's expert switch: `boundary_ratio` of model_index.json when the directory
  has a second transformer (`transformer_2/`, the low-noise expert), else 0."""
  if not os.path.isdir(os.path.join(model_dir, "transformer_2")):
    return 0.0
  ratio = read_json(model_dir, "model_index.json").get("boundary_ratio")
  if ratio is None or not 0.0 < float(ratio) < 1.0:
    raise ValueError(f"{model_dir!r} has transformer_2/ but model_index.json's boundary_ratio "
                     f"is {ratio!r}; a two-expert model needs one in (0, 1).")
  low = dit_config_from_diffusers(read_config(os.path.join(model_dir, "transformer_2")))
  if low != dit:
    raise ValueError(f"{model_dir!r}: transformer_2's architecture differs from transformer's; "
                     "sora_jax's two experts share one.")
  return float(ratio)


def _processor_dir(model_dir: str) -> str | None:
  """The directory's `image_processor/` (the CLIP normalisation), None when absent."""
  path = os.path.join(model_dir, "image_processor")
  return path if os.path.isdir(path) else None


def _image_to_video(config: ml_collections.ConfigDict, model_dir: str, dit) -> None:
  """The image encoder and conditioning of a Wan 2.1 image-to-video directory."""
  encoder_dir = os.path.join(model_dir, "image_encoder")
  if not os.path.isdir(encoder_dir):
    raise FileNotFoundError(f"{model_dir!r}: the transformer has an image branch but there is "
                            "no image_encoder/ (the CLIP vision model Wan's I2V ships).")
  processor = _processor_dir(model_dir)
  vision = vision_config_from_hf(read_config(encoder_dir), processor and read_json(
      processor, "preprocessor_config.json"))
  if vision.width != dit.image_width:
    raise ValueError(f"{model_dir!r}: the transformer takes image states of width "
                     f"{dit.image_width}, the image encoder gives {vision.width}.")
  images = dit.image_positions // vision.tokens if dit.image_positions else 1
  if dit.image_positions not in (0, 2 * vision.tokens):
    raise ValueError(f"{model_dir!r}: the transformer's {dit.image_positions} image positions "
                     f"are neither 0 (image-to-video) nor 2 x {vision.tokens} (first-last-frame).")
  config.image_encoder = configs.defaults("image_encoder", **dataclasses.asdict(vision))
  config.model.image_positions = dit.image_positions
  config.conditioning = configs.defaults(
      "conditioning", probs={"first" if images == 1 else "first_last": 1.0}, max_frames=1,
      scheme="wan")


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
  if config.model.boundary:
    low = load_wan_transformer(os.path.join(model_dir, "transformer_2"), mesh=mesh,
                               rules=rules, scan_layers=scan, remat=remat)
    params["low_noise_dit"] = module_params(low)
  if dit.cfg.image_width:
    image = load_clip_vision(os.path.join(model_dir, "image_encoder"), mesh=mesh, rules=rules,
                             processor_dir=_processor_dir(model_dir))
    params["image_encoder"] = module_params(image)
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

