"""Wan 2.1 text-to-video in sora_jax: the same modules as every other config, with Wan's
options (see sora_jax/interop/). Weights come from a downloaded diffusers directory
(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers: transformer/, vae/, text_encoder/, tokenizer/).

  # once: read the diffusers directory into a sora_jax inference directory
  sora-jax import-wan --model-dir Wan2.1-T2V-1.3B-Diffusers --out runs/wan1.3b \
      --config configs/wan2_1_t2v.py:1.3B
  # generate (480x832, 81 frames = 21 latent frames)
  sora-jax sample --workdir runs/wan1.3b --prompt "a cat surfing a wave at sunset" \
      --frames 81 --height 480 --width 832 --out cat.mp4
  # fine-tune on your own prepared videos, text encoder frozen
  sora-jax train --config configs/wan2_1_t2v.py:1.3B --workdir runs/wan-ft \
      --config.train.init_from=runs/wan1.3b --config.data.media_dir=my_videos_prepared \
      --config.autoencoder.path=Wan2.1-T2V-1.3B-Diffusers/vae

Arg (after the colon): "1.3B", "14B", or "tiny" (random tiny models for tests); "-lora"
after any of them (e.g. "1.3B-lora") trains rank-32 LoRA adapters instead of the weights:

  sora-jax train --config configs/wan2_1_t2v.py:1.3B-lora --workdir runs/wan-style \
      --config.train.init_from=runs/wan1.3b --config.data.media_dir=my_videos_prepared \
      --config.autoencoder.path=Wan2.1-T2V-1.3B-Diffusers/vae
  sora-jax export --workdir runs/wan-style --to lora --out exported/style  # diffusers' LoRA file
TPU targets (`sora-jax plan`, docs/results/tpu-plans.md): 1.3B on v5p:2x2x2 (v5p-8),
14B on v5p:4x4x4 (v5p-64).
`autoencoder.path` is set by import-wan to the directory's `vae/`.
"""

import os
import sys

import ml_collections

from sora_jax import configs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402

# name -> transformer (width, depth, heads, ffn) and mesh: both shard their parameters
# over every device (fsdp). Data-parallel 1.3B (every chip holding the whole state, the
# frozen UMT5-XXL included) needs 112 GiB per chip on a v5p-8 (95 GiB): `sora-jax plan`,
# docs/results/tpu-plans.md. As shipped, remat "dots" and no token chunks, the 1.3B train
# step with MaxDiffusion's state (bfloat16 weights and moments, no EMA) needs less HBM than
# MaxDiffusion's own step there and has a lower step-time bound (tpu-plans.md, nineteenth
# session).
SIZES = {
    "1.3B": dict(width=1536, depth=30, heads=12, mlp_hidden=8960, mesh=dict(data=1, fsdp=-1)),
    "14B": dict(width=5120, depth=40, heads=40, mlp_hidden=13824, mesh=dict(data=1, fsdp=-1)),
    "tiny": dict(width=24, depth=1, heads=2, mlp_hidden=40, mesh=dict(data=-1, fsdp=1)),
}
# UMT5-XXL (both sizes), and a tiny one for tests.
TEXT = {"umt5-xxl": dict(width=4096, depth=24, heads=64, mlp_width=10240, num_buckets=32,
                         max_distance=128, vocab_size=256384),
        "tiny": dict(width=20, depth=1, heads=4, mlp_width=40, num_buckets=8, max_distance=20,
                     vocab_size=97)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  lora = bool(arg) and arg.endswith("-lora")
  arg = arg.removesuffix("-lora") if lora else arg
  if arg not in SIZES:
    raise ValueError(f"configs/wan2_1_t2v.py: unknown arg {arg!r}; use one of {sorted(SIZES)}, "
                     "each optionally with -lora (e.g. 1.3B-lora).")
  size = dict(SIZES[arg])
  mesh = size.pop("mesh")
  c = world_tiny.base_config()
  # Default clip size of `sample` (and of the procedural world, should one train on it).
  c.world.update(frames=81, height=480, width=832)
  c.text_encoder = configs.defaults("text_encoder",
                                    **TEXT["tiny" if arg == "tiny" else "umt5-xxl"],
                                    eps=1e-6)
  c.model.update(variant="B/1x2x2", **size, qk_norm="rms_across_heads", modulation="shared",
                 text_projection="mlp", cross_attn_norm=True, rope_theta=10000.0,
                 text_padding="zeros", freq_dim=256, eps=1e-6, attention="auto",
                 scan_layers=arg != "tiny", remat="dots" if arg != "tiny" else "none")
  c.autoencoder = configs.defaults("autoencoder", name="wan")
  c.data.update(text_length=512, batch_size=8)
  c.media.update(frames=81, min_frames=81, stride=81, height=480, width=832, fps=16)
  c.conditioning = configs.defaults("conditioning", probs=dict(none=1.0), max_frames=1)
  c.flow.update(shift=3.0, caption_dropout=0.1)
  # Fine-tuning: small learning rate, the UMT5 encoder fixed and kept in bfloat16 (as Wan
  # ships it; the step computes in bfloat16 anyway), with no EMA or optimiser state.
  c.optim.update(lr=1e-5, warmup_steps=100, weight_decay=0.0, ema_decay=0.999,
                 frozen=("text_encoder",), frozen_dtype="bfloat16")
  c.train.update(steps=2000, checkpoint_every=500, compute_dtype="bfloat16")
  c.mesh = configs.defaults("mesh", **mesh)
  # Wan's defaults at 480p: 50 steps, guidance 5, shift 3 (5 at 720p), flow sigmas; UniPC
  # there, the multistep DPM-Solver++ (diffusers' other flow multistep solver) here.
  c.sample.update(steps=50, cfg_scale=5.0, shift=3.0, solver="dpmpp_2m", batch_size=1,
                  schedule="flow_sigmas")
  if lora:
    # LoRA (`lora.*`): rank-32 adapters on the blocks' attention and MLP layers, the base
    # from train.init_from fixed in bfloat16; adapters take a larger learning rate.
    c.lora = configs.defaults("lora", rank=32, alpha=32.0)
    c.optim.update(lr=1e-4)
  if arg == "tiny":
    c.world.update(frames=5, height=16, width=16, num_train=16, num_test=4)
    c.media.update(frames=5, min_frames=5, stride=5, height=16, width=16)
    c.data.update(text_length=16, batch_size=2)
    c.train.update(steps=2, log_every=1, checkpoint_every=2, compute_dtype="float32")
    c.sample.update(steps=3, solver="euler", schedule="flow_match_euler")
  return c
