"""A per-patch neural-field output head for pixel-space transformers (PixNerd: Wang et al.
2025, "PixNerd: Pixel Neural Field Diffusion").

A linear output layer maps a token's final state `[D]` to its patch's `P = pt*ph*pw*C`
values: every patch it can draw lies in one D-dimensional affine subspace, so a large
pixel patch (2x8x8x3 = 384 values, or more, from D = 128) comes out blurred, with seams at
patch borders. Here each token's state instead gives the weights of a small MLP, a neural
field, evaluated at every pixel of its patch:

  u_p    = [dct(p), x_p]                  pixel p's place in the patch (DCT basis values,
                                          `dct_encoding`) and its input values (the noisy
                                          video and any conditioning channels)  [E + C_in]
  W1, W2 = reshape(A h), reshape(B h)     the token's field weights [E + C_in, F], [F, C]
  W1     = W1 / ||W1[:, f]||              each hidden unit's input weights normalised
                                          (PixNerd's normalisation of the predicted weights)
  out_p  = silu(u_p W1) W2                the pixel's output values  [C]

The field sees the pixel's own noisy value, so at low noise it can sharpen what the input
already shows (a per-pixel nonlinearity the token steers) and at high noise draw from the
token's state alone. `B` starts at zero: the head's output starts at zero, as the linear
layer's does. Cost per token: 2 * D * ((E + C_in) * F + F * C) + 2 * pixels * ((E + C_in)
* F + F * C) FLOPs.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.layers import dense
from sora_jax.parallel import axes

# DCT frequencies per axis (t, h, w) at most: 2 x 4 x 4 = 32 basis values for 2x8x8
# patches, 4 x 4 x 4 = 64 for 8x8x8.
MAX_FREQUENCIES = (4, 4, 4)


def dct_encoding(patch: Sequence[int],
                 max_frequencies: Sequence[int] = MAX_FREQUENCIES) -> np.ndarray:
  """`[pt*ph*pw, E]` DCT-II basis values of each pixel of a patch `(pt, ph, pw)`, pixels in
  `embeddings.patchify`'s (pt, ph, pw) order; E = prod(min(n, max_k)) over the three axes,
  the products of one cosine per axis, `cos(pi * k * (2 i + 1) / (2 n))` for k < min(n, max_k)
  (k = 0: the constant 1)."""
  per_axis = []
  for n, max_k in zip(patch, max_frequencies):
    pixel, frequency = np.arange(n)[:, None], np.arange(min(n, max_k))[None, :]
    per_axis.append(np.cos(np.pi * frequency * (2 * pixel + 1) / (2 * n)))   # [n, K]
  basis = np.einsum("ta,hb,wc->thwabc", *per_axis)
  pixels = int(np.prod(patch))
  return basis.reshape(pixels, -1).astype(np.float32)


def field_inputs(patch: Sequence[int], in_channels: int) -> int:
  """Values a field reads per pixel: its DCT position code and its `in_channels` inputs."""
  return dct_encoding(patch).shape[1] + in_channels


def field_weights(patch: Sequence[int], in_channels: int, out_channels: int,
                  hidden: int) -> int:
  """Weights of one token's field (first layer, then second), what its state is mapped to."""
  return field_inputs(patch, in_channels) * hidden + hidden * out_channels


class NeuralFieldHead(nnx.Module):
  """Token states and their patches' input values -> output values per patch (module
  docstring)."""

  def __init__(self, width: int, patch: Sequence[int], in_channels: int, out_channels: int,
               hidden: int, *, rngs: nnx.Rngs, eps: float = 1e-6):
    self.patch = tuple(patch)
    self.in_channels, self.out_channels, self.hidden, self.eps = (
        in_channels, out_channels, hidden, eps)
    self.inputs = field_inputs(self.patch, in_channels)
    self.first = dense(width, self.inputs * hidden, (axes.EMBED, axes.PATCH), rngs=rngs)
    self.second = dense(width, hidden * out_channels, (axes.EMBED, axes.PATCH),
                        zero_init=True, rngs=rngs)

  def __call__(self, h: jax.Array, values: jax.Array) -> jax.Array:
    """Args: h `[B, N, D]` the tokens' final states; values `[B, N, pixels * in_channels]`
    their patches' input values (`embeddings.patchify` of the noisy video and conditioning).
    Returns `[B, N, pixels * out_channels]` in h's dtype."""
    b, n, _ = h.shape
    encoding = jnp.asarray(dct_encoding(self.patch), h.dtype)               # [pixels, E]
    pixels = encoding.shape[0]
    x = values.astype(h.dtype).reshape(b, n, pixels, self.in_channels)
    u = jnp.concatenate([jnp.broadcast_to(encoding, (b, n) + encoding.shape), x], axis=-1)
    w1 = self.first(h).reshape(b, n, self.inputs, self.hidden).astype(jnp.float32)
    w1 = w1 * jax.lax.rsqrt(jnp.sum(jnp.square(w1), axis=2, keepdims=True) + self.eps)
    hidden = jax.nn.silu(jnp.einsum("bnpi,bnif->bnpf", u, w1.astype(h.dtype)))
    w2 = self.second(h).reshape(b, n, self.hidden, self.out_channels)
    out = jnp.einsum("bnpf,bnfc->bnpc", hidden, w2)                        # [B, N, pixels, C]
    return out.reshape(b, n, pixels * self.out_channels)
