"""Wan 2.1's video VAE (diffusers `AutoencoderKLWan`) as a sora_jax `VideoVAE`: config
translation and the parameter mapping.

`VideoVAE` with `norm="l2"`, `resample="wan"`, `mid_attention`, `quant_convs` and
`clip_output` computes what `AutoencoderKLWan` computes; diffusers encodes frame 0 and
then 4 frames at a time (and decodes one latent frame at a time) with feature caches,
which gives the same result as our whole-video pass (see `sora_jax.models.vae`).
The latent statistics (`latents_mean`, `latents_std`) become the VAE's normalisation.

Wan 2.2's residual VAE (`is_residual`, `patch_size=2`, a wider decoder: TI2V-5B's) adds
`residual_stages`, `patch` and `decoder_channels`. Its pixel patches are folded into
channels in the order (channel, column, row), ours in (row, column, channel): the
mapping reorders the first convolution's inputs and the last one's outputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sora_jax.interop import tensors
from sora_jax.interop.tensors import CONV1X1_AS_DENSE, SAME, Tensor
from sora_jax.models.vae import VAEConfig


# The config.json architecture keys of the published Wan VAEs (Wan2.1-*-Diffusers/vae:
# diffusers' defaults; Wan2.2-TI2V-5B-Diffusers/vae: the residual VAE).
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "2.1": {"_class_name": "AutoencoderKLWan"},
    "2.2": {"_class_name": "AutoencoderKLWan", "base_dim": 160, "decoder_base_dim": 256,
            "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
            "temperal_downsample": [False, True, True], "is_residual": True, "patch_size": 2,
            "in_channels": 12, "out_channels": 12, "scale_factor_spatial": 16,
            "scale_factor_temporal": 4},
}


def vae_config_from_diffusers(config: dict[str, Any]) -> VAEConfig:
  """The `VAEConfig` of a diffusers `AutoencoderKLWan` config.json."""
  if config.get("attn_scales"):
    raise ValueError(f"AutoencoderKLWan attn_scales={config['attn_scales']}: attention inside "
                     "the down/up stages is not supported (Wan 2.1 has none).")
  base = int(config.get("base_dim", 96))
  decoder_base = int(config.get("decoder_base_dim") or base)
  residual = bool(config.get("is_residual"))
  patch = int(config.get("patch_size") or 1)
  if decoder_base != base and not residual:
    raise ValueError("AutoencoderKLWan decoder_base_dim must equal base_dim unless is_residual "
                     "(Wan 2.2).")
  mult = [int(m) for m in config.get("dim_mult", [1, 2, 4, 4])]
  time = [bool(t) for t in config.get("temperal_downsample", [False, True, True])]
  stages = len(mult) - 1
  ft = 2 ** sum(time)
  if time != [i >= stages - sum(time) for i in range(stages)]:
    raise ValueError(f"AutoencoderKLWan temperal_downsample={time}: sora_jax downsamples time "
                     "on the last stages.")
  pixels = 3 * patch * patch
  if config.get("in_channels", 3) != pixels or config.get("out_channels", 3) != pixels:
    raise ValueError(f"AutoencoderKLWan in_channels/out_channels must be {pixels} (RGB videos "
                     f"in patches of {patch}x{patch}); got {config.get('in_channels', 3)} and "
                     f"{config.get('out_channels', 3)}.")
  fs = patch * 2 ** stages
  decoder = tuple(decoder_base * m for m in mult)
  return VAEConfig(compression=(ft, fs, fs), latent_channels=int(config.get("z_dim", 16)),
                   channels=tuple(base * m for m in mult),
                   num_res_blocks=int(config.get("num_res_blocks", 2)), patch=patch, norm="l2",
                   resample="wan", mid_attention=True, quant_convs=True, clip_output=True,
                   residual_stages=residual,
                   decoder_channels=None if decoder_base == base else decoder)


def diffusers_config_from_vae(cfg: VAEConfig, latents_mean: Sequence[float],
                              latents_std: Sequence[float]) -> dict[str, Any]:
  """The `AutoencoderKLWan` config.json of a Wan-configured `VAEConfig`."""
  wan = dict(norm="l2", resample="wan", mid_attention=True, quant_convs=True, clip_output=True,
             factorized=False, shortcuts=False, in_channels=3)
  for key, value in wan.items():
    if getattr(cfg, key) != value:
      raise ValueError(f"not a Wan-architecture VAE: vae.{key}={getattr(cfg, key)!r}.")
  base = cfg.channels[0]
  mult = [c // base for c in cfg.channels]
  decoder_base = (cfg.decoder_channels or cfg.channels)[0]
  if [c * base for c in mult] != list(cfg.channels) or [decoder_base * m for m in mult] != list(
      cfg.decoder_channels or cfg.channels):
    raise ValueError(f"not a Wan-architecture VAE: vae.channels={cfg.channels} and "
                     f"vae.decoder_channels={cfg.decoder_channels} must be multiples of their "
                     "first width by the same factors.")
  if decoder_base != base and not cfg.residual_stages:
    raise ValueError("not a Wan-architecture VAE: a different decoder width needs "
                     "vae.residual_stages (Wan 2.2).")
  pixels = 3 * cfg.patch ** 2
  return {"_class_name": "AutoencoderKLWan", "base_dim": base, "decoder_base_dim": decoder_base,
          "z_dim": cfg.latent_channels, "dim_mult": mult, "num_res_blocks": cfg.num_res_blocks,
          "attn_scales": [], "temperal_downsample": [t for t, _ in cfg.stage_downsampling],
          "dropout": 0.0, "latents_mean": [float(v) for v in latents_mean],
          "latents_std": [float(v) for v in latents_std], "is_residual": cfg.residual_stages,
          "in_channels": pixels, "out_channels": pixels,
          "patch_size": cfg.patch if cfg.patch > 1 else None,
          "scale_factor_temporal": cfg.compression[0], "scale_factor_spatial": cfg.compression[1]}


def _conv(ours: tuple, theirs: str, layout: tensors.Layout) -> list[Tensor]:
  return [Tensor(ours + ("kernel",), f"{theirs}.weight", layout),
          Tensor(ours + ("bias",), f"{theirs}.bias", SAME)]


def _norm(ours: tuple, theirs: str, channels: int, images: bool = False) -> Tensor:
  shape = (channels, 1, 1) if images else (channels, 1, 1, 1)
  return Tensor(ours + ("scale",), f"{theirs}.gamma", tensors.flatten_channels(), shape)


def _resnet(ours: tuple, theirs: str, c_in: int, c_out: int) -> list[Tensor]:
  conv3 = tensors.conv(3)
  m = [_norm(ours + ("norm1",), f"{theirs}.norm1", c_in),
       *_conv(ours + ("conv1", "conv"), f"{theirs}.conv1", conv3),
       _norm(ours + ("norm2",), f"{theirs}.norm2", c_out),
       *_conv(ours + ("conv2", "conv"), f"{theirs}.conv2", conv3)]
  if c_in != c_out:
    m += _conv(ours + ("shortcut", "conv"), f"{theirs}.conv_shortcut", conv3)
  return m


def _mid(ours: tuple, theirs: str, c: int) -> list[Tensor]:
  return [*_resnet(ours + ("mid", 0), f"{theirs}.mid_block.resnets.0", c, c),
          _norm(ours + ("mid_attention", "norm"), f"{theirs}.mid_block.attentions.0.norm", c,
                images=True),
          *_conv(ours + ("mid_attention", "qkv"), f"{theirs}.mid_block.attentions.0.to_qkv",
                 CONV1X1_AS_DENSE),
          *_conv(ours + ("mid_attention", "proj"), f"{theirs}.mid_block.attentions.0.proj",
                 CONV1X1_AS_DENSE),
          *_resnet(ours + ("mid", 1), f"{theirs}.mid_block.resnets.1", c, c)]


def patch_order(patch: int, channels: int = 3) -> np.ndarray:
  """For each of our patch channels `(row, column, channel)`, its index in diffusers'
  `patchify` order `(channel, column, row)`: `[patch * patch * channels]`."""
  return np.array([c * patch * patch + col * patch + row for row in range(patch)
                   for col in range(patch) for c in range(channels)])


def vae_mapping(cfg: VAEConfig) -> list[Tensor]:
  """Every parameter of `VideoVAE(cfg)` and its `AutoencoderKLWan` name."""
  conv3, conv2 = tensors.conv(3), tensors.conv2d_as_3d()
  ch, nrb = cfg.channels, cfg.num_res_blocks
  dec = cfg.decoder_channels or ch
  downsampling = cfg.stage_downsampling
  residual = cfg.residual_stages
  order = patch_order(cfg.patch, cfg.in_channels)
  # Encoder: conv_in, then per stage its resnets and a resample (Wan 2.1: flat in
  # down_blocks; Wan 2.2: one residual down block per stage).
  m = [Tensor(("encoder", "conv_in", "conv", "kernel"), "encoder.conv_in.weight",
              tensors.permuted(conv3, 3, order)),
       Tensor(("encoder", "conv_in", "conv", "bias"), "encoder.conv_in.bias")]
  k, prev = 0, ch[0]
  for i, width in enumerate(ch):
    for r in range(nrb):
      theirs = f"encoder.down_blocks.{i}.resnets.{r}" if residual else f"encoder.down_blocks.{k}"
      m += _resnet(("encoder", "blocks", i * nrb + r), theirs, prev, width)
      prev, k = width, k + 1
    if i < len(ch) - 1:
      t = f"encoder.down_blocks.{i}.downsampler" if residual else f"encoder.down_blocks.{k}"
      m += _conv(("encoder", "downs", i, "spatial", "conv"), f"{t}.resample.1", conv2)
      if downsampling[i][0]:
        m += _conv(("encoder", "downs", i, "temporal"), f"{t}.time_conv", conv3)
      k += 1
  m += _mid(("encoder",), "encoder", prev)
  m += [_norm(("encoder", "norm_out"), "encoder.norm_out", prev),
        *_conv(("encoder", "conv_out", "conv"), "encoder.conv_out", conv3),
        *_conv(("encoder", "quant_conv", "conv"), "quant_conv", conv3)]
  # Decoder: post_quant_conv, conv_in, mid, then up_blocks of resnets and an upsampler.
  rch = tuple(reversed(dec))
  m += _conv(("decoder", "post_quant_conv", "conv"), "post_quant_conv", conv3)
  m += _conv(("decoder", "conv_in", "conv"), "decoder.conv_in", conv3)
  m += _mid(("decoder",), "decoder", rch[0])
  prev = rch[0]
  for i, width in enumerate(rch):
    for r in range(nrb + 1):
      m += _resnet(("decoder", "blocks", i * (nrb + 1) + r), f"decoder.up_blocks.{i}.resnets.{r}",
                   prev, width)
      prev = width
    if i < len(rch) - 1:
      t = f"decoder.up_blocks.{i}.upsampler" if residual else f"decoder.up_blocks.{i}.upsamplers.0"
      m += _conv(("decoder", "ups", i, "spatial", "conv"), f"{t}.resample.1", conv2)
      if downsampling[len(ch) - 2 - i][0]:
        m += _conv(("decoder", "ups", i, "temporal", "conv"), f"{t}.time_conv", conv3)
      prev = width if residual else width // 2
  m += [_norm(("decoder", "norm_out"), "decoder.norm_out", prev),
        Tensor(("decoder", "conv_out", "conv", "kernel"), "decoder.conv_out.weight",
               tensors.permuted(conv3, 4, order)),
        Tensor(("decoder", "conv_out", "conv", "bias"), "decoder.conv_out.bias",
               tensors.permuted(SAME, 0, order))]
  return m


def latent_stats(config: dict[str, Any], channels: int) -> tuple[np.ndarray, np.ndarray]:
  """`(mean, std)` `[Z]` float32 of an `AutoencoderKLWan` config (0 and 1 when absent)."""
  mean = np.asarray(config.get("latents_mean") or [0.0] * channels, np.float32)
  std = np.asarray(config.get("latents_std") or [1.0] * channels, np.float32)
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(f"AutoencoderKLWan latents_mean/latents_std must have z_dim={channels} "
                     f"values; got {mean.shape[0]} and {std.shape[0]}.")
  return mean, std
