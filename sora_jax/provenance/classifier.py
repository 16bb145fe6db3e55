"""A generated-vs-real video classifier: a small 3D CNN trained on real clips against samples.

It learns what separates *this* system's samples from the real videos it is shown (on
the procedural world: blurred or fragmented shapes, colour noise, objects that appear or
melt); it is not a general deepfake detector, and a better generator, a new domain or
heavy post-processing moves it off its training distribution. The watermark
(`watermark.py`) is the primary signal; the classifier covers outputs whose watermark was
removed or never embedded.

  model = train_classifier(real, generated, steps=400)     # uint8 [N, T, H, W, 3] each
  p = generated_probability(model, videos)                 # [N] in [0, 1]
  roc_auc(p[is_generated], p[~is_generated])
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sora_jax.data.pipeline import normalise_video
from sora_jax.models.convolution import video_conv


class VideoClassifier(nnx.Module):
  """uint8-range videos `[B, T, H, W, 3]` (as float in [-1, 1]) -> logits `[B]`
  (positive: generated). Strided 3x3x3 convolutions, then a mean over positions."""

  def __init__(self, channels: Sequence[int] = (16, 32, 64), *, rngs: nnx.Rngs):
    convs, prev = [], 3
    for i, width in enumerate(channels):
      strides = (1, 2, 2) if i == 0 else (2, 2, 2)
      convs.append(video_conv(prev, width, (3, 3, 3), strides=strides, rngs=rngs))
      prev = width
    self.convs = nnx.List(convs)
    self.norms = nnx.List([nnx.GroupNorm(c, num_groups=min(8, c), rngs=rngs) for c in channels])
    self.head = nnx.Linear(prev, 1, rngs=rngs)

  def __call__(self, video: jax.Array) -> jax.Array:
    h = video
    for conv, norm in zip(self.convs, self.norms):
      h = jax.nn.gelu(norm(conv(h)))
    return self.head(h.mean(axis=(1, 2, 3)))[:, 0]


def train_classifier(real: np.ndarray, generated: np.ndarray, *, steps: int = 400,
                     batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0,
                     channels: Sequence[int] = (16, 32, 64)) -> VideoClassifier:
  """Trains on uint8 `real [N, T, H, W, 3]` (label 0) and `generated [M, ...]` (label 1),
  same sizes, with logistic loss, Adam and balanced batches (half of each)."""
  real, generated = np.asarray(real), np.asarray(generated)
  if real.shape[1:] != generated.shape[1:] or real.ndim != 5:
    raise ValueError(f"real {real.shape} and generated {generated.shape} must both be "
                     "[N, T, H, W, 3] of one size.")
  if batch_size < 2 or batch_size % 2:
    raise ValueError(f"batch_size={batch_size} must be even (half real, half generated).")
  model = VideoClassifier(channels, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, video, label):
    def loss_fn(model):
      return optax.sigmoid_binary_cross_entropy(model(video), label).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  half = batch_size // 2
  label = np.concatenate([np.zeros(half), np.ones(half)]).astype(np.float32)
  for _ in range(steps):
    batch = np.concatenate([real[rng.integers(len(real), size=half)],
                            generated[rng.integers(len(generated), size=half)]])
    step(model, optimizer, jnp.asarray(normalise_video(batch)), jnp.asarray(label))
  return model


def generated_probability(model: VideoClassifier, videos: np.ndarray, batch_size: int = 64
                          ) -> np.ndarray:
  """The classifier's probability that each uint8 video `[N, T, H, W, 3]` is generated, `[N]`."""
  forward = nnx.jit(lambda m, v: jax.nn.sigmoid(m(v)))
  videos = np.asarray(videos)
  return np.concatenate([
      np.asarray(forward(model, jnp.asarray(normalise_video(videos[i:i + batch_size]))))
      for i in range(0, len(videos), batch_size)])


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
  """Area under the ROC curve of scores that should be higher for `positive`: the
  probability that a random positive outscores a random negative (ties count half)."""
  positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
  greater = (positive[:, None] > negative[None, :]).mean()
  ties = (positive[:, None] == negative[None, :]).mean()
  return float(greater + 0.5 * ties)
