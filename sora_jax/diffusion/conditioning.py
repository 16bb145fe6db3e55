"""Frame conditioning: some frames of the diffused clip are given, the rest are generated.

One mechanism serves image-to-video (the first frame given), extension (the first or last
k frames given), connecting two videos (first and last k) and training for all of them.
The transformer sees, beside the noisy clip `x_t [B, T, H, W, C]`, a conditioning input
`[B, T, H, W, C + 1]`: the given frames (clean, or slightly noised at the config's
`noise` level) with zeros elsewhere, and a mask channel that is 1 on given frames
(the channel-concatenation scheme of Wan 2.1's image-to-video model). Given frames carry
no loss, and the sampler puts them back into its output unchanged.

Frames are the diffused frames: pixel frames for a pixel model, latent frames for a
latent one (`latent_frame_mask` maps a mask over video frames to latent frames).

That is the "channels" scheme. Imported Wan 2.1 image-to-video models use their own
("wan", `wan_conditioning_input`, sampling only): f mask channels per latent frame (one
per video frame the latent frame folds, f the autoencoder's temporal factor) followed by
the encoding of the whole video with its free frames set to zero; nothing is pasted back.
Imported Wan 2.2 TI2V models use "replace" (sampling only): no conditioning input; the
given latent frames replace the noisy ones before every evaluation, at flow time 0 on
their tokens (`sora_jax.sample.guided_velocity`), and are put back into the output.
Pure functions; `[B, T]` masks are bool, True for given frames.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from sora_jax.diffusion import flow

# Mask kinds drawn in training, in this order (config: conditioning.probs.<kind>).
KINDS = ("none", "first", "first_k", "last_k", "first_last", "random")
SCHEMES = ("channels", "wan", "replace")


def _section(config):
  """The `conditioning` section of a ConfigDict or of a typed config (None when absent)."""
  if isinstance(config, ml_collections.ConfigDict):
    return config.get("conditioning")
  return getattr(config, "conditioning", None)


def enabled(config) -> bool:
  """Whether the run trains with frame conditioning (any kind but "none" has mass); `config`
  is a ConfigDict or a typed config (`sora_jax.configs.typed`)."""
  section = _section(config)
  if section is None:
    return False
  return any(float(p) > 0 for kind, p in section.probs.items() if kind != "none")


def scheme(config) -> str:
  """The conditioning input's layout: "channels" (sora_jax's) or "wan" (see module doc)."""
  section = _section(config)
  if section is None:
    return "channels"
  if isinstance(section, ml_collections.ConfigDict):
    return str(section.get("scheme", "channels"))
  return section.scheme


def extra_channels(config, channels: int, temporal_factor: int = 1) -> int:
  """Channels the conditioning input adds to the transformer's input: `C + 1` (channels),
  `f + C` (wan, f the temporal factor) or 0 (no conditioning, or replace)."""
  if not enabled(config) or scheme(config) == "replace":
    return 0
  return channels + (temporal_factor if scheme(config) == "wan" else 1)


def validate(config) -> None:
  """Raises ValueError naming the `conditioning.*` key at fault."""
  section = _section(config)
  if section is None:
    return
  unknown = set(section.probs) - set(KINDS)
  if unknown:
    raise ValueError(f"conditioning.probs: unknown kinds {sorted(unknown)}; known {KINDS}.")
  probs = [float(section.probs.get(k, 0.0)) for k in KINDS]
  if min(probs) < 0 or sum(probs) <= 0:
    raise ValueError(f"conditioning.probs={dict(section.probs)}: need non-negative "
                     "probabilities with a positive sum.")
  if int(section.max_frames) < 1:
    raise ValueError(f"conditioning.max_frames={section.max_frames} must be positive.")
  if not 0.0 <= float(section.noise) < 1.0:
    raise ValueError(f"conditioning.noise={section.noise} must be in [0, 1).")
  if scheme(config) not in SCHEMES:
    raise ValueError(f"conditioning.scheme={scheme(config)!r}: expected one of {SCHEMES}.")


def sample_frame_masks(key: jax.Array, batch: int, frames: int, probs: Mapping[str, float],
                       max_frames: int) -> jax.Array:
  """Random training masks `[batch, frames]`, one kind per example drawn from `probs`.

  first: frame 0; first_k / last_k: k frames at the start / end, k uniform in
  [1, max_frames]; first_last: k at each end; random: each frame with probability 1/2.
  At least one frame always stays free (a one-frame clip is never conditioned).
  """
  k_kind, k_count, k_random, k_free = jax.random.split(key, 4)
  weights = jnp.asarray([float(probs.get(k, 0.0)) for k in KINDS], jnp.float32)
  kind = jax.random.categorical(k_kind, jnp.log(weights), shape=(batch,))[:, None]  # [B, 1]
  k = jax.random.randint(k_count, (batch, 1), 1, max_frames + 1)
  idx = jnp.arange(frames)[None]                                                 # [1, T]
  masks = jnp.stack([
      jnp.zeros((batch, frames), bool),
      jnp.broadcast_to(idx == 0, (batch, frames)),
      idx < k,
      idx >= frames - k,
      (idx < k) | (idx >= frames - k),
      jax.random.bernoulli(k_random, 0.5, (batch, frames)),
  ])                                                                             # [kinds, B, T]
  mask = jnp.take_along_axis(masks, kind[None], axis=0)[0]
  # Keep a free frame: if everything is given, free one at random.
  free = jax.random.randint(k_free, (batch, 1), 0, frames)
  return jnp.where(mask.all(-1, keepdims=True), mask & (idx != free), mask)


def conditioning_input(clean: jax.Array, mask: jax.Array, *, noise_level: float = 0.0,
                       key: jax.Array | None = None, noise: jax.Array | None = None
                       ) -> jax.Array:
  """The transformer's conditioning input `[B, T, H, W, C + 1]`.

  Args:
    clean: `[B, T, H, W, C]` clean clip (only its given frames are used).
    mask: `[B, T]` bool, True for given frames.
    noise_level: flow time at which given frames are shown (0: clean); the noise is
      `noise` (like `clean`) or drawn from `key`.

  Returns:
    given frames (noised to `noise_level`) with zeros elsewhere, and the mask as a last
    channel.
  """
  given = clean.astype(jnp.float32)
  if noise_level > 0:
    if noise is None:
      if key is None:
        raise ValueError("conditioning_input: noise_level > 0 needs a key or noise.")
      noise = jax.random.normal(key, given.shape)
    given = (1 - noise_level) * given + noise_level * noise.astype(jnp.float32)
  m = mask[:, :, None, None, None].astype(jnp.float32)
  channel = jnp.broadcast_to(m, clean.shape[:4] + (1,))
  return jnp.concatenate([given * m, channel], axis=-1).astype(clean.dtype)


def masked_mse(prediction: jax.Array, target: jax.Array, mask: jax.Array,
               weights: jax.Array | None = None,
               gradient_weights: jax.Array | float | None = None) -> jax.Array:
  """Per-example MSE `[B]` over the free frames only (`mask [B, T]` True = given), each
  frame's MSE times its weight (`weights [B, T]`, e.g. `flow.loss_weights` of per-frame
  times) when given; `gradient_weights` (broadcasting to `[B, T]`) adds `flow.frame_mse`'s
  gradient-difference term."""
  err = flow.frame_mse(prediction, target, gradient_weights)                     # [B, T]
  if weights is not None:
    err = err * weights
  free = (~mask).astype(jnp.float32)
  return (err * free).sum(-1) / jnp.maximum(free.sum(-1), 1.0)


def latent_frame_mask(mask: jax.Array, temporal_factor: int) -> jax.Array:
  """Maps a mask over video frames `[B, T]` to latent frames `[B, 1 + (T - 1) / f]` of a
  causal autoencoder (latent 0 is frame 0; latent j >= 1 is frames 1 + f (j - 1) .. f j):
  a latent frame is given when all its frames are. f = 1 is the identity."""
  if temporal_factor == 1:
    return mask
  b, t = mask.shape
  if (t - 1) % temporal_factor:
    raise ValueError(f"{t} frames do not fit a temporal factor of {temporal_factor}.")
  rest = mask[:, 1:].reshape(b, (t - 1) // temporal_factor, temporal_factor).all(-1)
  return jnp.concatenate([mask[:, :1], rest], axis=1)


def wan_conditioning_input(latent: jax.Array, mask: jax.Array,
                           temporal_factor: int) -> jax.Array:
  """Wan 2.1 image-to-video's conditioning input `[B, T', H', W', f + C]`.

  Args:
    latent: `[B, T', H', W', C]` the encoding of the video with its free frames zeroed.
    mask: `[B, T]` bool over video frames, T = 1 + f (T' - 1).
    temporal_factor: f.

  Returns:
    f mask channels (channel j of latent frame i is video frame f i + j - (f - 1) for
    i >= 1, frame 0 for every channel of latent frame 0), then `latent`.
  """
  f = temporal_factor
  b, t = mask.shape
  if (t - 1) % f or 1 + (t - 1) // f != latent.shape[1]:
    raise ValueError(f"{t} frames do not fold into {latent.shape[1]} latent frames of "
                     f"{f} frames.")
  frames = jnp.concatenate([jnp.repeat(mask[:, :1], f, axis=1), mask[:, 1:]], axis=1)
  channels = frames.reshape(b, latent.shape[1], 1, 1, f).astype(latent.dtype)
  channels = jnp.broadcast_to(channels, latent.shape[:4] + (f,))
  return jnp.concatenate([channels, latent], axis=-1)
