"""The UMT5 / T5 encoder (transformers `UMT5EncoderModel`, `T5EncoderModel`) as a sora_jax
`TextEncoder`: config translation and the parameter mapping.

`sora_jax.models.text.TextEncoder` is T5's encoder with a relative-position bias in
every layer (UMT5's arrangement; T5 shares layer 0's, see `text_encoder_mapping`).
"""

from __future__ import annotations

from typing import Any

from sora_jax.interop.tensors import LINEAR, SAME, Tensor
from sora_jax.models.text import TextEncoderConfig


def text_encoder_config_from_hf(config: dict[str, Any]) -> TextEncoderConfig:
  """The `TextEncoderConfig` of a transformers UMT5/T5 config.json."""
  if config.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
    raise ValueError(f"text encoder config: feed_forward_proj={config['feed_forward_proj']!r}; "
                     "sora_jax's encoder is gated-GELU (UMT5, T5 v1.1).")
  heads, d_kv, width = int(config["num_heads"]), int(config["d_kv"]), int(config["d_model"])
  if heads * d_kv != width:
    raise ValueError(f"text encoder config: num_heads x d_kv = {heads} x {d_kv} must equal "
                     f"d_model = {width}.")
  return TextEncoderConfig(
      vocab_size=int(config["vocab_size"]), width=width, depth=int(config["num_layers"]),
      heads=heads, mlp_width=int(config["d_ff"]),
      num_buckets=int(config.get("relative_attention_num_buckets", 32)),
      max_distance=int(config.get("relative_attention_max_distance", 128)),
      eps=float(config.get("layer_norm_epsilon", 1e-6)))


def hf_config_from_text_encoder(cfg: TextEncoderConfig) -> dict[str, Any]:
  """A transformers `UMT5EncoderModel` config.json for `cfg`."""
  return {"architectures": ["UMT5EncoderModel"], "model_type": "umt5",
          "vocab_size": cfg.vocab_size, "d_model": cfg.width, "d_kv": cfg.width // cfg.heads,
          "d_ff": cfg.mlp_width, "num_layers": cfg.depth, "num_heads": cfg.heads,
          "relative_attention_num_buckets": cfg.num_buckets,
          "relative_attention_max_distance": cfg.max_distance, "layer_norm_epsilon": cfg.eps,
          "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
          "is_gated_act": True, "dropout_rate": 0.0, "tie_word_embeddings": False,
          "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
          "is_encoder_decoder": True}


def text_encoder_mapping(cfg: TextEncoderConfig, *, shared_bias: bool = False) -> list[Tensor]:
  """Every parameter of `TextEncoder(cfg)` and its transformers name.

  `shared_bias`: a T5 (not UMT5) checkpoint, whose single relative-position bias lives in
  layer 0 (every layer of ours then loads that one tensor).
  """
  m = [Tensor(("embed", "embedding"), "shared.weight", SAME,
              aliases=("encoder.embed_tokens.weight",))]
  for i in range(cfg.depth):
    ours, attn, ff = ("layers", i), f"encoder.block.{i}.layer.0", f"encoder.block.{i}.layer.1"
    for mine, their in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o")):
      m.append(Tensor(ours + ("attn", mine, "kernel"), f"{attn}.SelfAttention.{their}.weight",
                      LINEAR))
    bias_layer = "encoder.block.0.layer.0" if shared_bias else attn
    m.append(Tensor(ours + ("rel_bias",),
                    f"{bias_layer}.SelfAttention.relative_attention_bias.weight"))
    m.append(Tensor(ours + ("norm1", "scale"), f"{attn}.layer_norm.weight"))
    for mine, their in (("wi_gate", "wi_0"), ("wi_up", "wi_1"), ("wo", "wo")):
      m.append(Tensor(ours + (mine, "kernel"), f"{ff}.DenseReluDense.{their}.weight", LINEAR))
    m.append(Tensor(ours + ("norm2", "scale"), f"{ff}.layer_norm.weight"))
  m.append(Tensor(("final_norm", "scale"), "encoder.final_layer_norm.weight"))
  return m
