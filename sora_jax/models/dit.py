"""The spacetime diffusion transformer (Flax NNX).

A video `[B, T, H, W, C]` is cut into `(pt, ph, pw)` patches, embedded, and run
through blocks of: adaLN-modulated self-attention with 3D RoPE and QK norm,
cross-attention to text tokens (with their padding mask), and an adaLN-modulated
MLP; a modulated final layer maps tokens back to patches (the flow velocity).

Architectural presets (e.g. Wan 2.1) are options of these same modules:
  modulation = "per_block": DiT's adaLN-Zero, each block projects the timestep
               embedding to its 6 shift/scale/gate vectors.
             = "shared":    Wan 2.1's scheme, one projection of the timestep for all
               blocks plus a learned per-block table.
  text_projection = "mlp" (Wan's text-embedding MLP) | "linear".
  qk_norm = "rms" | "rms_across_heads" (Wan) | "none".
  cross_attn_norm: affine LayerNorm before cross-attention (Wan).
  text_padding = "mask": cross-attention ignores padding text tokens;
               = "zeros": padding tokens' states are set to zero and attended to, as
               Wan 2.1 is trained (its pipeline zero-pads UMT5 states to 512 tokens).
  image_width > 0: an image branch (Wan 2.1 image-to-video): image-encoder states
               `[B, I, image_width]` are projected (`ImageProjection`) and attended to
               by every cross-attention through its own keys and values.
Gates and the output layer start at zero (adaLN-Zero) in both schemes.

Distilled students (`sora_jax.train.distill`) add scalar inputs to the timestep embedding,
each through its own sinusoidal embedding and MLP whose output starts at zero (so a
student starts as its teacher):
  guidance_embedding: the guidance scale (CFG distillation: one pass per step).
  step_embedding:     the step size d of a shortcut model: the output is then the average
                      velocity over [t - d, t] (d = 0: the flow's velocity).
For fixed values both are a constant added to the timestep embedding, which `folded`
moves into the timestep MLP's last bias (a plain transformer, e.g. for diffusers).

pooled_text: the mean of each caption's text states (its real tokens), through an MLP
whose output starts at zero, is added to the timestep embedding: the caption modulates
every token through adaLN, as a class label does in DiT and pooled text embeddings do in
SD3 and Flux, besides reaching tokens through cross-attention.

What the output layer predicts (`prediction`); the model returns a velocity either way:
  "velocity": the output is the flow velocity (SD3, Wan).
  "data":     the output is the clean video x_0, turned into the velocity
              `(x_t - x_0) / max(t, 0.05)` (`flow.data_to_velocity`; JiT, Li & He
              2025, "Back to Basics: Let Denoising Generative Models Denoise"): clean
              data lie near a low-dimensional manifold that a small model or a patch
              with more values than the width can still reach, where velocities (half
              noise) do not.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.diffusion.flow import data_to_velocity
from sora_jax.models import embeddings, lora
from sora_jax.models.abstract import abstract_module
from sora_jax.models.attention import RESIDUAL_NAME
from sora_jax.models.layers import MLP, Attention, BlockCausal, KVCache, LayerNorm, dense
from sora_jax.models.neural_field import NeuralFieldHead
from sora_jax.parallel import axes
from sora_jax.parallel.sharding import constrain

PREDICTIONS = ("velocity", "data")
OUTPUT_HEADS = ("linear", "field", "mlp")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Hyper-parameters of `DiffusionTransformer` (see module docstring for the options)."""
  width: int
  depth: int
  heads: int
  patch: tuple[int, int, int]
  in_channels: int
  text_width: int
  mlp_ratio: float = 4.0
  mlp_hidden: int = 0        # MLP hidden width; 0: width * mlp_ratio
  token_chunks: int = 1      # per-token work in chunks of tokens (layers.in_token_chunks)
  qk_norm: str = "rms"
  modulation: str = "per_block"
  text_projection: str = "mlp"
  cross_attn_norm: bool = True
  rope_theta: float = 10000.0
  freq_dim: int = 256
  timestep_scale: float = 1000.0
  eps: float = 1e-6
  text_padding: str = "mask"
  scan_layers: bool = False   # stack the blocks' parameters and run them with a scan
  remat: str = "none"         # rematerialisation policy of a block, see REMAT_POLICIES
  # Channels of a frame-conditioning input concatenated to the noisy video (C + 1 with
  # sora_jax.diffusion.conditioning; 0: none).
  cond_channels: int = 0
  # Width of the image-encoder states of the image branch (0: none); image_positions > 0:
  # a learned position table over that many image tokens (Wan's first-last-frame model).
  image_width: int = 0
  image_positions: int = 0
  # Scalar inputs of distilled students (module docstring): the guidance scale, the step size.
  guidance_embedding: bool = False
  step_embedding: bool = False
  prediction: str = "velocity"   # what the output layer predicts (PREDICTIONS)
  # The output layer (OUTPUT_HEADS): "linear" (DiT), or "field": a per-patch neural field
  # whose weights each token predicts, evaluated at every pixel of its patch with the
  # pixel's input values (`sora_jax.models.neural_field`; PixNerd); field_hidden: its width.
  # "mlp": a two-layer MLP of hidden width `head_hidden` from each token to its patch, so
  # that the patches the model can draw span `head_hidden` dimensions instead of `width`
  # (a linear head's patches lie in one `width`-dimensional affine subspace).
  output_head: str = "linear"
  field_hidden: int = 32
  head_hidden: int = 512
  # A linear or MLP head whose tokens each draw their patch plus this many pixels on every
  # side, cross-faded with their neighbours' (`embeddings.unpatchify_overlapping`), so that
  # no seam falls on a token boundary; 0: patches that only meet. Whole raster videos only
  # (not packed rows).
  head_overlap: int = 0
  # Block-causal self-attention (autoregressive video): tokens attend to their own block of
  # this many temporal patch positions (latent frames for patch[0] = 1) and earlier ones;
  # 0: bidirectional.
  causal_frames: int = 0
  # The caption's mean text state added to the timestep embedding (module docstring).
  pooled_text: bool = False
  # Explicit camera control: per-pixel camera rays (6 Plücker values,
  # `sora_jax.data.camera.plucker_rays`) patchified and added to the tokens through a
  # zero-initialised projection (CameraCtrl); 0: no camera input.
  camera_channels: int = 0
  # With a camera input: RoPE positions on the world plane the camera looks at
  # (`embeddings.camera_positions`) instead of the patch grid, so that attention sees a
  # static point of the world at one position in every frame.
  camera_rope: bool = False
  # Self-conditioning (Chen et al. 2022, "Analog Bits"): the model's own estimate of the
  # clean video from the same noisy input, concatenated to it like the conditioning input
  # (`in_channels` more channels; zeros when there is none).
  self_condition: bool = False

  @property
  def input_channels_extra(self) -> int:
    """Channels concatenated to the noisy video: the conditioning input, then the
    self-conditioning estimate."""
    return self.cond_channels + (self.in_channels if self.self_condition else 0)

  def kv_cache_shape(self, rows: int, tokens: int) -> tuple[int, int, int, int, int]:
    """The shape `[depth, rows, tokens, heads, head_dim]` of the keys (and of the values)
    of a KV cache of `tokens` slots per row (`kv_cache.empty_cache`)."""
    return (self.depth, rows, tokens, self.heads, self.width // self.heads)

  @property
  def patch_dim(self) -> int:
    """Values per output patch (the velocity of `in_channels` channels)."""
    return int(np.prod(self.patch)) * self.in_channels

  @property
  def head_patch_dim(self) -> int:
    """Values the output layer draws per token: `patch_dim`, or with `head_overlap` the
    patch grown by the overlap on each spatial side."""
    pt, ph, pw = self.patch
    m = self.head_overlap
    return pt * (ph + 2 * m) * (pw + 2 * m) * self.in_channels

  @property
  def input_patch_dim(self) -> int:
    """Values per input patch: the noisy video, the conditioning input and the
    self-conditioning estimate."""
    return int(np.prod(self.patch)) * (self.in_channels + self.input_channels_extra)

  @property
  def mlp_width(self) -> int:
    return self.mlp_hidden or int(self.width * self.mlp_ratio)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x: `[B, N, D]`; shift, scale: `[B, N, D]` per token or `[B, 1, D]` per row."""
  return x * (1 + scale) + shift


def _per_token(mod: jax.Array, token_example: jax.Array | None) -> jax.Array:
  """Per-example modulation `[B, K, M, D]` -> per token `[B, N|1, M, D]`.

  `token_example [B, N]` holds each token's example index in [0, K); None means one
  example per row (K = 1), kept as a broadcast `[B, 1, M, D]`.
  """
  if token_example is None:
    return mod
  return jnp.take_along_axis(mod, token_example[:, :, None, None], axis=1)


# Which intermediates of a block the backward pass keeps (the rest are recomputed).
# "dots" keeps the matmul outputs and, where attention runs in XLA
# (`attention.dot_product_attention`), its output and log-sum-exp, so that the backward
# pass does not run the attention forward again.
_ATTENTION_RESIDUALS = jax.checkpoint_policies.save_only_these_names(RESIDUAL_NAME)
REMAT_POLICIES = {
    "none": None,                                                # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,            # recompute everything
    "dots": jax.checkpoint_policies.save_from_both_policies(    # keep matmul outputs
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _ATTENTION_RESIDUALS),
    "dots_saveable": jax.checkpoint_policies.dots_saveable,      # keep all dot outputs
    # keep matmul outputs in host memory (TPU: pinned host RAM, copied back for the
    # backward pass; where there is no host memory space, as on CPU, they stay put)
    "dots_offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        offload_src="device", offload_dst="pinned_host"),
}

class ImageProjection(nnx.Module):
  """Image-encoder states `[B, I, image_width]` -> image tokens `[B, I, width]`: LayerNorm,
  a GELU MLP and LayerNorm (Wan's image embedder), after an optional position table."""

  def __init__(self, image_width: int, width: int, *, positions: int = 0, rngs: nnx.Rngs):
    self.positions = (nnx.Param(jnp.zeros((positions, image_width)),
                                out_sharding=(None, axes.TEXT_EMBED)) if positions else None)
    self.norm_in = LayerNorm(image_width, affine=True, eps=1e-5)
    self.mlp = MLP(image_width, image_width, width, (axes.TEXT_EMBED, axes.MLP, axes.EMBED),
                   activation="gelu", rngs=rngs)
    self.norm_out = LayerNorm(width, affine=True, eps=1e-5)

  def __call__(self, image: jax.Array) -> jax.Array:
    if self.positions is not None:
      if image.shape[1] != self.positions.shape[0]:
        raise ValueError(f"image states have {image.shape[1]} tokens; this model's image "
                         f"positions need {self.positions.shape[0]}.")
      image = image + self.positions[...].astype(image.dtype)
    return self.norm_out(self.mlp(self.norm_in(image)))


class DiTBlock(nnx.Module):
  """Self-attention, cross-attention and MLP with adaLN modulation."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d = cfg.width
    self.modulation = cfg.modulation
    self.norm1 = LayerNorm(d, affine=False, eps=cfg.eps)
    chunks = cfg.token_chunks
    self.self_attn = Attention(d, cfg.heads, qk_norm=cfg.qk_norm, eps=cfg.eps,
                               token_chunks=chunks, rngs=rngs)
    self.norm2 = LayerNorm(d, affine=True, eps=cfg.eps) if cfg.cross_attn_norm else None
    # (Cross-attention's queries stay whole: in chunks the Wan 1.3B step needs more HBM.)
    self.cross_attn = Attention(d, cfg.heads, qk_norm=cfg.qk_norm, eps=cfg.eps,
                                image_kv=cfg.image_width > 0, rngs=rngs)
    self.norm3 = LayerNorm(d, affine=False, eps=cfg.eps)
    self.mlp = MLP(d, cfg.mlp_width, d, (axes.EMBED, axes.MLP, axes.EMBED),
                   token_chunks=chunks, rngs=rngs)
    if cfg.modulation == "per_block":
      self.adaln = dense(d, 6 * d, (axes.EMBED, axes.MODULATION), zero_init=True, rngs=rngs)
    elif cfg.modulation == "shared":
      self.scale_shift_table = nnx.Param(jnp.zeros((6, d)), out_sharding=(None, axes.EMBED))
    else:
      raise ValueError(f"modulation={cfg.modulation!r}: expected per_block or shared.")

  def __call__(self, x: jax.Array, cond: jax.Array, text: jax.Array, rope: jax.Array, *,
               segment_ids: jax.Array | None, cross_mask: jax.Array,
               token_example: jax.Array | None, image: jax.Array | None = None,
               causal: BlockCausal | None = None, past: KVCache | None = None,
               return_kv: bool = False
               ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One block.

    Args:
      x: tokens `[B, N, D]`.
      cond: per-example conditioning, `[B, K, D]` (per_block) or `[B, K, 6, D]` (shared).
      text: projected text states `[B, S, D]`.
      rope: `[B, N, head_dim/2]` rotation angles.
      segment_ids: `[B, N]` self-attention stays within a segment, or None (full).
      cross_mask: `[B, 1, N|1, S]` bool.
      token_example: `[B, N]` example index of each token (see `_per_token`), or None.
      image: `[B, I, D]` projected image tokens (models with an image branch).
      causal, past, return_kv: block-causal self-attention, a KV cache of earlier tokens
        and returning this block's self-attention keys and values (`layers.Attention`).

    Returns:
      `[B, N, D]`; with `return_kv`, also the self-attention's keys and values
      `[B, N, H, D]` each.
    """
    if self.modulation == "per_block":
      mod = self.adaln(jax.nn.silu(cond)).reshape(cond.shape[:2] + (6, -1))
    else:
      mod = self.scale_shift_table[...] + cond
    mod = _per_token(mod.astype(jnp.float32), token_example)               # [B, N|1, 6, D]
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = [mod[:, :, i] for i in range(6)]
    h = _modulate(self.norm1(x).astype(jnp.float32), shift_sa, scale_sa).astype(x.dtype)
    attended = self.self_attn(h, rope=rope, segment_ids=segment_ids, causal=causal, past=past,
                              return_kv=return_kv, gate=gate_sa)
    attended, kv = attended if return_kv else (attended, None)
    x = x + attended                            # in x's dtype (gated_dense)
    h = self.norm2(x) if self.norm2 is not None else x
    x = x + self.cross_attn(h, text, mask=cross_mask, image=image)
    h = _modulate(self.norm3(x).astype(jnp.float32), shift_ff, scale_ff).astype(x.dtype)
    x = x + self.mlp(h, gate=gate_ff)
    x = constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    return (x, kv) if return_kv else x


class DiffusionTransformer(nnx.Module):
  """Predicts the flow velocity of a noisy video given the timestep and text."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d = cfg.width
    self.cfg = cfg
    self.patch_embed = dense(cfg.input_patch_dim, d, (axes.PATCH, axes.EMBED), rngs=rngs)
    self.time_mlp = MLP(cfg.freq_dim, d, d, (None, axes.EMBED, axes.EMBED), activation="silu",
                        rngs=rngs)
    if cfg.text_projection == "mlp":
      self.text_proj = MLP(cfg.text_width, d, d, (axes.TEXT_EMBED, axes.EMBED, axes.EMBED),
                           rngs=rngs)
    elif cfg.text_projection == "linear":
      self.text_proj = dense(cfg.text_width, d, (axes.TEXT_EMBED, axes.EMBED), rngs=rngs)
    else:
      raise ValueError(f"text_projection={cfg.text_projection!r}: expected mlp or linear.")
    self.image_proj = (ImageProjection(cfg.image_width, d, positions=cfg.image_positions,
                                       rngs=rngs) if cfg.image_width else None)
    scalar_mlp = lambda: MLP(cfg.freq_dim, d, d, (None, axes.EMBED, axes.EMBED),
                             activation="silu", zero_out=True, rngs=rngs)
    self.guidance_mlp = scalar_mlp() if cfg.guidance_embedding else None
    self.step_mlp = scalar_mlp() if cfg.step_embedding else None
    self.pooled_text_mlp = (MLP(cfg.text_width, d, d, (axes.TEXT_EMBED, axes.EMBED, axes.EMBED),
                                activation="silu", zero_out=True, rngs=rngs)
                            if cfg.pooled_text else None)
    if cfg.modulation == "shared":
      self.time_proj = dense(d, 6 * d, (axes.EMBED, axes.MODULATION), zero_init=True, rngs=rngs)
      self.out_table = nnx.Param(jnp.zeros((2, d)), out_sharding=(None, axes.EMBED))
    else:
      self.out_adaln = dense(d, 2 * d, (axes.EMBED, axes.MODULATION), zero_init=True, rngs=rngs)
    if cfg.text_padding not in ("mask", "zeros"):
      raise ValueError(f"text_padding={cfg.text_padding!r}: expected mask or zeros.")
    if cfg.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={cfg.remat!r}: expected one of {sorted(REMAT_POLICIES)}.")
    if cfg.scan_layers:
      # Parameters stacked on a leading "layers" axis; compile time independent of depth.
      @nnx.split_rngs(splits=cfg.depth)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
      def make_blocks(rngs: nnx.Rngs) -> DiTBlock:
        return DiTBlock(cfg, rngs=rngs)
      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([DiTBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.camera_proj = (dense(int(np.prod(cfg.patch)) * cfg.camera_channels, d,
                              (axes.PATCH, axes.EMBED), zero_init=True, rngs=rngs)
                        if cfg.camera_channels else None)
    self.norm_out = LayerNorm(d, affine=False, eps=cfg.eps)
    if cfg.output_head == "linear":
      self.proj_out = dense(d, cfg.head_patch_dim, (axes.EMBED, axes.PATCH), zero_init=True,
                            rngs=rngs)
    elif cfg.output_head == "mlp":
      self.mlp_out = MLP(d, cfg.head_hidden, cfg.head_patch_dim, (axes.EMBED, axes.MLP, axes.PATCH),
                         zero_out=True, token_chunks=cfg.token_chunks, rngs=rngs)
    elif cfg.output_head == "field":
      self.field_out = NeuralFieldHead(d, cfg.patch, cfg.in_channels + cfg.input_channels_extra,
                                       cfg.in_channels, cfg.field_hidden, rngs=rngs)
    else:
      raise ValueError(f"output_head={cfg.output_head!r}: expected one of {OUTPUT_HEADS}.")
    if cfg.head_overlap and (cfg.head_overlap < 0 or cfg.output_head == "field"
                             or 2 * cfg.head_overlap > min(cfg.patch[1:])):
      raise ValueError(f"head_overlap={cfg.head_overlap}: needs a linear or mlp head and "
                       f"0 <= 2 * overlap <= the patch's height and width {cfg.patch[1:]}.")

  def __call__(self, x: jax.Array, t: jax.Array, text: jax.Array, text_mask: jax.Array, *,
               positions: jax.Array | None = None,
               conditioning: jax.Array | None = None,
               image: jax.Array | None = None,
               block_residual: jax.Array | None = None,
               return_residual: bool = False,
               guidance: jax.Array | None = None,
               step_size: jax.Array | None = None,
               kv_cache: KVCache | None = None,
               return_kv: bool = False,
               camera: jax.Array | None = None,
               self_condition: jax.Array | None = None
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flow velocity of whole videos (one example per row), or of a chunk of one after the
    keys and values of its past (`kv_cache`, block-causal models).

    Args:
      x: noisy video `[B, T, H, W, C]`.
      t: flow time `[B]` in [0, 1] (1 is pure noise), or `[B, N]`: one per token (the
        patch grid's raster order; Wan 2.2 TI2V runs its given first frame at t = 0).
      text: text-encoder states `[B, L, text_width]`.
      text_mask: `[B, L]` bool, True for real tokens.
      positions: `[B, N, 3]` token (t, h, w) positions; the patch grid when None.
      conditioning: `[B, T, H, W, cond_channels]` given frames and their mask
        (`sora_jax.diffusion.conditioning.conditioning_input`); zeros (nothing given)
        when None. Only for models built with `cond_channels > 0`.
      image: `[B, I, image_width]` image-encoder states (models with an image branch).
      block_residual, return_residual: step caching (see `forward_tokens`).
      guidance, step_size: `[B]` a distilled student's scalar inputs (see `forward_tokens`).
      kv_cache, return_kv: autoregressive chunks (see `forward_tokens`); `positions` then
        carry the chunk's place in the whole video.
      camera: `[B, T, H, W, camera_channels]` per-pixel camera rays of a model with a
        camera input (zeros, no camera, when None); with `cfg.camera_rope` they also place
        the tokens (`embeddings.camera_positions`).
      self_condition: `[B, T, H, W, C]` the model's earlier estimate of the clean video
        (`cfg.self_condition` models; zeros, no estimate, when None).

    Returns:
      velocity `[B, T, H, W, C]` in x's dtype; with `return_residual`, also the blocks'
      residual `[B, N, D]`; with `return_kv`, also the chunk's keys and values.
    """
    cfg = self.cfg
    b, frames, height, width, _ = x.shape
    grid = (frames // cfg.patch[0], height // cfg.patch[1], width // cfg.patch[2])
    if cfg.cond_channels:
      if conditioning is None:
        conditioning = jnp.zeros(x.shape[:4] + (cfg.cond_channels,), x.dtype)
      x = jnp.concatenate([x, conditioning.astype(x.dtype)], axis=-1)
    elif conditioning is not None:
      raise ValueError("this transformer has no conditioning input (cond_channels=0).")
    if cfg.self_condition:
      if self_condition is None:
        self_condition = jnp.zeros(x.shape[:4] + (cfg.in_channels,), x.dtype)
      x = jnp.concatenate([x, self_condition.astype(x.dtype)], axis=-1)
    elif self_condition is not None:
      raise ValueError("this transformer has no self-conditioning input "
                       "(model.self_condition).")
    patches = embeddings.patchify(x, cfg.patch)                             # [B, N, P_in]
    camera_tokens = None
    if camera is not None and not cfg.camera_channels:
      raise ValueError("this transformer has no camera input (model.camera_control).")
    if cfg.camera_channels:    # no camera: zero rays, as training's camera dropout shows it
      if camera is None:
        camera = jnp.zeros(x.shape[:4] + (cfg.camera_channels,), x.dtype)
      camera_tokens = embeddings.patchify(camera.astype(x.dtype), cfg.patch)  # [B, N, P*6]
    # Raster rows from position 0: causal blocks are runs of tokens (splash needs that).
    raster = positions is None
    if cfg.camera_rope:
      if not cfg.camera_channels or positions is not None:
        raise ValueError("camera_rope places the tokens of whole videos by a camera input "
                         "(camera_channels > 0, no positions given).")
      positions = embeddings.camera_positions(camera, cfg.patch)
    if positions is None:
      positions = jnp.broadcast_to(embeddings.grid_positions(grid), patches.shape[:2] + (3,))
    per_token = t.ndim == 2
    out = self.forward_tokens(patches, positions, t if per_token else t[:, None], text,
                              text_mask, image=image, per_token_times=per_token,
                              block_residual=block_residual, return_residual=return_residual,
                              guidance=guidance, step_size=step_size, kv_cache=kv_cache,
                              return_kv=return_kv, camera_tokens=camera_tokens,
                              causal_block_tokens=(cfg.causal_frames * grid[1] * grid[2]
                                                   if raster and cfg.causal_frames else None),
                              grid=grid)
    if return_residual or return_kv:
      out, extra = out
      return embeddings.unpatchify(out, grid, cfg.patch, cfg.in_channels), extra
    return embeddings.unpatchify(out, grid, cfg.patch, cfg.in_channels)

  def scalar_offset(self, batch: int, guidance: jax.Array | None,
                    step_size: jax.Array | None, dtype=jnp.float32) -> jax.Array:
    """`[B, D]` what a distilled student's scalar inputs add to the timestep embedding
    (zeros for a model without them)."""
    cfg = self.cfg
    if (guidance is None) == (self.guidance_mlp is not None):
      raise ValueError("guidance (the guidance scale) is required by, and only by, a "
                       f"transformer with a guidance embedding (guidance_embedding="
                       f"{cfg.guidance_embedding}).")
    if step_size is not None and self.step_mlp is None:
      raise ValueError("step_size is only for a transformer with a step embedding (a "
                       "shortcut student).")
    offset = jnp.zeros((batch, cfg.width), dtype)
    for mlp, value in ((self.guidance_mlp, guidance), (self.step_mlp, step_size)):
      if mlp is not None:
        value = jnp.zeros((batch,)) if value is None else jnp.broadcast_to(value, (batch,))
        freq = embeddings.timestep_embedding(value * cfg.timestep_scale, cfg.freq_dim)
        offset = offset + mlp(freq.astype(dtype))
    return offset

  def forward_tokens(self, patches: jax.Array, positions: jax.Array, t: jax.Array,
                     text: jax.Array, text_mask: jax.Array, *,
                     segment_ids: jax.Array | None = None,
                     text_segment_ids: jax.Array | None = None,
                     image: jax.Array | None = None,
                     per_token_times: bool = False,
                     block_residual: jax.Array | None = None,
                     return_residual: bool = False,
                     guidance: jax.Array | None = None,
                     step_size: jax.Array | None = None,
                     kv_cache: KVCache | None = None,
                     return_kv: bool = False,
                     causal_block_tokens: int | None = None,
                     camera_tokens: jax.Array | None = None,
                     grid: Sequence[int] | None = None,
                     ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flow velocity of spacetime patches, possibly several examples packed per row.

    Args:
      patches: `[B, N, P_in]` flattened patches (`embeddings.patchify`) of the video and
        the conditioning input, if any (`input_patch_dim` values).
      positions: `[B, N, 3]` each token's own (t, h, w) position.
      t: `[B, K]` flow time of each example of a row (K = 1 when not packed).
      text: `[B, S, text_width]` text states; text_mask: `[B, S]` bool.
      segment_ids: `[B, N]` int, token n belongs to example `segment_ids - 1` of its row;
        0 marks padding. None: every token belongs to the row's single example.
      text_segment_ids: `[B, S]` the same for text tokens (required with segment_ids).
      image: `[B, I, image_width]` image-encoder states, one image per row (required by,
        and only for, models with an image branch; not with packed rows).
      per_token_times: `t` is `[B, N]`, a flow time per token (modulation per token;
        not with packed rows).
      block_residual: `[B, N, D]` what the blocks added to the tokens at an earlier call
        (step caching, `sora_jax.diffusion.step_cache`): added instead of running them.
      return_residual: also return what the blocks added, `[B, N, D]` (the tokens after
        the last block minus those before the first).
      guidance: `[B]` guidance scale, required by (and only for) a model with
        `guidance_embedding` (a CFG-distilled student).
      step_size: `[B]` step size d in [0, 1] of a model with `step_embedding` (a shortcut
        student; None: 0, the flow's velocity): the output is the average velocity over
        [t - d, t], so `x - d * output` is the next point.
      kv_cache: the self-attention keys and values of earlier tokens, `keys`/`values`
        `[depth, B, L, H, D]` and `valid` `[B, L]` (`layers.KVCache`): the tokens here are a
        chunk that follows them (block-causal models, autoregressive sampling; rows of one
        video, no step caching). Each block attends to its own layer's cache.
      return_kv: also return this call's keys and values, `([depth, B, N, H, D],) * 2`,
        what a cache of these tokens holds.
      causal_block_tokens: with `cfg.causal_frames`, the static tokens per causal block when
        the rows are one video's raster patches from position 0 (splash attention's static
        mask; `__call__` passes it), else None.
      camera_tokens: `[B, N, P * camera_channels]` patchified camera rays, added to the
        tokens through the zero-initialised `camera_proj` (a model with a camera input).
      grid: `(t, h, w)` patches when each row is one video's patches in raster order
        (`__call__` passes it), which an overlapping head (`cfg.head_overlap`) blends; else
        None.

    Returns:
      `[B, N, P]` velocity per patch; padding tokens' values are meaningless. With
      `return_residual`, `(velocity, residual)`; with `return_kv`, `(velocity, (keys,
      values))`.
    """
    cfg = self.cfg
    b, k = t.shape
    tokens = self.patch_embed(patches.astype(self.patch_embed.kernel.dtype))  # [B, N, D]
    if camera_tokens is not None:
      tokens = tokens + self.camera_proj(camera_tokens.astype(tokens.dtype))
    tokens = constrain(tokens, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    rope = embeddings.rope_angles(positions, cfg.width // cfg.heads, cfg.rope_theta)
    attended = text_mask if cfg.text_padding == "mask" else jnp.ones_like(text_mask)
    if per_token_times:
      if segment_ids is not None or t.shape != patches.shape[:2]:
        raise ValueError(f"forward_tokens: per-token times need t [B, N] = "
                         f"{patches.shape[:2]} (got {t.shape}) and no packed rows.")
      token_example = jnp.broadcast_to(jnp.arange(k), (b, k))             # token n: time n
      cross_mask = attended[:, None, None, :]
    elif segment_ids is None:
      token_example = None
      cross_mask = attended[:, None, None, :]                              # [B, 1, 1, S]
    else:
      if text_segment_ids is None:
        raise ValueError("forward_tokens: text_segment_ids is required with segment_ids.")
      token_example = jnp.maximum(segment_ids - 1, 0)                       # [B, N]
      cross_mask = ((segment_ids[:, :, None] == text_segment_ids[:, None, :])
                    & attended[:, None, :] & (segment_ids[:, :, None] > 0))[:, None]
    if cfg.text_padding == "zeros":
      text = jnp.where(text_mask[..., None], text, 0)

    freq = embeddings.timestep_embedding(t.reshape(-1) * cfg.timestep_scale, cfg.freq_dim)
    temb = self.time_mlp(freq.astype(tokens.dtype)).reshape(b, k, -1)       # [B, K, D]
    temb = temb + self.scalar_offset(b, guidance, step_size, tokens.dtype)[:, None]
    if self.pooled_text_mlp is not None:
      pooled = pooled_text(text, text_mask,
                           None if per_token_times else text_segment_ids,
                           1 if per_token_times else k)                     # [B, K, W]
      temb = temb + self.pooled_text_mlp(pooled.astype(tokens.dtype))
    if cfg.modulation == "shared":
      cond = self.time_proj(jax.nn.silu(temb)).reshape(b, k, 6, -1)         # [B, K, 6, D]
      out_mod = self.out_table[...] + temb[:, :, None]                     # [B, K, 2, D]
    else:
      cond = temb
      out_mod = self.out_adaln(jax.nn.silu(temb)).reshape(b, k, 2, -1)

    context = self.text_proj(text.astype(tokens.dtype))                     # [B, S, D]
    if (image is None) != (self.image_proj is None):
      raise ValueError("image states are required by, and only by, a transformer with an "
                       f"image branch (model.image_width={cfg.image_width}).")
    if image is not None:
      if segment_ids is not None:
        raise ValueError("forward_tokens: image states are one per row; packed rows "
                         "(segment_ids) are not supported with an image branch.")
      image = self.image_proj(image.astype(tokens.dtype))                   # [B, I, D]

    causal = None
    if cfg.causal_frames:
      causal = BlockCausal(positions[..., 0].astype(jnp.int32) // cfg.causal_frames,
                           causal_block_tokens)
    if (kv_cache is not None or return_kv) and (
        segment_ids is not None or block_residual is not None or return_residual):
      raise ValueError("forward_tokens: a KV cache is for rows of one video, without step "
                       "caching.")
    if kv_cache is not None and not cfg.causal_frames:
      raise ValueError("forward_tokens: a KV cache needs a block-causal model "
                       "(model.causal_frames > 0): a bidirectional one's past attends to "
                       "its future.")

    def apply(block: DiTBlock, x: jax.Array, index: jax.Array, kv):
      past = None if kv is None else KVCache(kv[0], kv[1], kv_cache.valid)
      with lora.stack_layer(index):     # each layer's own LoRA dropout masks (training)
        return block(x, cond, context, rope, segment_ids=segment_ids, cross_mask=cross_mask,
                     token_example=token_example, image=image, causal=causal, past=past,
                     return_kv=return_kv)

    if cfg.remat != "none":
      # Under a scan the CSE barrier jax.checkpoint adds by default is not needed (the
      # loop keeps XLA from merging the recomputation into the forward pass), as MaxText
      # and MaxDiffusion set it; without it the Wan 1.3B step on v5p-8 compiles under a
      # 187 MiB smaller HBM cap (docs/results/tpu-plans.md).
      apply = nnx.remat(apply, policy=REMAT_POLICIES[cfg.remat],
                        prevent_cse=not cfg.scan_layers)
    layers = jnp.arange(cfg.depth, dtype=jnp.int32)
    past_kv = None if kv_cache is None else (kv_cache.keys, kv_cache.values)
    before = tokens
    new_kv = None
    if block_residual is not None:
      tokens = before + block_residual.astype(before.dtype)
    elif cfg.scan_layers:
      tokens = nnx.scan(apply, in_axes=(0, nnx.Carry, 0, None if past_kv is None else 0),
                        out_axes=(nnx.Carry, 0) if return_kv else nnx.Carry)(
          self.blocks, tokens, layers, past_kv)
      if return_kv:
        tokens, new_kv = tokens
    else:
      kvs = []
      for index, block in enumerate(self.blocks):
        layer_kv = None if past_kv is None else (past_kv[0][index], past_kv[1][index])
        tokens = apply(block, tokens, layers[index], layer_kv)
        if return_kv:
          tokens, kv = tokens
          kvs.append(kv)
      if return_kv:
        new_kv = tuple(jnp.stack(x) for x in zip(*kvs))
    residual = tokens - before
    out_mod = _per_token(out_mod.astype(jnp.float32), token_example)        # [B, N|1, 2, D]
    h = _modulate(self.norm_out(tokens).astype(jnp.float32), out_mod[:, :, 0], out_mod[:, :, 1])
    if cfg.output_head == "field":                                          # [B, N, P]
      out = self.field_out(h.astype(tokens.dtype), patches)
    elif cfg.output_head == "mlp":
      out = self.mlp_out(h.astype(tokens.dtype))
    else:
      out = self.proj_out(h.astype(tokens.dtype))
    if cfg.head_overlap:
      if grid is None:
        raise ValueError("an overlapping head (head_overlap) blends whole raster videos: not "
                         "packed rows or tokens without their grid.")
      video = embeddings.unpatchify_overlapping(out, grid, cfg.patch, cfg.in_channels,
                                                cfg.head_overlap)
      out = embeddings.patchify(video, cfg.patch)                           # [B, N, P]
    if cfg.prediction == "data":
      times = t if token_example is None else jnp.take_along_axis(t, token_example, axis=1)
      out = data_to_velocity(out, noisy_values(patches, cfg), times)
    if return_kv:
      return out, new_kv
    return (out, residual) if return_residual else out


def pooled_text(text: jax.Array, text_mask: jax.Array, text_segment_ids: jax.Array | None,
                examples: int) -> jax.Array:
  """The mean text state of each example's real tokens, `[B, K, W]` (zeros for an empty
  caption).

  Args:
    text: `[B, S, W]` text states; text_mask: `[B, S]` bool, True for real tokens.
    text_segment_ids: `[B, S]` token s belongs to example `text_segment_ids - 1` of its row
      (packed rows; 0: padding), or None: one example per row.
    examples: K, the examples per row (1 without segment ids).
  """
  if text_segment_ids is None:
    weights = text_mask[:, :, None]                                          # [B, S, 1]
  else:
    weights = (text_segment_ids[:, :, None] == jnp.arange(1, examples + 1)) & text_mask[..., None]
  weights = weights.astype(jnp.float32)
  total = jnp.einsum("bsk,bsw->bkw", weights, text.astype(jnp.float32))
  return total / jnp.maximum(weights.sum(axis=1), 1.0)[..., None]


def noisy_values(patches: jax.Array, cfg: DiTConfig) -> jax.Array:
  """`[B, N, P]` the noisy video's values of input patches `[B, N, P_in]` (without the
  conditioning input's and the self-conditioning estimate's channels, which `patchify`
  interleaves per pixel)."""
  if not cfg.input_channels_extra:
    return patches
  b, n, _ = patches.shape
  per_pixel = patches.reshape(b, n, -1, cfg.in_channels + cfg.input_channels_extra)
  return per_pixel[..., :cfg.in_channels].reshape(b, n, -1)


def folded(dit: DiffusionTransformer, *, guidance: float | None = None,
           step_size: float | None = None) -> DiffusionTransformer:
  """A plain transformer (no scalar inputs) equal to a distilled student `dit` at fixed
  `guidance` (required by a guidance embedding) and `step_size` (a step embedding's; None:
  0): their constant offset of the timestep embedding moves into the timestep MLP's last
  bias. What a format without those inputs (diffusers' Wan) can hold."""
  offset = dit.scalar_offset(
      1, None if guidance is None else jnp.full((1,), guidance, jnp.float32),
      None if step_size is None else jnp.full((1,), step_size, jnp.float32))[0]
  cfg = dataclasses.replace(dit.cfg, guidance_embedding=False, step_embedding=False)
  graphdef, abstract = abstract_module((DiffusionTransformer, cfg),
                                       lambda: DiffusionTransformer(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(dit))
  params.pop("guidance_mlp", None)
  params.pop("step_mlp", None)
  bias = params["time_mlp"]["fc2"]["bias"]
  params["time_mlp"]["fc2"]["bias"] = (bias.astype(jnp.float32) + offset).astype(bias.dtype)
  nnx.replace_by_pure_dict(abstract, params)
  return nnx.merge(graphdef, abstract)
