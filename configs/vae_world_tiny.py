"""A tiny causal video VAE (4x8x8 compression, 16 latent channels) on the procedural world.

  sora-jax train-vae --config configs/vae_world_tiny.py --workdir runs/vae
  sora-jax train-vae --config configs/vae_world_tiny.py:test --workdir /tmp/v   # seconds

Clips have 1 + 2 * 4 = 9 frames of 32x32, so latents are [3, 4, 4, 16]: frame 0 alone,
then one latent frame per 4 frames. Arg: "" (8,000 steps: ~80 min on 2 CPU cores), "test" (unit tests),
"gan" (the adversarial loss switched on half-way).
No TPU target: `sora-jax plan` compiles the diffusion transformer's programs (its train
step, the sampler's model call, a VAE's decode), not `train-vae`'s step.
"""

import ml_collections

from sora_jax import configs
from sora_jax.configs import schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # Sections start from the schema's defaults (sora_jax/configs/schema.py,
  # docs/reference/config-keys.md): every key exists and `--config.S.K=V` overrides it.
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The demo's world (sora_jax.data.world.WorldConfig defaults), with 9-frame clips.
  c.world = configs.defaults("world", frames=9, height=32, width=32, num_train=4000,
                             num_test=200)
  # media_dir, tfds, ...: sora_jax/data/sources.py (the DiT's data keys go unused here).
  c.data = configs.defaults("data", batch_size=8, shuffle_seed=0, num_threads=2, prefetch=4)
  c.media = configs.defaults("media", frames=9, min_frames=9, stride=9, height=32, width=32)

  # Temporal factor 4, spatial 8 = a 2x2 pixel patch (folded into channels) x two
  # downsampling stages, time downsampled in both (the Wan 2.1 VAE has three stages and no
  # patch). (2+1)D convolutions keep a training step under a second on 2 CPU cores.
  # shortcuts: parameter-free averaging/repeating paths around every down/upsampling and
  # the latent (DC-AE's residual autoencoding). decoder_channels: the decoder's widths
  # (() = channels).
  c.vae = configs.defaults("vae", compression=(4, 8, 8), latent_channels=16,
                           channels=(32, 64, 64), num_res_blocks=1, factorized=True, patch=2,
                           shortcuts=True)
  # Losses: l1 * |x - x'| + l2 * (x - x')^2 (means over pixels) + kl * KL / pixels;
  # the hinge adversarial loss (weight disc_weight) from step disc_start on, when
  # disc_weight > 0.
  c.vae_loss = configs.defaults("vae_loss", l1_weight=1.0, l2_weight=1.0, kl_weight=1e-3,
                                disc_weight=0.0, disc_start=0, disc_channels=32, disc_layers=3)

  # lr 4e-3 for 8,000 steps: 29.1 dB held-out on an H200 (`experiments/vae_sweep.py`), the
  # shortest recipe of the sweep above 28 dB with a margin (docs/results/vae.md).
  c.optim = configs.defaults("optim", lr=4e-3, warmup_steps=100, min_lr_ratio=0.05,
                             weight_decay=0.0, b1=0.9, b2=0.99, grad_clip=1.0, ema_decay=0.0)
  c.disc_optim = configs.defaults("disc_optim", lr=2e-4, warmup_steps=0, min_lr_ratio=1.0,
                                  weight_decay=0.0, b1=0.5, b2=0.9, grad_clip=1.0, ema_decay=0.0)
  c.train = configs.defaults("train", steps=8000, log_every=25, checkpoint_every=500,
                             keep_checkpoints=2, async_checkpoints=True, compute_dtype="float32")

  c.mesh = configs.defaults("mesh", data=-1, fsdp=1, tensor=1, sequence=1)
  c.sharding = configs.defaults("sharding", rules=schema.VAE_RULES)

  # After training: latent statistics over stats_batches training batches; PSNR/SSIM
  # on num_examples held-out clips; side-by-side reconstructions of num_videos clips.
  c.eval = configs.defaults("eval", stats_batches=16, num_examples=200, batch_size=20,
                            num_videos=8)

  if arg == "test":
    c.world.update(frames=5, height=16, width=16, num_train=32, num_test=8)
    c.media.update(frames=5, min_frames=5, stride=5, height=16, width=16)
    c.data.update(batch_size=8)
    c.vae.update(compression=(4, 8, 8), latent_channels=4, channels=(8, 16, 16))
    c.optim.update(warmup_steps=2)
    c.train.update(steps=4, log_every=2, checkpoint_every=2)
    c.eval.update(stats_batches=2, num_examples=8, batch_size=8, num_videos=2)
  elif arg == "gan":
    c.vae_loss.update(disc_weight=0.1, disc_start=750)
  elif arg:
    raise ValueError(f"configs/vae_world_tiny.py: unknown arg {arg!r}; use '', 'test' or 'gan'.")
  return c
