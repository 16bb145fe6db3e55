"""LoRA adapters for Wan transformers in the community's files, merged into the weights.

A LoRA adapts a linear layer `y = W x + b` to `y = (W + s * (alpha / r) * B A) x + b`,
with `A` `[r, in]` ("lora_A" / "lora_down"), `B` `[out, r]` ("lora_B" / "lora_up"),
`alpha / r` the adapter's own scale and `s` the strength chosen at sampling time. Two
namings are read:

- diffusers / PEFT (`WanPipeline.save_lora_weights`, `load_lora_weights`):
  `transformer.blocks.0.attn1.to_q.lora_A.weight`, `...lora_B.weight` (optionally
  `...lora_B.bias`), with `lora_alpha` / `r` (and per-module `alpha_pattern`) in the
  file's `lora_adapter_metadata`; without it alpha = r, as diffusers assumes.
- original Wan / ComfyUI / musubi-tuner: `diffusion_model.blocks.0.self_attn.q.lora_down.weight`,
  `...lora_up.weight`, `...alpha` (a scalar), `...diff_b` (a bias change).

Both are brought to diffusers' module names (`Adapter.module`), which
`sora_jax.interop.wan.transformer_mapping` ties to the parameters of
`DiffusionTransformer`. Merging is exact (float32 on the host, then the parameter's
dtype), so several files stack by adding their changes at their own strengths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sora_jax import configs
from sora_jax.interop import tensors
from sora_jax.interop.tensors import CheckpointMismatch
from sora_jax.interop.wan import transformer_mapping
from sora_jax.models.dit import DiTConfig

METADATA_KEY = "lora_adapter_metadata"   # diffusers' safetensors metadata entry
WEIGHT_NAME = "pytorch_lora_weights.safetensors"   # diffusers' file name of a LoRA
PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")

# Original Wan module names -> diffusers' (`<i>` a block index).
_ORIGINAL_TO_DIFFUSERS = (
    (r"blocks\.(\d+)\.self_attn\.q", r"blocks.\1.attn1.to_q"),
    (r"blocks\.(\d+)\.self_attn\.k", r"blocks.\1.attn1.to_k"),
    (r"blocks\.(\d+)\.self_attn\.v", r"blocks.\1.attn1.to_v"),
    (r"blocks\.(\d+)\.self_attn\.o", r"blocks.\1.attn1.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.q", r"blocks.\1.attn2.to_q"),
    (r"blocks\.(\d+)\.cross_attn\.k", r"blocks.\1.attn2.to_k"),
    (r"blocks\.(\d+)\.cross_attn\.v", r"blocks.\1.attn2.to_v"),
    (r"blocks\.(\d+)\.cross_attn\.o", r"blocks.\1.attn2.to_out.0"),
    (r"blocks\.(\d+)\.ffn\.0", r"blocks.\1.ffn.net.0.proj"),
    (r"blocks\.(\d+)\.ffn\.2", r"blocks.\1.ffn.net.2"),
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    (r"time_projection\.1", "condition_embedder.time_proj"),
    (r"head\.head", "proj_out"),
)
# The suffixes of one adapter's tensors in either naming -> its field.
_FIELDS = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up",
           "lora_up.weight": "up", "lora_B.bias": "bias", "diff_b": "diff_b", "alpha": "alpha"}


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One adapted linear layer, `module` in diffusers' naming (`blocks.0.attn1.to_q`).

  down `[r, in]`, up `[out, r]`, scale `alpha / r`; bias `[out]` is a change of the
  layer's bias at strength 1 (already scaled), or None."""
  module: str
  down: np.ndarray
  up: np.ndarray
  scale: float
  bias: np.ndarray | None = None

  @property
  def rank(self) -> int:
    return self.down.shape[0]

  def kernel_delta(self) -> np.ndarray:
    """The change of our kernel `[in, out]` (torch's weight transposed) at strength 1."""
    return self.scale * (self.up.astype(np.float64) @ self.down.astype(np.float64)).T


def original_to_diffusers(module: str) -> str | None:
  """An original-Wan module name in diffusers' naming (None when it is not one)."""
  for pattern, replacement in _ORIGINAL_TO_DIFFUSERS:
    if re.fullmatch(pattern, module):
      return re.sub(pattern, replacement, module)
  return None


def _split_name(name: str) -> tuple[str, str] | None:
  """`<prefix><module>.<suffix>` -> (module, field) for a LoRA tensor name, else None."""
  for suffix, field in _FIELDS.items():
    if name.endswith("." + suffix):
      module = name[:-len(suffix) - 1]
      for prefix in PREFIXES:
        if module.startswith(prefix):
          module = module[len(prefix):]
          break
      return module, field
  return None


def _metadata_alphas(metadata: dict[str, str] | None) -> tuple[float | None, dict[str, float]]:
  """(lora_alpha, alpha_pattern) of diffusers' `lora_adapter_metadata`, if present."""
  raw = (metadata or {}).get(METADATA_KEY)
  if not raw:
    return None, {}
  meta = json.loads(raw)
  meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
  alpha = meta.get("lora_alpha")
  return (None if alpha is None else float(alpha),
          {k: float(v) for k, v in (meta.get("alpha_pattern") or {}).items()})


def _pattern_alpha(module: str, patterns: dict[str, float]) -> float | None:
  """PEFT's `alpha_pattern` lookup: a key matches a module name or a dotted suffix of it."""
  for pattern, alpha in patterns.items():
    if re.match(rf"(.*\.)?({pattern})$", module):
      return alpha
  return None


def read_wan_lora(path: str) -> list[Adapter]:
  """The adapters of a LoRA `.safetensors` file in diffusers/PEFT or original-Wan/ComfyUI
  naming. Raises `CheckpointMismatch` naming tensors that are no LoRA tensor, adapters
  missing their down or up matrix, and ranks that disagree; FileNotFoundError if absent."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no LoRA file at {path!r}.")
  try:
    handle = safe_open(path, framework="numpy")
  except Exception as e:  # safetensors raises its own error types for a foreign file
    raise CheckpointMismatch(f"{path!r} is not a safetensors file ({e}).") from e
  alpha, alpha_pattern = _metadata_alphas(handle.metadata())
  parts: dict[str, dict[str, np.ndarray]] = {}
  foreign = []
  for name in handle.keys():
    split = _split_name(name)
    if split is None:
      foreign.append(name)
      continue
    module, field = split
    module = original_to_diffusers(module) or module
    parts.setdefault(module, {})[field] = handle.get_tensor(name)
  if foreign:
    raise CheckpointMismatch(f"LoRA file {path!r}: {len(foreign)} tensors are no LoRA "
                             f"tensor (lora_A/lora_B/lora_down/lora_up/alpha/diff_b): "
                             f"{sorted(foreign)[:8]}")
  adapters, broken = [], []
  for module, p in sorted(parts.items()):
    if "down" not in p or "up" not in p:
      broken.append(f"{module}: has {sorted(p)}, needs both the down (lora_A) and up "
                    f"(lora_B) matrices")
      continue
    down, up = p["down"].astype(np.float32), p["up"].astype(np.float32)
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
      broken.append(f"{module}: down {down.shape} and up {up.shape} are no rank-r pair "
                    f"([r, in] and [out, r])")
      continue
    rank = down.shape[0]
    if "alpha" in p:
      module_alpha = float(np.asarray(p["alpha"]).reshape(()))
    else:
      module_alpha = _pattern_alpha(module, alpha_pattern)
      module_alpha = module_alpha if module_alpha is not None else (alpha or float(rank))
    # PEFT scales a lora_B bias like B; an original diff_b is added as it is.
    bias = p["bias"] * (module_alpha / rank) if "bias" in p else p.get("diff_b")
    adapters.append(Adapter(module, down, up, module_alpha / rank,
                            None if bias is None else bias.astype(np.float32)))
  if broken:
    raise CheckpointMismatch(f"LoRA file {path!r}: " + "; ".join(broken[:8]))
  return adapters


def linear_index(cfg: DiTConfig) -> dict[str, tuple[tuple, int | None]]:
  """diffusers module name of each linear layer of `DiffusionTransformer(cfg)` -> (the
  path of its kernel in our parameters, its layer index when stacked by `scan_layers`)."""
  index = {}
  for t in transformer_mapping(cfg):
    if t.layout is not tensors.LINEAR:
      continue
    for layer, name in enumerate(t.names):
      index[name.removesuffix(".weight")] = (t.path, layer if t.stacked else None)
  return index


def merge_wan_lora(dit_params: Any, cfg: DiTConfig, adapters: Sequence[Adapter],
                   strength: float = 1.0, *, what: str = "LoRA") -> Any:
  """`dit_params` (a pure dict, `DiffusionTransformer(cfg)`'s) with `adapters` merged at
  `strength`. Raises `CheckpointMismatch` naming adapters of layers the model lacks and
  adapters whose shapes do not fit their layer; nothing is changed then."""
  index = linear_index(cfg)
  leaves = tensors.path_leaves(dit_params)
  unknown, wrong, changes = [], [], []
  for a in adapters:
    if a.module not in index:
      unknown.append(a.module)
      continue
    path, layer = index[a.module]
    kernel = leaves[path]
    shape = tuple(kernel.shape[1:] if layer is not None else kernel.shape)
    want = (shape[1], shape[0])                        # torch's [out, in]
    if (a.up.shape[0], a.down.shape[1]) != want or (
        a.bias is not None and a.bias.shape != (shape[1],)):
      wrong.append(f"{a.module}: down {a.down.shape}, up {a.up.shape}"
                   + (f", bias {a.bias.shape}" if a.bias is not None else "")
                   + f" do not fit its weight [out, in] = {list(want)}")
      continue
    changes.append((a, path, layer))
  problems = []
  if unknown:
    problems.append(f"adapters of layers the model does not have {unknown[:8]}"
                    + (" ..." if len(unknown) > 8 else ""))
  problems.extend(f"wrong shape: {w}" for w in wrong[:8])
  if problems:
    raise CheckpointMismatch(f"{what} does not fit the transformer: " + "; ".join(problems))
  out = dict(leaves)
  for a, path, layer in changes:
    out[path] = _add(out[path], strength * a.kernel_delta(), layer)
    if a.bias is not None:
      bias_path = path[:-1] + ("bias",)
      out[bias_path] = _add(out[bias_path], strength * a.bias.astype(np.float64), layer)
  merged: dict = {}
  for path, value in out.items():
    tensors.set_path(merged, path, value)
  return merged


def _add(param: Any, delta: np.ndarray, layer: int | None) -> Any:
  """`param + delta` (at `param[layer]` when stacked), computed in float32, kept in
  `param`'s dtype and sharding."""
  delta = jnp.asarray(delta, jnp.float32)
  if layer is None:
    return (param.astype(jnp.float32) + delta).astype(param.dtype)
  return param.at[layer].set((param[layer].astype(jnp.float32) + delta).astype(param.dtype))


def merge_lora_files(config: Any, vocab_size: int, params: Any,
                     loras: Sequence[tuple[str, float]],
                     loras_low: Sequence[tuple[str, float]] = ()) -> Any:
  """A run's parameters (`{"dit": ..., ...}`, `train.restore.restore_params`'s) with the
  LoRA files of `loras` (`(path, strength)` pairs) merged into the transformer (the
  high-noise expert of a two-expert model), in order, and those of `loras_low` into the
  low-noise expert (`low_noise_dit`, Wan 2.2 A14B's `transformer_2`: LoRAs for it are
  shared as the second file of a pair). Each file is checked whole before anything is
  merged (see `merge_wan_lora`)."""
  if not loras and not loras_low:
    return params
  if loras_low and "low_noise_dit" not in params:
    raise ValueError("low-noise LoRA files (--lora-low) are for a model with two experts "
                     "(Wan 2.2 A14B's transformer_2); this model has one transformer.")
  cfg = wan_dit_config(config, vocab_size)
  out = dict(params)
  for name, files in (("dit", loras), ("low_noise_dit", loras_low)):
    for path, strength in files:
      out[name] = merge_wan_lora(out[name], cfg, read_wan_lora(path), strength,
                                 what=f"LoRA {path!r}")
  return out


def wan_dit_config(config: Any, vocab_size: int) -> DiTConfig:
  """The `DiTConfig` of a run's transformer; ValueError unless it is Wan's architecture
  (the one diffusers' and the original-Wan LoRA naming describe)."""
  text_width = configs.text_encoder_config(config, vocab_size).width
  cfg = configs.dit_config(config, text_width=text_width,
                           in_channels=configs.latent_channels(config.autoencoder))
  if cfg.modulation != "shared":
    raise ValueError("LoRA files in diffusers or original-Wan naming are for Wan transformers "
                     f"(model.modulation='shared'); this run's modulation is "
                     f"{cfg.modulation!r}.")
  return cfg


def wan_lora_tensors(adapters: Any, cfg: DiTConfig) -> tuple[dict[str, np.ndarray], list[str]]:
  """`(tensors, modules)`: a LoRA run's transformer adapters (a pure dict of `lora_a
  [(L,) in, r]` / `lora_b [(L,) r, out]` leaves, `models.lora`) in diffusers' naming,
  `transformer.<module>.lora_A.weight [r, in]` and `...lora_B.weight [out, r]`, and the
  adapted modules. ValueError naming adapters of layers diffusers' Wan has no name for."""
  leaves = tensors.path_leaves(adapters)
  out, modules, used = {}, [], set()
  for t in transformer_mapping(cfg):
    if t.layout is not tensors.LINEAR:
      continue
    a_path, b_path = t.path[:-1] + ("lora_a",), t.path[:-1] + ("lora_b",)
    if a_path not in leaves:
      continue
    used |= {a_path, b_path}
    a, b = np.asarray(leaves[a_path], np.float32), np.asarray(leaves[b_path], np.float32)
    for layer, name in enumerate(t.names):
      module = name.removesuffix(".weight")
      down, up = (a[layer], b[layer]) if t.stacked else (a, b)
      out[f"transformer.{module}.lora_A.weight"] = np.ascontiguousarray(down.T)
      out[f"transformer.{module}.lora_B.weight"] = np.ascontiguousarray(up.T)
      modules.append(module)
  unnamed = sorted(tensors.path_str(p) for p in set(leaves) - used)
  if unnamed:
    raise ValueError(f"adapters {unnamed[:6]} adapt layers diffusers' Wan transformer has "
                     "no LoRA name for.")
  return out, modules


def save_wan_lora(adapters: Any, cfg: DiTConfig, rank: int, alpha: float, directory: str
                  ) -> str:
  """Writes the adapters as `WanPipeline.save_lora_weights` does:
  `<directory>/pytorch_lora_weights.safetensors` (diffusers' default name, so
  `pipe.load_lora_weights(directory)` finds it) with rank, alpha and the target modules in
  its `lora_adapter_metadata`. Returns the file's path."""
  weights, modules = wan_lora_tensors(adapters, cfg)
  metadata = {"transformer.r": rank, "transformer.lora_alpha": alpha,
              "transformer.target_modules": modules}
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, WEIGHT_NAME)
  save_file(weights, path, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)})
  return path
