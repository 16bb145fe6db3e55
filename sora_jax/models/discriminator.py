"""A 3D patch discriminator for adversarial VAE training, and its hinge losses.

`PatchDiscriminator3d` maps a video `[B, T, H, W, C]` to a grid of real/fake logits
`[B, T', H', W', 1]`, one per spacetime patch (PatchGAN, extended to time as in the
MAGVIT and Open-Sora-Plan video VAEs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models.convolution import video_conv
from sora_jax.models.vae_blocks import conv_initializers
from sora_jax.parallel import axes


class PatchDiscriminator3d(nnx.Module):
  """Strided 3D convolutions with leaky ReLUs; each layer halves space, every other one time."""

  def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 3, *,
               rngs: nnx.Rngs):
    def conv(cin, cout, stride, kernel=(3, 4, 4), out_axis=axes.CONV_OUT):
      return video_conv(
          cin, cout, kernel_size=kernel, strides=stride, padding=((1, 1), (1, 1), (1, 1)),
          **conv_initializers(out_axis), rngs=rngs)

    convs, prev = [], in_channels
    for i in range(layers):
      width = channels * 2 ** i
      convs.append(conv(prev, width, (2 if i % 2 else 1, 2, 2)))
      prev = width
    self.convs = nnx.List(convs)
    # One output channel: replicated (fsdp could not split it).
    self.head = conv(prev, 1, (1, 1, 1), kernel=(3, 3, 3), out_axis=None)

  def __call__(self, video: jax.Array) -> jax.Array:
    h = video
    for conv in self.convs:
      h = jax.nn.leaky_relu(conv(h), 0.2)
    return self.head(h).astype(jnp.float32)


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """`mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))`."""
  return jax.nn.relu(1.0 - real_logits).mean() + jax.nn.relu(1.0 + fake_logits).mean()


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
  """`-mean(D(fake))`: the generator (decoder) pushes its outputs towards "real"."""
  return -fake_logits.mean()
