"""Loading pretrained checkpoints into sora_jax modules, sharded over a mesh.

  transformer = load_wan_transformer("Wan2.1-T2V-1.3B-Diffusers/transformer")
  vae = load_wan_vae("Wan2.1-T2V-1.3B-Diffusers/vae")
  encoder = load_umt5_encoder("Wan2.1-T2V-1.3B-Diffusers/text_encoder")
  image_encoder = load_clip_vision("Wan2.1-I2V-14B-480P-Diffusers/image_encoder")
  tokenizer = load_sentencepiece_tokenizer("Wan2.1-T2V-1.3B-Diffusers/tokenizer")

With `mesh` and `rules` (a config's `mesh` and `sharding.rules`, see
`sora_jax.configs`), every parameter is placed in its sharded layout as it is read,
one tensor at a time, each device reading only its block from the memory-mapped files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Hashable, Iterable, Sequence

from flax import nnx
from jax.sharding import Mesh

import jax
import jax.numpy as jnp

from sora_jax.interop import clip, tensors, umt5, wan, wan_vae
from sora_jax.models.abstract import abstract_module
from sora_jax.models.dit import DiffusionTransformer
from sora_jax.models.text import TextEncoder
from sora_jax.models.tokenizer import Tokenizer
from sora_jax.models.vae import VideoVAE
from sora_jax.models.vision import VisionEncoder
from sora_jax.parallel.sharding import array_shapes, state_shardings


def read_json(model_dir: str, name: str) -> dict[str, Any]:
  """`model_dir/name` as a dict (FileNotFoundError naming it when absent)."""
  path = os.path.join(model_dir, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{model_dir!r} has no {name}: expected a diffusers or "
                            "transformers model directory.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_config(model_dir: str) -> dict[str, Any]:
  """`model_dir/config.json` as a dict (FileNotFoundError naming it when absent)."""
  return read_json(model_dir, "config.json")


def load_module(model_dir: str, build: Callable[[], nnx.Module],
                mapping: Sequence[tensors.Tensor], *, what: str, mesh: Mesh | None = None,
                rules: Sequence[tuple[str, Any]] = (), ignore: Iterable[str] = (),
                others: Any = None, key: Hashable | None = None) -> nnx.Module:
  """`build()`'s module with its parameters read from the safetensors of `model_dir`.

  The module is never initialised: its abstract shapes (`nnx.eval_shape`) are checked
  against the checkpoint (`tensors.check`), then each parameter is read into place.
  `others`: a pure dict of values for the module's non-parameter variables (e.g. a VAE's
  latent statistics), which checkpoints keep in their config. `key`: a hashable naming
  the architecture `build` makes, so that its abstract shapes are traced once per process
  (`models.abstract.abstract_module`); None traces them every time.
  """
  graphdef, params, rest = abstract_module(key, build, nnx.Param, ...)
  shardings = state_shardings(params, mesh, tuple(rules)) if mesh is not None else None
  checkpoint = tensors.SafetensorsCheckpoint(model_dir)
  values = tensors.load(checkpoint, mapping, array_shapes(params), shardings, what=what,
                        ignore=ignore)
  nnx.replace_by_pure_dict(params, values)
  if others is not None:
    nnx.replace_by_pure_dict(rest, jax.tree.map(jnp.asarray, others))
  return nnx.merge(graphdef, params, rest)


def module_params(module: nnx.Module) -> Any:
  """A module's parameters as a pure dict (arrays keep their shardings): what
  `load_module` fills and the exporters write."""
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def load_wan_transformer(model_dir: str, *, mesh: Mesh | None = None,
                         rules: Sequence[tuple[str, Any]] = (), scan_layers: bool = False,
                         remat: str = "none") -> DiffusionTransformer:
  """A diffusers `WanTransformer3DModel` directory as a `DiffusionTransformer`."""
  cfg = wan.dit_config_from_diffusers(read_config(model_dir), scan_layers=scan_layers,
                                      remat=remat)
  return load_module(model_dir, lambda: DiffusionTransformer(cfg, rngs=nnx.Rngs(0)),
                     wan.transformer_mapping(cfg), what="Wan transformer", mesh=mesh,
                     rules=rules, key=(DiffusionTransformer, cfg))


def load_wan_vae(model_dir: str, *, mesh: Mesh | None = None,
                 rules: Sequence[tuple[str, Any]] = ()) -> VideoVAE:
  """A diffusers `AutoencoderKLWan` directory as a `VideoVAE`, with its latent statistics."""
  config = read_config(model_dir)
  cfg = wan_vae.vae_config_from_diffusers(config)
  mean, std = wan_vae.latent_stats(config, cfg.latent_channels)
  return load_module(model_dir, lambda: VideoVAE(cfg, rngs=nnx.Rngs(0)), wan_vae.vae_mapping(cfg),
                     what="Wan VAE", mesh=mesh, rules=rules,
                     others={"latent_mean": mean, "latent_std": std}, key=(VideoVAE, cfg))


def load_umt5_encoder(model_dir: str, *, mesh: Mesh | None = None,
                      rules: Sequence[tuple[str, Any]] = ()) -> TextEncoder:
  """A transformers `UMT5EncoderModel` (or `T5EncoderModel`) directory as a `TextEncoder`."""
  config = read_config(model_dir)
  cfg = umt5.text_encoder_config_from_hf(config)
  shared_bias = config.get("model_type", "umt5") == "t5"
  return load_module(model_dir, lambda: TextEncoder(cfg, rngs=nnx.Rngs(0)),
                     umt5.text_encoder_mapping(cfg, shared_bias=shared_bias),
                     what="UMT5 text encoder", mesh=mesh, rules=rules,
                     ignore=("encoder.embed_tokens.weight", "shared.weight"),
                     key=(TextEncoder, cfg))


def load_clip_vision(model_dir: str, *, processor_dir: str | None = None,
                     mesh: Mesh | None = None,
                     rules: Sequence[tuple[str, Any]] = ()) -> VisionEncoder:
  """A transformers `CLIPVisionModel` directory as a `VisionEncoder` giving its penultimate
  layer's states; the normalisation comes from `processor_dir`'s preprocessor_config.json
  (a `CLIPImageProcessor`'s; CLIP's own when None)."""
  processor = None
  if processor_dir is not None:
    processor = read_json(processor_dir, "preprocessor_config.json")
  cfg = clip.vision_config_from_hf(read_config(model_dir), processor)
  return load_module(model_dir, lambda: VisionEncoder(cfg, rngs=nnx.Rngs(0)),
                     clip.vision_mapping(cfg), what="CLIP image encoder", mesh=mesh,
                     rules=rules, ignore=clip.unused_tensors(cfg), key=(VisionEncoder, cfg))


def load_sentencepiece_tokenizer(path: str) -> Tokenizer:
  """A T5/UMT5 tokenizer from its `spiece.model` (or a directory holding one).

  Ids are sentencepiece's, with T5's conventions (0 pad, 1 end of sequence, appended to
  every text), which is what transformers' T5 tokenizers produce.
  """
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "spiece.model")):
      raise FileNotFoundError(f"{path!r} has no spiece.model: sora_jax reads the sentencepiece "
                              "model (Wan's and UMT5's tokenizer directories ship one next to "
                              "tokenizer.json).")
    path = os.path.join(path, "spiece.model")
  tokenizer = Tokenizer(path)
  sp = tokenizer.processor
  if (sp.pad_id(), sp.eos_id()) != (0, 1):
    raise ValueError(f"{path!r}: pad/eos ids are {sp.pad_id()}/{sp.eos_id()}; sora_jax's "
                     "tokenizer (like T5's) needs pad 0 and end-of-sequence 1.")
  return tokenizer
