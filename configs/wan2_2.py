"""Wan 2.2 in sora_jax: the published models' sizes and sampling defaults, over the same
modules as Wan 2.1 (configs/wan2_1_t2v.py, whose options these presets start from).

  ti2v-5B   Wan2.2-TI2V-5B: one 5B transformer (48 latent channels) for text-to-video and
            image-to-video over Wan 2.2's VAE (4x16x16, 48 channels); 121 frames of
            704x1280 at 24 fps, 50 steps, guidance 5, shift 5.
  t2v-A14B  Wan2.2-T2V-A14B: two 14B experts (high noise above a boundary of 0.875 of the
            timesteps, low noise below) over Wan 2.1's VAE; 40 steps, guidance 4 (high) and
            3 (low), shift 12.
  i2v-A14B  Wan2.2-I2V-A14B: the same with Wan's image conditioning channels; boundary
            0.9, guidance 3.5 for both experts, shift 5.

  sora-jax import-wan --model-dir Wan2.2-TI2V-5B-Diffusers --out runs/wan22-5b \
      --config configs/wan2_2.py:ti2v-5B
  sora-jax sample --workdir runs/wan22-5b --prompt "..." [--image first.png] --out out.mp4
  sora-jax import-wan --model-dir Wan2.2-T2V-A14B-Diffusers --out runs/wan22 \
      --config configs/wan2_2.py:t2v-A14B
  sora-jax sample --workdir runs/wan22 --sharded --prompt "..." --out out.mp4

import-wan reads the architecture, the experts' boundary and the image conditioning
(TI2V's replaced first frame, I2V's channels) from the directory; these presets supply
the mesh and the sampling, clip and training defaults. Training ti2v-5B (its weights, or
LoRA adapters with "ti2v-5B-lora", from `train.init_from` = its import) fine-tunes
text-to-video; of the two-expert models, T2V-A14B trains its experts (both, or one with
`train.expert=high|low`, without LoRA adapters; docs/guides/training-and-native-sizes.md)
and I2V-A14B samples and exports only (training it is refused with a message).
TPU target (`sora-jax plan`, docs/results/tpu-plans.md; tested at 2 layers on a small
clip): ti2v-5B on v5p:2x2x2 (v5p-8).
"""

import os
import sys

import ml_collections


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wan2_1_t2v  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402

# name -> the Wan 2.1 preset it starts from, and its model, clip and sampling settings.
PRESETS = {
    "ti2v-5B": dict(
        base="1.3B", model=dict(width=3072, depth=30, heads=24, mlp_hidden=14336),
        clip=dict(frames=121, height=704, width=1280, fps=24),
        sample=dict(steps=50, cfg_scale=5.0, shift=5.0)),
    "t2v-A14B": dict(
        base="14B", model=dict(boundary=0.875), clip=dict(frames=81, height=720, width=1280,
                                                          fps=16),
        sample=dict(steps=40, cfg_scale=4.0, cfg_scale_low=3.0, shift=12.0)),
    "i2v-A14B": dict(
        base="14B", model=dict(boundary=0.9), clip=dict(frames=81, height=720, width=1280,
                                                        fps=16),
        sample=dict(steps=40, cfg_scale=3.5, cfg_scale_low=3.5, shift=5.0)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  lora = bool(arg) and arg.endswith("-lora")
  name = arg.removesuffix("-lora") if lora else arg
  if name not in PRESETS or (lora and name != "ti2v-5B"):
    raise ValueError(f"configs/wan2_2.py: unknown arg {arg!r}; use one of {sorted(PRESETS)} "
                     "(ti2v-5B also as ti2v-5B-lora).")
  preset = PRESETS[name]
  c = wan2_1_t2v.get_config(preset["base"] + ("-lora" if lora else ""))
  c.model.update(**preset["model"])
  clip = preset["clip"]
  c.world.update(frames=clip["frames"], height=clip["height"], width=clip["width"])
  c.media.update(frames=clip["frames"], min_frames=clip["frames"], stride=clip["frames"],
                 height=clip["height"], width=clip["width"], fps=clip["fps"])
  c.sample.update(**preset["sample"])
  if name == "ti2v-5B":   # Wan 2.2's VAE (what `sora-jax plan` assumes without a path)
    c.autoencoder.wan_version = "2.2"
  return c
