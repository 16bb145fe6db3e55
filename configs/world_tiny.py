"""A tiny pixel-space text-to-video model on the procedural world: the CPU demo.

  sora-jax train --config configs/world_tiny.py --workdir runs/tiny
  sora-jax train --config configs/world_tiny.py:test --workdir /tmp/t   # seconds, for tests

  sora-jax train --config configs/world_tiny.py:latent --workdir runs/latent \
      --config.autoencoder.workdir=runs/vae      # on the latents of a trained VAE

Arg (after the colon): "" for the demo (8 frames of 32x32, ~1.2M parameters),
"test" for a model small enough for unit tests, "latent" for the same model diffusing
the latents of `configs/vae_world_tiny.py` (9 frames of 32x32 -> [3, 4, 4, 16], patches
1x1x1: 48 tokens instead of the pixel model's 256).
"""

import ml_collections

from sora_jax.data import folder, sources


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.world = dict(
      frames=8, height=32, width=32,
      colours=("red", "green", "blue", "yellow"),
      shapes=("circle", "square", "triangle"),
      directions=("left", "right", "up", "down"),
      speeds=(("slowly", 0.03), ("quickly", 0.07)),
      min_objects=1, max_objects=3, size_range=(0.14, 0.2), background=(40, 40, 40),
      num_train=4000, num_test=200,
      # Attribute combinations never drawn in the train split, e.g. ("red triangle",
      # "blue circle left"): ShapesBench's held-out prompts (sora_jax/data/world.py).
      holdout=(),
      data_dir="",  # "" -> ~/.cache/sora_jax/tensorflow_datasets
  )
  c.tokenizer = dict(vocab_size=64, model_type="word")
  c.data = dict(batch_size=16, text_length=24, shuffle_seed=0, num_threads=2, prefetch=4,
                # "none": every clip has the world's size; "pack": native sizes packed into
                # rows of tokens_per_row tokens; "bucket": batches of one of `buckets`
                # holding about tokens_per_batch tokens (see configs/world_native.py).
                # latents_dir: cached VAE latents (sora-jax encode-dataset) instead of pixels.
                latents_dir="",
                grouping="none", tokens_per_row=0, text_tokens_per_row=0,
                max_examples_per_row=1, packing_bins=0, buckets=(), tokens_per_batch=0,
                # media_dir (a prepared folder), tfds (a TFDS video dataset), num_workers,
                # max_side, max_skipped_fraction: sora_jax/data/sources.py.
                **sources.config_defaults())
  # How `sora-jax prepare-data` turns videos and images into clips (sora_jax/data/folder.py):
  # the world's clip size at 8 fps; training fits other sizes to the world's.
  c.media = folder.media_config(frames=8, min_frames=8, stride=8, height=32, width=32)

  c.text_encoder = dict(width=64, depth=2, heads=2, mlp_width=128, num_buckets=32,
                        max_distance=64)
  c.model = dict(
      variant="Nano/2x4x4",   # width 128, depth 4, heads 4; patches 2x4x4
      width=0, depth=0, heads=0,  # non-zero values override the variant
      mlp_ratio=4.0, qk_norm="rms", modulation="per_block", text_projection="mlp",
      cross_attn_norm=True, rope_theta=10000.0,
      # xla | dot_product (cuDNN on GPU) | splash (TPU) | ring (over mesh.sequence) | auto
      attention="xla",
      scan_layers=False,  # True: stacked blocks under a scan (compile time flat in depth)
      remat="none")       # none | full | dots | dots_saveable
  # "identity": diffuse pixels; "vae": the normalised latents of the VAE trained in
  # `workdir` (sora-jax train-vae); "wan": a diffusers AutoencoderKLWan directory at `path`.
  c.autoencoder = dict(name="identity", workdir="", path="")

  # shift 3: train (and sample) at high noise more often, where the layout is decided.
  # shift_base_tokens > 0: shift * sqrt(tokens / shift_base_tokens) per clip size.
  c.flow = dict(logit_mean=0.0, logit_std=1.0, shift=3.0, shift_base_tokens=0,
                caption_dropout=0.1)
  c.optim = dict(lr=1e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.01,
                 b1=0.9, b2=0.99, grad_clip=1.0, ema_decay=0.995)
  # max_nonfinite_steps: consecutive steps with a non-finite loss or gradient (each one
  # skipped: nothing is updated) that stop the run (sora_jax/train/faults.py).
  # init_from: a run's workdir (or an export) whose parameters start this run ("": random).
  c.train = dict(steps=900, log_every=20, checkpoint_every=300, keep_checkpoints=2,
                 async_checkpoints=True, compute_dtype="float32", max_nonfinite_steps=5,
                 init_from="")

  c.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
  c.sharding = dict(rules=(
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"), ("text_embed", "fsdp"), ("patch", None), ("modulation", "tensor"),
      ("heads", "tensor"), ("mlp", "tensor"), ("vocab", None), ("norm", None),
      ("relpos", None), ("layers", None), ("length", "sequence"), ("text_length", None),
  ))

  # Frame conditioning (sora_jax.diffusion.conditioning): per clip, which frames are given
  # clean (no loss on them), so one model also animates images (first), extends videos
  # forwards (first_k) and backwards (last_k) and connects two (first_last); k is drawn
  # in [1, max_frames]; given frames are shown at flow time `noise` (0: clean).
  c.conditioning = dict(probs=dict(none=0.5, first=0.15, first_k=0.15, last_k=0.1,
                                   first_last=0.05, random=0.05),
                        max_frames=4, noise=0.0)

  # solver: euler | heun | dpmpp_2m. image_cfg_scale: guidance of given frames (1: off);
  # guidance_interval: flow times where guidance applies. context_frames: given frames
  # per window when extending, looping or connecting videos (sora_jax.prompting).
  # given_guidance: reconstruction guidance towards decoding given frames as given
  # (sora_jax.sample.reconstruction_guided; latent models only, 0: off). Its stable range
  # follows the decoder's gain: 2500 is tuned for the VAE of configs/vae_world_tiny.py
  # (measured at 12, 24 and 48 Euler steps; 1,250-5,000 at 24; docs/results/prompting.md).
  c.sample = dict(steps=24, cfg_scale=4.0, shift=3.0, solver="euler", batch_size=8,
                  image_cfg_scale=1.0, guidance_interval=(0.0, 1.0), context_frames=4,
                  given_guidance=2500.0)
  c.eval = dict(num_samples=40, seed=1234)

  if arg == "test":
    c.world.update(frames=4, height=16, width=16, num_train=64, num_test=16)
    c.media.update(frames=4, min_frames=4, stride=4, height=16, width=16)
    c.data.update(batch_size=8, text_length=16)
    c.text_encoder.update(width=32, depth=1, heads=2, mlp_width=64)
    c.model.update(variant="Pico/2x4x4")
    c.optim.update(warmup_steps=2)
    c.train.update(steps=4, log_every=2, checkpoint_every=2)
    c.sample.update(steps=3, batch_size=4)
    c.eval.update(num_samples=4)
  elif arg == "latent":
    c.world.update(frames=9)
    c.media.update(frames=9, min_frames=9, stride=9)
    c.autoencoder.update(name="vae", workdir="runs/vae")
    c.model.update(variant="Nano/1x1x1")
    # A latent step costs 0.30x a pixel step here: 2700 steps take the demo's 900's time.
    c.train.update(steps=2700, checkpoint_every=900)
    # Windows of 9 frames = latents of frames {0}, {1-4}, {5-8}: extension gives 5 frames
    # (two latent frames) and generates 4.
    c.sample.update(context_frames=5)
    # Masks are drawn over the 3 latent frames: k <= 2 keeps a frame free without redrawing,
    # and more clips give the last latent (backward extension) or both ends (connections).
    c.conditioning.update(max_frames=2, probs=dict(none=0.4, first=0.15, first_k=0.15,
                                                   last_k=0.12, first_last=0.13, random=0.05))
  elif arg:
    raise ValueError(f"configs/world_tiny.py: unknown arg {arg!r}; use '', 'test' or 'latent'.")
  return c
