"""transformers' `CLIPVisionModel` as a sora_jax `VisionEncoder`: config translation and
the parameter mapping.

Wan 2.1's image-to-video pipelines read the penultimate layer's states
(`hidden_states[-2]`), so the encoder is built with one layer fewer than the checkpoint
has; the last layer, the post-norm and a projection head (`CLIPVisionModelWithProjection`)
are left unread (`unused_tensors`). Checkpoints name tensors under `vision_model.`
(transformers 4, as Wan ships them) or without it (transformers 5 saves them so); both
are read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sora_jax.interop import tensors
from sora_jax.interop.tensors import Layout, Tensor
from sora_jax.models.vision import CLIP_MEAN, CLIP_STD, VisionConfig

_PREFIX = "vision_model"


def vision_config_from_hf(config: dict[str, Any],
                          processor: dict[str, Any] | None = None) -> VisionConfig:
  """The `VisionConfig` of a `CLIPVisionModel` config.json (and its preprocessor_config.json:
  the normalisation), running all layers but the last."""
  if config.get("model_type") not in (None, "clip_vision_model", "clip"):
    raise ValueError(f"image encoder config: model_type={config.get('model_type')!r}, "
                     "expected a CLIP vision model (clip_vision_model).")
  config = config.get("vision_config", config)   # a full CLIPModel config nests it
  layers = int(config["num_hidden_layers"])
  if layers < 2:
    raise ValueError(f"image encoder config: {layers} layer(s); the penultimate layer's "
                     "states need at least 2.")
  processor = processor or {}
  return VisionConfig(
      width=int(config["hidden_size"]), depth=layers - 1,
      heads=int(config["num_attention_heads"]), mlp_width=int(config["intermediate_size"]),
      patch=int(config["patch_size"]), image_size=int(config["image_size"]),
      activation=config.get("hidden_act", "quick_gelu"),
      eps=float(config.get("layer_norm_eps", 1e-5)),
      mean=tuple(float(x) for x in processor.get("image_mean", CLIP_MEAN)),
      std=tuple(float(x) for x in processor.get("image_std", CLIP_STD)))


def _patch_conv2d(patch: int) -> Layout:
  """torch Conv2d `[D, 3, p, p]` (kernel = stride = patch) <-> a dense kernel `[p*p*3, D]`
  over `(ph pw c)`-ordered patches."""
  def to_theirs(a):
    return a.reshape(patch, patch, 3, -1).transpose(3, 2, 0, 1)
  return Layout("patch_conv2d", lambda a: a.transpose(2, 3, 1, 0).reshape(-1, a.shape[0]),
                to_theirs)


def _with_aliases(mapping: list[Tensor]) -> list[Tensor]:
  """Each name also without the `vision_model.` prefix (transformers 5's files)."""
  return [dataclasses.replace(t, aliases=(t.name[len(_PREFIX) + 1:],)) for t in mapping]


def _layer(i: int) -> list[Tensor]:
  """Encoder layer i's parameters (`layers.i`) and their names."""
  ours, t = ("layers", i), f"{_PREFIX}.encoder.layers.{i}"
  m = []
  for mine, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
    m += tensors.linear(ours + ("attn", mine), f"{t}.self_attn.{theirs}")
  m += tensors.layer_norm(ours + ("norm1",), f"{t}.layer_norm1")
  m += tensors.layer_norm(ours + ("norm2",), f"{t}.layer_norm2")
  m += tensors.linear(ours + ("mlp", "fc1"), f"{t}.mlp.fc1")
  m += tensors.linear(ours + ("mlp", "fc2"), f"{t}.mlp.fc2")
  return m


def vision_mapping(cfg: VisionConfig) -> list[Tensor]:
  """Every parameter of `VisionEncoder(cfg)` and its `CLIPVisionModel` name."""
  e = f"{_PREFIX}.embeddings"
  m = [Tensor(("patch_embed", "kernel"), f"{e}.patch_embedding.weight", _patch_conv2d(cfg.patch)),
       Tensor(("class_token",), f"{e}.class_embedding"),
       Tensor(("positions",), f"{e}.position_embedding.weight")]
  m += tensors.layer_norm(("norm_pre",), f"{_PREFIX}.pre_layrnorm")
  for i in range(cfg.depth):
    m += _layer(i)
  return _with_aliases(m)


def unused_tensors(cfg: VisionConfig) -> set[str]:
  """The checkpoint tensors the penultimate-layer encoder does not read, under both
  namings: the last layer, the post-norm, a projection head and the position-id buffer."""
  rest = _layer(cfg.depth) + tensors.layer_norm((), f"{_PREFIX}.post_layernorm") + [
      Tensor((), f"{_PREFIX}.embeddings.position_ids")]
  return {n for t in _with_aliases(rest) for n in t.names + t.aliases} | {
      "visual_projection.weight"}
