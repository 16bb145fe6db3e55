"""Analytic FLOPs of the model: the numerator of MFU.

Counted: every matrix multiplication (2 FLOPs per multiply-add) of the text encoder and
the diffusion transformer, attention's QK^T and AV included; not counted: norms,
activations, softmax, RoPE and other elementwise work (a few % for small widths,
vanishing for large ones). A training step costs 3x the forward pass (the backward
pass is two matmuls per forward matmul); recomputation under rematerialisation is
not counted, as usual for MFU.

Per example with N spacetime tokens, S text tokens, width D, MLP width M, patch size P
(values per token), L blocks; text encoder width E, MLP width F, depth K:
  block        8 N D^2 (self q,k,v,o) + 4 N^2 D (self scores, values)
             + 4 N D^2 + 4 S D^2 (cross q,o and k,v) + 4 N S D (cross scores, values)
             + 4 N D M (MLP) + 12 D^2 (adaLN, per_block modulation)
  outside      4 N P D (patch embed, output) + 2 S E D + 2 S D^2 (text projection)
               (a neural-field head: 2 N W D + 2 N (P / C) W instead of the output's 2 N P D,
               W its weights per token, `neural_field.field_weights`; an MLP head of
               hidden width H: 2 N H (D + P); with `head_overlap`, P is the grown patch's)
             + 2*256 D + 2 D^2 (timestep MLP) + (12 D^2 shared modulation | 4 D^2 output adaLN)
  text encoder K (8 S E^2 + 4 S^2 E + 6 S E F)
"""

from __future__ import annotations

from sora_jax.models.dit import DiTConfig
from sora_jax.models.neural_field import field_weights
from sora_jax.models.text import TextEncoderConfig


def dit_forward_flops(cfg: DiTConfig, tokens: int, text_tokens: int) -> float:
  """Forward FLOPs of the diffusion transformer for one example."""
  n, s, d, m = tokens, text_tokens, cfg.width, cfg.mlp_width
  block = (8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * s * d * d + 4 * n * s * d
           + 4 * n * d * m)
  if cfg.modulation == "per_block":
    block += 12 * d * d
  outside = (2 * n * cfg.input_patch_dim * d + output_layer_flops(cfg, n)
             + 2 * s * cfg.text_width * d + 2 * cfg.freq_dim * d + 2 * d * d)
  if cfg.text_projection == "mlp":
    outside += 2 * s * d * d
  outside += 12 * d * d if cfg.modulation == "shared" else 4 * d * d
  if cfg.pooled_text:                      # the pooled caption's MLP
    outside += 2 * cfg.text_width * d + 2 * d * d
  return float(cfg.depth * block + outside)


def output_layer_flops(cfg: DiTConfig, tokens: int) -> int:
  """The output layer's forward FLOPs for `tokens` tokens: a linear map to each patch, or
  (`output_head="field"`) to each token's field weights W and every pixel through its
  field, or (`output_head="mlp"`) through its two layers; an overlapping head
  (`head_overlap`) draws `head_patch_dim` values a token (its cross-fade left out)."""
  if cfg.output_head == "mlp":
    return 2 * tokens * cfg.head_hidden * (cfg.width + cfg.head_patch_dim)
  if cfg.output_head != "field":
    return 2 * tokens * cfg.head_patch_dim * cfg.width
  weights = field_weights(cfg.patch, cfg.in_channels + cfg.input_channels_extra, cfg.in_channels,
                          cfg.field_hidden)
  pixels = cfg.patch_dim // cfg.in_channels
  return 2 * tokens * weights * (cfg.width + pixels)


def text_encoder_forward_flops(cfg: TextEncoderConfig, text_tokens: int) -> float:
  """Forward FLOPs of the text encoder for one caption."""
  s, e, f = text_tokens, cfg.width, cfg.mlp_width
  return float(cfg.depth * (8 * s * e * e + 4 * s * s * e + 6 * s * e * f))


def train_step_flops(dit: DiTConfig, text: TextEncoderConfig, tokens: int, text_tokens: int,
                     batch: int, self_condition_rate: float = 0.0, experts: int = 1) -> float:
  """Model FLOPs of one training step (forward + backward) over `batch` examples; a
  self-conditioning transformer (`dit.self_condition`) also runs forward once more, without
  backward, in a share `self_condition_rate` of the steps (counted at that rate).
  `experts`: the transformers every example runs (2 for two experts trained together,
  `train.expert` '')."""
  dit_forward = experts * dit_forward_flops(dit, tokens, text_tokens)
  forward = dit_forward + text_encoder_forward_flops(text, text_tokens)
  extra = self_condition_rate * dit_forward if dit.self_condition else 0.0
  return batch * (3.0 * forward + extra)
