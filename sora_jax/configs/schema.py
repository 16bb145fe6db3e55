"""The config schema: one frozen dataclass per section, each field with its type, its
default (the one place defaults live) and a one-line doc.

A config file (`configs/*.py`) starts its sections from these defaults
(`sora_jax.configs.defaults`), so every key exists and is overridable with
`--config.SECTION.KEY=VALUE`; `sora_jax.configs.typed` reads a config (or the
`config.json` of an older run, whose missing keys take these defaults) into `Config`.
Sections that are typed elsewhere are reused: `world` (`sora_jax.data.world.WorldConfig`),
the source keys of `data` and `data.tfds` (`sora_jax.data.sources`), `media`
(`sora_jax.data.folder.MediaConfig`).

Defaults of keys added after runs were saved are the values that mean "as before the key
existed" (e.g. `model.attention="xla"`, `conditioning.probs={"none": 1.0}`); the others
are the demo's (`configs/world_tiny.py`) or, for the VAE sections, `configs/vae_world_tiny.py`'s.
`docs/reference/config-keys.md` is generated from this module (`reference_markdown`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from sora_jax.data.folder import MediaConfig
from sora_jax.data.sources import SourceConfig
from sora_jax.data.world import WorldConfig
from sora_jax.models.dit import DiTConfig
from sora_jax.models.vision import CLIP_MEAN, CLIP_STD


def _f(default: Any, doc: str) -> Any:
  """A field with `default` (copied per instance when a dict) and its one-line `doc`."""
  if isinstance(default, dict):
    return dataclasses.field(default_factory=lambda: dict(default), metadata={"doc": doc})
  return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class World(WorldConfig):
  """`world`: the procedural world (`sora_jax.data.world.WorldConfig`) and where it is written."""
  data_dir: str = _f("", "TFDS directory of the world ('': ~/.cache/sora_jax/tensorflow_datasets)")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """`tokenizer`: the sentencepiece model trained on the run's captions."""
  vocab_size: int = _f(64, "pieces of the tokenizer")
  model_type: str = _f("word", "sentencepiece model type: word | unigram | bpe | char")


@dataclasses.dataclass(frozen=True)
class Data(SourceConfig):
  """`data`: batches, and the source (`sora_jax.data.sources.SourceConfig`) they come from."""
  batch_size: int = _f(16, "global batch size (clips; rows when packing)")
  text_length: int = _f(24, "caption tokens per clip")
  shuffle_seed: int = _f(0, "seed of the record order")
  num_threads: int = _f(2, "Grain read threads")
  prefetch: int = _f(4, "batches prefetched")
  latents_dir: str = _f("", "cached VAE latents (`sora-jax encode-dataset`) instead of pixels")
  grouping: str = _f("none", "none: the world's size | pack: rows of tokens | bucket: per size")
  tokens_per_row: int = _f(0, "pack: video tokens per row")
  text_tokens_per_row: int = _f(0, "pack: text tokens per row")
  max_examples_per_row: int = _f(1, "pack: most examples in a row")
  packing_bins: int = _f(0, "pack: bins of the packer's first-fit (0: exact)")
  buckets: tuple[tuple[int, int, int], ...] = _f((), "bucket: the (frames, height, width) buckets")
  tokens_per_batch: int = _f(0, "bucket: about this many tokens per batch")


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """`text_encoder`: the T5-style text encoder."""
  width: int = _f(64, "hidden width")
  depth: int = _f(2, "layers")
  heads: int = _f(2, "attention heads")
  mlp_width: int = _f(128, "MLP hidden width")
  num_buckets: int = _f(32, "relative-position buckets")
  max_distance: int = _f(64, "relative distance of the last bucket")
  vocab_size: int = _f(0, "embedding rows (0: the tokenizer's pieces; UMT5: 256384)")
  eps: float = _f(1e-6, "RMS norm epsilon")


@dataclasses.dataclass(frozen=True)
class Model:
  """`model`: the diffusion transformer (`sora_jax.models.dit.DiTConfig`)."""
  variant: str = _f("Nano/2x4x4", "<size>/<pt>x<ph>x<pw>: width, depth, heads and patch")
  width: int = _f(0, "overrides the variant's width (0: the variant's)")
  depth: int = _f(0, "overrides the variant's depth (0: the variant's)")
  heads: int = _f(0, "overrides the variant's heads (0: the variant's)")
  mlp_ratio: float = _f(DiTConfig.mlp_ratio, "MLP hidden width / width")
  qk_norm: str = _f(DiTConfig.qk_norm, "none | rms | rms_across_heads")
  modulation: str = _f(DiTConfig.modulation, "adaLN modulation: per_block | shared")
  text_projection: str = _f(DiTConfig.text_projection, "text states into the model: mlp | linear")
  cross_attn_norm: bool = _f(DiTConfig.cross_attn_norm, "normalise queries of cross-attention")
  rope_theta: float = _f(DiTConfig.rope_theta, "RoPE base")
  attention: str = _f("xla", "xla | dot_product (cuDNN) | splash (TPU) | ring | ulysses | auto")
  splash_block: int = _f(512, "splash attention's blocks of queries and keys (a multiple of "
                         "128; also the padding of the sequence)")
  scan_layers: bool = _f(DiTConfig.scan_layers, "blocks under a scan (compile time flat in depth)")
  remat: str = _f(DiTConfig.remat, "block rematerialisation: none | full | dots | "
                  "dots_saveable | dots_offload (matmul outputs kept in host memory)")
  mlp_hidden: int = _f(DiTConfig.mlp_hidden, "MLP hidden width (0: width * mlp_ratio)")
  token_chunks: int = _f(DiTConfig.token_chunks, "the blocks' per-token work (MLP; queries "
                         "and keys) in this many chunks of the tokens (same values; "
                         "activations in smaller pieces)")
  text_padding: str = _f(DiTConfig.text_padding, "padded text tokens: mask | zeros (Wan)")
  freq_dim: int = _f(DiTConfig.freq_dim, "sinusoidal timestep embedding width")
  eps: float = _f(DiTConfig.eps, "norm epsilon")
  image_positions: int = _f(0, "image branch: a learned position table over this many image "
                            "tokens (Wan's first-last-frame model: both images'; 0: none)")
  boundary: float = _f(0.0, "two experts (Wan 2.2 A14B): flow times >= boundary run `dit` "
                       "(high noise), lower ones `low_noise_dit`; 0: one transformer")
  guidance_embedding: bool = _f(False, "a guidance-scale input (CFG-distilled students, "
                                "`sora-jax distill`)")
  step_embedding: bool = _f(False, "a step-size input (shortcut students, `sora-jax distill`)")
  critic: bool = _f(False, "a second transformer of the teacher's architecture beside a "
                    "distilled student, `critic`: DMD's score of the student's own samples "
                    "(`distill.method=dmd`); trained with the student, never sampled or "
                    "exported (`restore_params` drops it)")
  prediction: str = _f(DiTConfig.prediction, "what the output layer predicts: velocity | "
                       "data (the clean video, turned into a velocity; JiT)")
  output_head: str = _f(DiTConfig.output_head, "the output layer: linear | field (a "
                        "per-patch neural field over each pixel's input values; PixNerd) | "
                        "mlp (two layers, so a patch is not limited to `width` dimensions)")
  field_hidden: int = _f(DiTConfig.field_hidden, "the neural-field head's hidden width")
  head_hidden: int = _f(DiTConfig.head_hidden, "the MLP head's hidden width "
                        "(output_head=mlp): the dimensions its patches span")
  head_overlap: int = _f(DiTConfig.head_overlap, "pixels each token of a linear or mlp "
                         "head draws beyond its patch on every side, cross-faded with its "
                         "neighbours' so no seam falls on a token boundary (0: patches "
                         "only meet); not with data.grouping=pack")
  pooled_text: bool = _f(DiTConfig.pooled_text, "the caption's mean text state added to the "
                        "timestep embedding (adaLN; SD3/Flux's pooled text), through an "
                        "MLP that starts at zero")
  self_condition: bool = _f(DiTConfig.self_condition, "self-conditioning (Analog Bits): "
                           "the model's own clean-video estimate as a second input, "
                           "trained with `flow.self_condition_rate`, fed back at each "
                           "sampling step")
  camera_control: bool = _f(False, "explicit camera control: per-frame camera rays as an "
                            "input (camera worlds; pixel or latent models, from "
                            "`train.init_from` without it too; `sample --camera`)")
  camera_rope: bool = _f(False, "camera control: RoPE positions on the world plane the "
                         "camera sees (a still point keeps its position in every frame) "
                         "instead of the patch grid")
  camera_dropout: float = _f(0.1, "camera control: share of training clips shown no camera "
                             "(zero rays), so text-only sampling still works")
  causal_frames: int = _f(DiTConfig.causal_frames, "block-causal self-attention over blocks "
                          "of this many latent frames (autoregressive video, `sample "
                          "--stream`); 0: bidirectional")


@dataclasses.dataclass(frozen=True)
class ImageEncoder:
  """`image_encoder`: the CLIP vision encoder whose states feed the transformer's image
  branch (`sora_jax.models.vision`; Wan 2.1 image-to-video). width 0: no image branch."""
  width: int = _f(0, "hidden width (0: no image encoder)")
  depth: int = _f(0, "layers run (Wan: all but CLIP's last: its penultimate states)")
  heads: int = _f(0, "attention heads")
  mlp_width: int = _f(0, "MLP hidden width")
  patch: int = _f(14, "patch size in pixels")
  image_size: int = _f(224, "input size in pixels (square)")
  activation: str = _f("gelu", "gelu | quick_gelu")
  eps: float = _f(1e-5, "LayerNorm epsilon")
  mean: tuple[float, ...] = _f(CLIP_MEAN, "per-channel normalisation mean")
  std: tuple[float, ...] = _f(CLIP_STD, "per-channel normalisation std")


@dataclasses.dataclass(frozen=True)
class Autoencoder:
  """`autoencoder`: what the transformer diffuses."""
  name: str = _f("identity", "identity: pixels | vae: a trained VAE run | wan: the Wan VAE")
  workdir: str = _f("", "vae: the workdir of `sora-jax train-vae`")
  path: str = _f("", "wan: a diffusers AutoencoderKLWan directory")
  wan_version: str = _f("2.1", "wan without a path (planning without weights): the published "
                        "VAE architecture assumed, 2.1 (4x8x8, 16 channels) or 2.2 (TI2V-5B's "
                        "4x16x16, 48 channels)")


@dataclasses.dataclass(frozen=True)
class Flow:
  """`flow`: the rectified-flow training objective."""
  logit_mean: float = _f(0.0, "mean of the logit-normal training times")
  logit_std: float = _f(1.0, "standard deviation of the logit-normal training times")
  shift: float = _f(3.0, "timestep shift (>1: more training at high noise)")
  shift_base_tokens: int = _f(0, "> 0: shift * sqrt(tokens / shift_base_tokens) per clip size")
  second_shift: float = _f(1.0, "the timestep shift of `second_shift_share` of the training times "
                           "(a mixture of two shifted distributions)")
  second_shift_share: float = _f(0.0, "share of training times drawn at second_shift, in [0, 1]")
  caption_dropout: float = _f(0.1, "share of captions dropped (for guidance), in [0, 1)")
  loss_space: str = _f("velocity", "velocity: the MSE of velocities | data: of the implied "
                       "clean video (the velocity MSE times max(t, 0.05)^2)")
  gradient_loss_weight: float = _f(0.0, "> 0: adds this weight times the gradient-difference "
                                   "loss (the MSE of the velocity's differences between "
                                   "neighbouring pixels along H and W, sora_jax.diffusion."
                                   "flow.frame_mse), which counts an outline's corners more "
                                   "than the plain MSE does")
  gradient_loss_min_time: float = _f(0.0, "the gradient-difference term at flow times >= this "
                                     "only, in [0, gradient_loss_max_time)")
  gradient_loss_max_time: float = _f(1.0, "the gradient-difference term at flow times <= this "
                                     "only, in (0, 1]")
  frame_times: dict[str, float] = _f(
      {"shared": 1.0}, "per clip, the probability of each kind of per-frame flow times "
      "(diffusion forcing, sora_jax.diffusion.flow.FRAME_TIMES): shared, independent, "
      "non_decreasing, clean_prefix")
  self_condition_rate: float = _f(0.5, "with model.self_condition: share of train steps whose "
                                  "model sees its own clean-video estimate (a first pass "
                                  "without gradient); the rest see zeros, in [0, 1]")


@dataclasses.dataclass(frozen=True)
class Optim:
  """`optim` (and `disc_optim`): AdamW with warmup and cosine decay, and an EMA."""
  lr: float = _f(1e-3, "peak learning rate")
  warmup_steps: int = _f(50, "linear warmup steps")
  min_lr_ratio: float = _f(0.1, "final learning rate / lr (cosine decay)")
  weight_decay: float = _f(0.01, "AdamW weight decay (matrices only)")
  b1: float = _f(0.9, "Adam beta1")
  b2: float = _f(0.99, "Adam beta2")
  grad_clip: float = _f(1.0, "global gradient-norm clip")
  ema_decay: float = _f(0.995, "EMA decay of the trainable parameters (0: no EMA is kept)")
  frozen: tuple[str, ...] = _f((), "parameter groups kept fixed, e.g. ('text_encoder',)")
  lr_scales: tuple[tuple[str, float], ...] = _f((), "learning-rate multipliers of parameter "
                                                "groups, e.g. (('critic', 5.0),): a DMD "
                                                "critic that learns faster than its student")
  frozen_dtype: str = _f("", "dtype the frozen groups are stored in ('': as initialised)")
  param_dtype: str = _f("", "dtype the trainable weights and their AdamW moments are stored "
                        "in ('': as initialised, float32)")
  master_copy: bool = _f(False, "with param_dtype: the optimiser keeps a float32 copy of the "
                         "trainable weights and its moments in float32, and the stored "
                         "weights are that copy rounded (no update is lost)")


LORA_TARGETS = ("dit.blocks.*attn.q", "dit.blocks.*attn.k", "dit.blocks.*attn.v",
                "dit.blocks.*attn.out", "dit.blocks.*mlp.fc1", "dit.blocks.*mlp.fc2")


@dataclasses.dataclass(frozen=True)
class LoRA:
  """`lora`: train low-rank adapters on chosen linear layers instead of the model's weights
  (`sora_jax.models.lora`); the base (from `train.init_from`) stays fixed and out of the
  checkpoints."""
  rank: int = _f(0, "adapter rank (0: no adapters, the model's weights train)")
  alpha: float = _f(0.0, "the update is scaled by alpha / rank (0: alpha = rank)")
  dropout: float = _f(0.0, "dropout rate on the adapters' inputs in training, in [0, 1)")
  targets: tuple[str, ...] = _f(LORA_TARGETS, "fnmatch patterns of the dotted paths of the "
                                "linear layers adapted (e.g. dit.blocks.*attn.q)")

  @property
  def scale(self) -> float:
    return (self.alpha or self.rank) / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class Train:
  """`train`: the training loop."""
  steps: int = _f(900, "training steps")
  log_every: int = _f(20, "steps between logged metrics")
  checkpoint_every: int = _f(300, "steps between checkpoints")
  keep_checkpoints: int = _f(2, "checkpoints kept")
  async_checkpoints: bool = _f(True, "write checkpoints in the background")
  compute_dtype: str = _f("float32", "float32 | bfloat16")
  max_nonfinite_steps: int = _f(5, "consecutive non-finite (skipped) steps that stop the run")
  microbatches: int = _f(1, "gradient accumulation: each step's batch in this many "
                         "microbatches, one after another (activations of one alive at a "
                         "time), gradients averaged before the one update")
  init_from: str = _f("", "a run's workdir (or an export) whose parameters start this run "
                      "(train-vae: a VAE run's, with its latent statistics; distill: an "
                      "earlier student of the same teacher, instead of the teacher)")
  expert: str = _f("", "with two experts (model.boundary > 0; Wan 2.2): '' trains each on "
                   "its own flow times (both run on every clip, each clip's loss from its "
                   "own), 'high' only `dit` on times >= boundary, 'low' only "
                   "`low_noise_dit` on times below it (the other expert and the shared text "
                   "encoder fixed; times from flow.*'s distribution cut to the range); a "
                   "one-transformer train.init_from starts both experts")


@dataclasses.dataclass(frozen=True)
class Mesh:
  """`mesh`: device mesh axis sizes (-1: the devices left)."""
  data: int = _f(-1, "data-parallel axis")
  fsdp: int = _f(1, "parameter-sharding (FSDP) axis")
  tensor: int = _f(1, "tensor-parallel axis")
  sequence: int = _f(1, "sequence-parallel (ring or Ulysses attention) axis")


# Weights are sharded over the sequence axis too (FSDP-style, gathered per layer): a
# sequence-parallel run keeps 1/sequence of the state per chip instead of all of it (Wan
# 2.1 1.3B, sequence 8 on v5p-8: docs/results/tpu-plans.md). With sequence 1, fsdp alone.
DIT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp", "sequence")), ("text_embed", ("fsdp", "sequence")), ("patch", None),
    ("modulation", "tensor"),
    ("heads", "tensor"), ("mlp", "tensor"), ("vocab", None), ("norm", None),
    ("relpos", None), ("layers", None), ("length", "sequence"), ("text_length", None),
)

VAE_RULES = (
    ("batch", ("data", "fsdp")), ("conv_in", None), ("conv_out", "fsdp"), ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class Sharding:
  """`sharding`: logical axis names -> mesh axes."""
  rules: tuple[tuple[str, Any], ...] = _f(
      DIT_RULES, "ordered (logical axis, mesh axes or None) rules (names: "
      "sora_jax/parallel/axes.py); VAE runs: VAE_RULES")


@dataclasses.dataclass(frozen=True)
class Conditioning:
  """`conditioning`: frame conditioning (`sora_jax.diffusion.conditioning`)."""
  probs: dict[str, float] = _f({"none": 1.0}, "per clip, the probability of each mask kind: "
                               "none, first, first_k, last_k, first_last, random")
  max_frames: int = _f(4, "k of first_k / last_k / first_last is drawn in [1, max_frames]")
  noise: float = _f(0.0, "flow time at which given frames are shown (0: clean)")
  scheme: str = _f("channels", "channels: given latents and one mask channel | wan: Wan 2.1 "
                   "image-to-video's (f mask channels, latents of the given frames with "
                   "zeros elsewhere; sampling only) | replace: Wan 2.2 TI2V's (given latent "
                   "frames replace the noisy ones at flow time 0; sampling only)")


@dataclasses.dataclass(frozen=True)
class Sample:
  """`sample`: the sampler's defaults (`sora-jax sample` options override them)."""
  steps: int = _f(24, "solver steps")
  cfg_scale: float = _f(4.0, "classifier-free guidance scale of the caption")
  cfg_scale_low: float = _f(0.0, "two experts: the low-noise expert's guidance (0: cfg_scale)")
  shift: float = _f(3.0, "timestep shift of the sampling schedule")
  solver: str = _f("euler", "euler | heun | dpmpp_2m")
  batch_size: int = _f(8, "videos sampled at once")
  image_cfg_scale: float = _f(1.0, "guidance scale of given frames (1: off)")
  guidance_interval: tuple[float, float] = _f((0.0, 1.0), "flow times where guidance applies")
  context_frames: int = _f(4, "given frames per window when extending, looping or connecting")
  given_guidance: float = _f(0.0, "reconstruction guidance towards given frames (latent; 0: off)")
  cache_threshold: float = _f(0.0, "step caching's error threshold (0: off; needs "
                              "`sora-jax calibrate-cache`)")
  schedule: str = _f("uniform", "time schedule: uniform | flow_sigmas | flow_match_euler")
  eta: float = _f(0.0, "euler only: share of fresh noise in each step (0: the ODE; 1: "
                  "diffusers' stochastic_sampling)")
  stream_window: int = _f(4, "streaming (block-causal models): chunks of past the KV cache "
                          "keeps")


@dataclasses.dataclass(frozen=True)
class Distill:
  """`distill`: few-step and CFG distillation (`sora-jax distill`); the student's
  architecture is its teacher's, plus a step-size or guidance-scale input."""
  teacher: str = _f("", "the teacher: a run's workdir or an export (`--teacher`)")
  method: str = _f("shortcut", "shortcut: a few-step student, guidance folded in, trained on "
                   "its own finer steps | trajectory: a `steps`-step student, guidance folded "
                   "in, trained on the teacher's ODE from its own rollouts | causal: a "
                   "block-causal trajectory student, a block of latent frames at a time after "
                   "a clean past (streaming), of a block-causal teacher or (with "
                   "`causal_frames`) a bidirectional one | dmd: a `steps`-step student "
                   "trained by distribution matching (DMD) on its own samples beside a critic "
                   "(`model.critic`); block-causal (streaming, Self-Forcing: its whole clip its "
                   "own rollout) of a block-causal teacher or with `causal_frames` | guidance: "
                   "CFG distillation, the scale an input (one pass per step)")
  cfg_scale: float = _f(0.0, "shortcut, trajectory, causal, dmd: the teacher's guidance scale the "
                        "student learns; 0: the teacher's own `sample.cfg_scale`")
  guidance_range: tuple[float, float] = _f((1.0, 8.0), "guidance: the scales the student "
                                           "learns (drawn uniformly)")
  base_steps: int = _f(64, "shortcut: the finest step is 1/base_steps (a power of two), "
                       "learnt from the teacher; coarser ones from two finer ones")
  consistency_fraction: float = _f(0.25, "shortcut: share of a batch that learns coarser "
                                   "steps from finer ones (the rest: the teacher's velocity)")
  steps: int = _f(4, "shortcut: the steps the student samples with by default; trajectory, "
                  "dmd: the steps it learns (causal: per chunk)")
  teacher_steps: int = _f(12, "trajectory, causal: the teacher's guided Euler steps within one of "
                          "the student's steps (its target)")
  shift: float = _f(1.0, "trajectory, causal, dmd: the shift of the student's time grid (its "
                    "`sample.shift`; 0: the teacher's `sample.shift`); shortcut: 1 only")
  causal_frames: int = _f(0, "causal, of a bidirectional teacher: the student's causal block "
                          "(its `model.causal_frames`), learnt from the teacher's ODE over "
                          "whole clips (CausVid's initialisation; dmd: CausVid's second "
                          "stage); 0: the teacher's own blocks (a block-causal teacher; "
                          "dmd of a bidirectional teacher: a bidirectional student)")
  dmd_times: tuple[float, float] = _f((0.02, 0.98), "dmd: the flow times (drawn uniformly) "
                                      "at which the student's samples are noised and scored "
                                      "by the teacher and the critic")
  past: str = _f("data", "causal, of a block-causal teacher: the past a block learns after | "
                 "data: the clip's own frames (teacher forcing) | student: the blocks the "
                 "student itself makes before it, as it streams them (Self-Forcing's "
                 "rollouts; (blocks - 1) x steps more passes of the student per step)")
  dmd_rollout_blocks: int = _f(0, "dmd of a block-causal student: 0: its sample is a clip "
                               "(its whole clip its own rollout) | n >= the clip's blocks: "
                               "it streams n blocks through its rolling KV cache "
                               "(`sample.stream_window` chunks, as `sample --stream`) and a "
                               "clip-long window of that rollout at a random start is "
                               "scored (Self-Forcing++'s extended DMD; n x (steps + 1) "
                               "passes of the student on one block per step)")
  dmd_window_at_start: float = _f(0.0, "dmd with `dmd_rollout_blocks`: the probability that "
                                  "a window starts at the rollout's first block (the "
                                  "stream's first seconds, where its scene is set); else "
                                  "its start is uniform over the rollout")


@dataclasses.dataclass(frozen=True)
class Eval:
  """`eval`: evaluation after training (DiT runs: the first three; VAE runs: the rest)."""
  num_samples: int = _f(40, "prompts the demo samples and scores (the world's held-out "
                        "ones, with ShapesBench)")
  seed: int = _f(1234, "seed of the evaluation")
  sizes: tuple[tuple[int, int, int], ...] = _f((), "(frames, height, width) sizes evaluated")
  stats_batches: int = _f(16, "VAE: training batches of the latent statistics")
  num_examples: int = _f(200, "VAE: held-out clips of PSNR/SSIM")
  batch_size: int = _f(20, "VAE: evaluation batch size")
  num_videos: int = _f(8, "VAE: side-by-side reconstructions written")


@dataclasses.dataclass(frozen=True)
class VAE:
  """`vae` (VAE runs): the video VAE (`sora_jax.models.vae.VAEConfig`)."""
  compression: tuple[int, int, int] = _f((4, 8, 8), "(temporal, spatial, spatial) factors")
  latent_channels: int = _f(16, "latent channels")
  channels: tuple[int, ...] = _f((32, 64, 64), "widths per resolution level")
  num_res_blocks: int = _f(1, "residual blocks per level")
  factorized: bool = _f(False, "(2+1)D convolutions: 1x3x3 then 3x1x1")
  patch: int = _f(1, "p x p pixels folded into channels before the encoder")
  shortcuts: bool = _f(False, "parameter-free resampling shortcuts (DC-AE)")
  decoder_channels: tuple[int, ...] = _f((), "the decoder's widths per level (): channels")


@dataclasses.dataclass(frozen=True)
class VAELoss:
  """`vae_loss` (VAE runs): l1 |x - x'| + l2 (x - x')^2 + kl KL / pixels + a hinge GAN loss."""
  l1_weight: float = _f(1.0, "weight of the mean absolute error")
  l2_weight: float = _f(1.0, "weight of the mean squared error")
  kl_weight: float = _f(1e-3, "weight of the KL term per pixel")
  disc_weight: float = _f(0.0, "weight of the adversarial loss (0: none)")
  disc_start: int = _f(0, "step the adversarial loss starts at")
  disc_channels: int = _f(32, "discriminator base width")
  disc_layers: int = _f(3, "discriminator downsampling layers")
  latent_noise: float = _f(0.0, "decode latents plus Gaussian noise of up to this share of "
                           "their per-channel spread (each clip its own share; 0: none)")


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole config. `vae`, `vae_loss`, `disc_optim` exist in VAE runs only (None otherwise)."""
  seed: int = _f(0, "seed of initialisation and training randomness")
  world: World = _f(World(), "")
  tokenizer: Tokenizer = _f(Tokenizer(), "")
  data: Data = _f(Data(), "")
  media: MediaConfig = _f(MediaConfig(), "")
  text_encoder: TextEncoder = _f(TextEncoder(), "")
  image_encoder: ImageEncoder = _f(ImageEncoder(), "")
  model: Model = _f(Model(), "")
  autoencoder: Autoencoder = _f(Autoencoder(), "")
  flow: Flow = _f(Flow(), "")
  optim: Optim = _f(Optim(), "")
  lora: LoRA = _f(LoRA(), "")
  train: Train = _f(Train(), "")
  mesh: Mesh = _f(Mesh(), "")
  sharding: Sharding = _f(Sharding(), "")
  conditioning: Conditioning = _f(Conditioning(), "")
  sample: Sample = _f(Sample(), "")
  distill: Distill = _f(Distill(), "")
  eval: Eval = _f(Eval(), "")
  vae: VAE | None = _f(None, "")
  vae_loss: VAELoss | None = _f(None, "")
  disc_optim: Optim | None = _f(None, "")


# The class of each section (Optional ones unwrapped).
SECTIONS: dict[str, type] = {
    "world": World, "tokenizer": Tokenizer, "data": Data, "media": MediaConfig,
    "text_encoder": TextEncoder, "image_encoder": ImageEncoder, "model": Model,
    "autoencoder": Autoencoder, "flow": Flow,
    "optim": Optim, "lora": LoRA, "train": Train, "mesh": Mesh, "sharding": Sharding,
    "conditioning": Conditioning, "sample": Sample, "distill": Distill, "eval": Eval,
    "vae": VAE, "vae_loss": VAELoss, "disc_optim": Optim,
}
OPTIONAL_SECTIONS = ("vae", "vae_loss", "disc_optim")


@functools.cache
def field_types(cls: type) -> types.MappingProxyType[str, Any]:
  """`{field name: resolved type}` of a dataclass (read-only). Resolved once per class:
  `typing.get_type_hints` evaluates every annotation each call, and typing a config
  (`convert.typed`, thousands of times in a run's set-up) asks for every section's."""
  return types.MappingProxyType(typing.get_type_hints(cls))


def _type_name(tp: Any) -> str:
  text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
  return text or str(tp).replace("typing.", "")


def _rows(cls: type, prefix: str) -> list[str]:
  rows, hints = [], field_types(cls)
  for f in dataclasses.fields(cls):
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default):
      rows.extend(_rows(type(default), f"{prefix}{f.name}."))
      continue
    doc = f.metadata.get("doc", "").replace("|", "\\|")
    rows.append(f"| `{prefix}{f.name}` | `{_type_name(hints[f.name])}` | `{default!r}` | {doc} |")
  return rows


def reference_markdown() -> str:
  """`docs/reference/config-keys.md`: every key of every section, its type, default and doc."""
  lines = ["# Config keys", "",
           "Generated from `sora_jax/configs/schema.py` by "
           "`python -m sora_jax.configs.reference > docs/reference/config-keys.md`; do not "
           "edit by hand. Override any key with `--config.SECTION.KEY=VALUE`; a key a config "
           "leaves out takes the default below. [The guide](../guides/config-keys.md) says "
           "how configs use them and how they are checked.", "",
           f"- `seed` (`int`, default `{Config.seed!r}`): "
           f"{Config.__dataclass_fields__['seed'].metadata['doc']}", ""]
  for name, cls in SECTIONS.items():
    summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    lines += [f"## `{name}`", "", summary, "",
              "| key | type | default | meaning |", "| --- | --- | --- | --- |",
              *_rows(cls, f"{name}."), ""]
  return "\n".join(lines)
