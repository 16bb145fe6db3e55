"""Wan 2.1's diffusion transformer (diffusers `WanTransformer3DModel`) as a sora_jax
`DiffusionTransformer`: config translation and the parameter mapping.

Wan 2.1 is a Sora-style spacetime DiT; every part of it is an option of
`sora_jax.models.dit` (shared modulation, text MLP, QK RMSNorm across heads, affine
cross-attention norm, zero-padded text), so its weights load into the generic module.
The image-to-video variants (`image_dim`, `added_kv_proj_dim`, and `pos_embed_seq_len`
for first-last-frame) are its image branch (`DiTConfig.image_width`), and their extra
input channels (`in_channels - out_channels`: the frame mask and the given frames'
latents) its conditioning input (`DiTConfig.cond_channels`).
"""

from __future__ import annotations

from typing import Any

from sora_jax.interop import tensors
from sora_jax.interop.tensors import SQUEEZE0, Tensor
from sora_jax.models.dit import DiTConfig

_QK_NORM = {"rms_norm_across_heads": "rms_across_heads", None: "none"}


def dit_config_from_diffusers(config: dict[str, Any], *, scan_layers: bool = False,
                              remat: str = "none") -> DiTConfig:
  """The `DiTConfig` of a diffusers `WanTransformer3DModel` config.json."""
  qk = config.get("qk_norm", "rms_norm_across_heads")
  if qk not in _QK_NORM:
    raise ValueError(f"Wan transformer config: qk_norm={qk!r} is not supported "
                     f"(expected one of {list(_QK_NORM)}).")
  heads = int(config["num_attention_heads"])
  width = heads * int(config["attention_head_dim"])
  image_width = int(config.get("image_dim") or 0)
  added = config.get("added_kv_proj_dim")
  if bool(image_width) != bool(added) or (added and int(added) != width):
    raise ValueError(f"Wan transformer config: image_dim={config.get('image_dim')} with "
                     f"added_kv_proj_dim={added}; sora_jax's image branch needs both, the "
                     f"latter equal to the width {width}.")
  if image_width and _QK_NORM[qk] == "none":
    raise ValueError("Wan transformer config: an image branch needs qk_norm (its image keys "
                     "are RMS-normalised).")
  out = config.get("out_channels") or config["in_channels"]
  if out > config["in_channels"]:
    raise ValueError(f"Wan transformer config: out_channels={out} exceeds in_channels="
                     f"{config['in_channels']}; the extra input channels are the conditioning.")
  return DiTConfig(
      width=width, depth=int(config["num_layers"]),
      heads=heads, patch=tuple(int(p) for p in config["patch_size"]),
      in_channels=int(out), cond_channels=int(config["in_channels"]) - int(out),
      image_width=image_width, image_positions=int(config.get("pos_embed_seq_len") or 0),
      text_width=int(config["text_dim"]),
      mlp_hidden=int(config["ffn_dim"]), qk_norm=_QK_NORM[qk], modulation="shared",
      text_projection="mlp", cross_attn_norm=bool(config.get("cross_attn_norm", True)),
      rope_theta=10000.0, freq_dim=int(config.get("freq_dim", 256)), timestep_scale=1000.0,
      eps=float(config.get("eps", 1e-6)), text_padding="zeros", scan_layers=scan_layers,
      remat=remat)


def diffusers_config_from_dit(cfg: DiTConfig) -> dict[str, Any]:
  """The diffusers config.json of a Wan-architecture `DiTConfig` (raises ValueError for
  sora_jax options Wan does not have)."""
  wan_options = {"modulation": "shared", "text_projection": "mlp", "text_padding": "zeros",
                 "timestep_scale": 1000.0, "rope_theta": 10000.0}
  for key, value in wan_options.items():
    if getattr(cfg, key) != value:
      raise ValueError(f"not a Wan-architecture transformer: model.{key}="
                       f"{getattr(cfg, key)!r}, Wan has {value!r}.")
  if cfg.qk_norm not in ("rms_across_heads", "none"):
    raise ValueError(f"not a Wan-architecture transformer: qk_norm={cfg.qk_norm!r}.")
  return {
      "_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch),
      "num_attention_heads": cfg.heads, "attention_head_dim": cfg.width // cfg.heads,
      "in_channels": cfg.in_channels + cfg.cond_channels, "out_channels": cfg.in_channels,
      "text_dim": cfg.text_width, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.mlp_width,
      "num_layers": cfg.depth, "cross_attn_norm": cfg.cross_attn_norm,
      "qk_norm": "rms_norm_across_heads" if cfg.qk_norm == "rms_across_heads" else None,
      "eps": cfg.eps, "image_dim": cfg.image_width or None,
      "added_kv_proj_dim": cfg.width if cfg.image_width else None, "rope_max_seq_len": 1024,
      "pos_embed_seq_len": cfg.image_positions or None}


def _attention(ours: tuple, theirs: str, qk_norm: str, image: bool = False) -> list[Tensor]:
  out = []
  for mine, their in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0")):
    out += tensors.linear(ours + (mine,), f"{theirs}.{their}")
  if qk_norm != "none":
    out += [Tensor(ours + ("norm_q", "scale"), f"{theirs}.norm_q.weight"),
            Tensor(ours + ("norm_k", "scale"), f"{theirs}.norm_k.weight")]
  if image:
    out += tensors.linear(ours + ("image_k",), f"{theirs}.add_k_proj")
    out += tensors.linear(ours + ("image_v",), f"{theirs}.add_v_proj")
    out.append(Tensor(ours + ("norm_image_k", "scale"), f"{theirs}.norm_added_k.weight"))
  return out


def transformer_mapping(cfg: DiTConfig) -> list[Tensor]:
  """Every parameter of `DiffusionTransformer(cfg)` and its `WanTransformer3DModel` name."""
  m = [Tensor(("patch_embed", "kernel"), "patch_embedding.weight", tensors.patch_conv(cfg.patch)),
       Tensor(("patch_embed", "bias"), "patch_embedding.bias")]
  m += tensors.linear(("time_mlp", "fc1"), "condition_embedder.time_embedder.linear_1")
  m += tensors.linear(("time_mlp", "fc2"), "condition_embedder.time_embedder.linear_2")
  m += tensors.linear(("time_proj",), "condition_embedder.time_proj")
  m += tensors.linear(("text_proj", "fc1"), "condition_embedder.text_embedder.linear_1")
  m += tensors.linear(("text_proj", "fc2"), "condition_embedder.text_embedder.linear_2")
  if cfg.image_width:
    e = "condition_embedder.image_embedder"
    m += tensors.layer_norm(("image_proj", "norm_in"), f"{e}.norm1")
    m += tensors.linear(("image_proj", "mlp", "fc1"), f"{e}.ff.net.0.proj")
    m += tensors.linear(("image_proj", "mlp", "fc2"), f"{e}.ff.net.2")
    m += tensors.layer_norm(("image_proj", "norm_out"), f"{e}.norm2")
    if cfg.image_positions:
      m.append(Tensor(("image_proj", "positions"), f"{e}.pos_embed", SQUEEZE0))
  for i in range(cfg.depth):
    b, t = ("blocks", i), f"blocks.{i}"
    m += _attention(b + ("self_attn",), f"{t}.attn1", cfg.qk_norm)
    m += _attention(b + ("cross_attn",), f"{t}.attn2", cfg.qk_norm, image=cfg.image_width > 0)
    if cfg.cross_attn_norm:
      m += tensors.layer_norm(b + ("norm2",), f"{t}.norm2")
    m += tensors.linear(b + ("mlp", "fc1"), f"{t}.ffn.net.0.proj")
    m += tensors.linear(b + ("mlp", "fc2"), f"{t}.ffn.net.2")
    m.append(Tensor(b + ("scale_shift_table",), f"{t}.scale_shift_table", SQUEEZE0))
  m.append(Tensor(("out_table",), "scale_shift_table", SQUEEZE0))
  m += tensors.linear(("proj_out",), "proj_out")
  if cfg.scan_layers:
    m = tensors.stack_layers(m, ("blocks",), cfg.depth)
  return m

