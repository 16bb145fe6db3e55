"""A tiny pixel-space text-to-video model on the procedural world: the CPU demo.

  sora-jax train --config configs/world_tiny.py --workdir runs/tiny
  sora-jax train --config configs/world_tiny.py:test --workdir /tmp/t   # seconds, for tests

  sora-jax train --config configs/world_tiny.py:latent --workdir runs/latent
      # on the latents of the VAE shipped in checkpoints/vae_world_tiny (its README);
      # --config.autoencoder.workdir=runs/vae for one trained again (`make vae`)

Arg (after the colon): "" for the demo (8 frames of 32x32 with one or two objects; 2.50M
parameters predicting the clean video from 8x8x8 patches with self-conditioning, trained
at time shift 6, 5,000 steps: about 8 minutes on 2 CPU cores; docs/results/demo.md),
"test" for a model small enough for unit tests, "latent" for the same model diffusing
the latents of `configs/vae_world_tiny.py` (9 frames of 32x32 -> [3, 4, 4, 16], patches
1x1x1: 48 tokens instead of the pixel model's 256). "lora" after any of them ("lora",
"test-lora", "latent-lora") trains rank-8 LoRA adapters (`lora.*`) on a base from
`train.init_from` (or the seed's initialisation) instead of the weights.
`base_config()` is the recipe the other arguments and configs build on
(configs/world_native.py, configs/wan2_1_t2v.py): the earlier demo's 2x4x4 velocity
model of 1-3 objects (900 steps).
TPU target (`sora-jax plan`, tested at the test size): v5e:2x2.
"""

import os

import ml_collections

from sora_jax import configs

# The VAE the latent configs diffuse the latents of: `configs/vae_world_tiny.py` trained
# by `sora-jax train-vae` and exported, shipped in the repository (the command, commit and
# held-out PSNR in its README.md; `make vae` trains it again into runs/vae).
SHIPPED_VAE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            os.pardir, "checkpoints", "vae_world_tiny"))


def base_config() -> ml_collections.ConfigDict:
  """The shared recipe (module docstring); `get_config("")` turns it into the demo."""
  # Every section starts from the schema's defaults (sora_jax/configs/schema.py, listed in
  # docs/reference/config-keys.md), so every key exists and `--config.S.K=V` overrides it;
  # what follows is this recipe.
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The procedural world (sora_jax/data/world.py); world.holdout lists attribute
  # combinations never drawn in the train split (ShapesBench's held-out prompts).
  c.world = configs.defaults("world", frames=8, height=32, width=32, num_train=4000,
                             num_test=200)
  c.tokenizer = configs.defaults("tokenizer", vocab_size=64, model_type="word")
  # data.grouping "none": every clip has the world's size ("pack", "bucket": see
  # configs/world_native.py); data.latents_dir: cached VAE latents (encode-dataset);
  # data.media_dir / data.tfds: other sources (sora_jax/data/sources.py).
  c.data = configs.defaults("data", batch_size=16, text_length=24, shuffle_seed=0,
                            num_threads=2, prefetch=4)
  # How `sora-jax prepare-data` turns videos and images into clips (sora_jax/data/folder.py):
  # the world's clip size at 8 fps; training fits other sizes to the world's.
  c.media = configs.defaults("media", frames=8, min_frames=8, stride=8, height=32, width=32)

  c.text_encoder = configs.defaults("text_encoder", width=64, depth=2, heads=2, mlp_width=128,
                                    num_buckets=32, max_distance=64)
  # Nano/2x4x4: width 128, depth 4, heads 4; patches 2x4x4. model.attention,
  # scan_layers, remat: how it runs (defaults: xla, no scan, no remat).
  c.model = configs.defaults("model", variant="Nano/2x4x4", mlp_ratio=4.0, qk_norm="rms",
                             modulation="per_block", text_projection="mlp",
                             cross_attn_norm=True, rope_theta=10000.0)
  # "identity": diffuse pixels; "vae": the normalised latents of the VAE trained in
  # `workdir` (sora-jax train-vae); "wan": a diffusers AutoencoderKLWan directory at `path`.
  c.autoencoder = configs.defaults("autoencoder", name="identity")

  # shift 3: train (and sample) at high noise more often, where the layout is decided.
  c.flow = configs.defaults("flow", logit_mean=0.0, logit_std=1.0, shift=3.0,
                            caption_dropout=0.1)
  c.optim = configs.defaults("optim", lr=1e-3, warmup_steps=50, min_lr_ratio=0.1,
                             weight_decay=0.01, b1=0.9, b2=0.99, grad_clip=1.0, ema_decay=0.995)
  # lora.rank 0: the model's weights train ("lora" after the arg, or --config.lora.rank=R,
  # trains adapters instead).
  c.lora = configs.defaults("lora")
  # train.max_nonfinite_steps: consecutive skipped non-finite steps that stop the run
  # (sora_jax/train/faults.py); train.init_from: a workdir whose parameters start this run.
  c.train = configs.defaults("train", steps=900, log_every=20, checkpoint_every=300,
                             keep_checkpoints=2, async_checkpoints=True, compute_dtype="float32")

  c.mesh = configs.defaults("mesh", data=-1, fsdp=1, tensor=1, sequence=1)
  c.sharding = configs.defaults("sharding")   # the transformer's rules (schema.DIT_RULES)

  # Frame conditioning (sora_jax.diffusion.conditioning): per clip, which frames are given
  # clean (no loss on them), so one model also animates images (first), extends videos
  # forwards (first_k) and backwards (last_k) and connects two (first_last); k is drawn
  # in [1, max_frames]; given frames are shown at flow time `noise` (0: clean).
  c.conditioning = configs.defaults(
      "conditioning", probs=dict(none=0.5, first=0.15, first_k=0.15, last_k=0.1,
                                 first_last=0.05, random=0.05), max_frames=4, noise=0.0)

  # context_frames: given frames per window when extending, looping or connecting videos
  # (sora_jax.prompting). given_guidance: reconstruction guidance towards decoding given
  # frames as given (sora_jax.sample.reconstruction_guided; latent models only). Its stable
  # range follows the decoder's gain: 2500 is tuned for the VAE of configs/vae_world_tiny.py
  # (measured at 12, 24 and 48 Euler steps; 1,250-5,000 at 24; docs/results/prompting.md).
  c.sample = configs.defaults("sample", steps=24, cfg_scale=4.0, shift=3.0, solver="euler",
                              batch_size=8, context_frames=4, given_guidance=2500.0)
  # `sora-jax distill` (sora_jax/train/distill.py): a 4-step shortcut student of a trained
  # run, the guidance it samples with folded in; method "guidance": CFG distillation.
  c.distill = configs.defaults("distill", method="shortcut", steps=4)
  c.eval = configs.defaults("eval", num_samples=40, seed=1234)

  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  lora = bool(arg) and arg.endswith("lora")
  arg = arg.removesuffix("lora").rstrip("-") if lora else arg
  if lora:   # rank-8 adapters on the blocks' attention and MLP layers; the rest fixed
    c.lora = configs.defaults("lora", rank=8, alpha=8.0)
  if not arg:
    # The demo (docs/results/demo.md): prompts of one or two objects; Nano/8x8x8 (16
    # tokens of 1,536 values: each token holds a patch's whole clip) predicting the clean
    # video, turned into the flow's velocity (model.prediction "data", JiT: Li & He 2025):
    # a patch with more values than the width stays learnable. A token's linear patch
    # embedding sees its patch's motion over all 8 frames, which 2x8x8 tokens (motion of a
    # pixel or two per token) left at chance; 4x fewer tokens than 2x8x8 buy 5,000 steps in
    # the time 2,700 took. Guidance 2 drew the prompted number of objects more often than
    # 4 and hallucinated less on its held-out prompts. Training time shift 6 (half the
    # training times above 0.86): every column but colour better than 3 on the demo's
    # prompts, direction 0.625 -> 0.713; shift 1 fell to chance (docs/results/demo.md).
    # Self-conditioning (the model also reads its previous clean estimate; Chen et al.
    # 2022): on the 200 held-out prompts hallucinated frames 0.163 -> 0.098, direction
    # 0.682 -> 0.705, count 0.910 -> 0.925 at 1.16x the step time (docs/results/demo.md).
    c.world.update(max_objects=2)
    c.model.update(variant="Nano/8x8x8", prediction="data", self_condition=True)
    c.flow.update(shift=6.0)
    c.train.update(steps=5000, checkpoint_every=2500)
    c.sample.update(cfg_scale=2.0)
  elif arg == "test":
    c.world.update(frames=4, height=16, width=16, num_train=64, num_test=16)
    c.media.update(frames=4, min_frames=4, stride=4, height=16, width=16)
    c.data.update(batch_size=8, text_length=16)
    c.text_encoder.update(width=32, depth=1, heads=2, mlp_width=64)
    # One block: every program of the tests compiles ~40% faster than with Pico's two
    # (tests of several blocks, scanned or looped, set model.depth themselves).
    c.model.update(variant="Pico/2x4x4", depth=1)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=4, log_every=2, checkpoint_every=2)
    c.sample.update(steps=3, batch_size=4)
    c.eval.update(num_samples=4)
  elif arg == "latent":
    c.world.update(frames=9)
    c.media.update(frames=9, min_frames=9, stride=9)
    c.autoencoder.update(name="vae", workdir=SHIPPED_VAE)
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
    raise ValueError(f"configs/world_tiny.py: unknown arg {arg!r}; use '', 'test' or 'latent', "
                     "optionally followed by lora (e.g. 'test-lora', 'lora').")
  return c
