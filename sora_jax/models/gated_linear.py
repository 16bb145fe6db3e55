"""A linear layer whose output is scaled by a per-example gate, with the backward written
out so that the layer's output is never kept for it.

adaLN-Zero blocks add `gate * (a @ W + b)` to the residual stream. Differentiated by JAX,
the gate's gradient `sum_n g[n] * (a @ W + b)[n]` reads the layer's output, so a
rematerialisation policy that keeps matmul outputs (`dots`) keeps it: one `[B, N, D]`
activation per gated layer per block. With one gate per example (`[B, 1, D]`, the same
for all its tokens), the gate's gradient also follows from `M_b = a_b^T g_b` (`[K, D]`
per example), the product the weight's gradient is made of anyway:

  dW = sum_b gate_b * M_b,   dgate_b = sum_k W[k] * M_b[k] + b * sum_n g_b[n],

so `gated_linear` computes `M` instead of `a^T (g * gate)` and keeps only its inputs
(`a` and the weights, which the backward reads anyway). Same FLOPs. The output stays
unkept only where nothing after it needs it: in a DiT block the MLP's (the block's last),
not the self-attention's, from which the residual stream is rebuilt for the norms that
follow. On Wan 1.3B's train step at 32,760 tokens a chip (v5p-8, remat `dots`) that is one
`[30, 32760, 1536]` bfloat16 stack, 2.8 GiB, and the step needs 0.94x MaxDiffusion's HBM
(docs/results/tpu-plans.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gated_linear(a: jax.Array, kernel: jax.Array, bias: jax.Array | None, gate: jax.Array,
                 dtype: jnp.dtype) -> jax.Array:
  """`((a @ kernel + bias) * gate)` cast to `dtype`.

  Args:
    a: inputs `[B, N, K]`.
    kernel: `[K, D]`, in a's dtype (the matmul runs in it).
    bias: `[D]` or None.
    gate: `[B, 1, D]` or `[1, 1, D]`, one gate per example for all its tokens.
    dtype: the output's dtype.

  Returns:
    `[B, N, D]`; the linear's output `a @ kernel + bias` is computed in a's dtype (as
    `nnx.Linear` does), the product with the gate in the gate's and a's promoted dtype.
  """
  return _forward(a, kernel, bias, gate, dtype)[0]


def _linear(a, kernel, bias):
  y = jax.lax.dot_general(a, kernel, (((a.ndim - 1,), (0,)), ((), ())))
  return y if bias is None else y + bias.astype(y.dtype)


def _forward(a, kernel, bias, gate, dtype):
  if a.ndim != 3 or gate.ndim != 3 or gate.shape[1] != 1:
    raise ValueError(f"gated_linear: inputs [B, N, K] and a gate [B, 1, D]; got "
                     f"{a.shape} and {gate.shape}.")
  return (_linear(a, kernel, bias) * gate).astype(dtype), (a, kernel, bias, gate)


def _backward(dtype, residuals, grad):
  """`grad` `[B, N, D]` -> gradients of a, kernel, bias and gate (module docstring)."""
  del dtype
  a, kernel, bias, gate = residuals
  per_example = gate.shape[0] != 1
  g = grad.astype(jnp.float32)
  gate_f = gate.astype(jnp.float32)
  d_linear = (g * gate_f).astype(a.dtype)                                 # [B, N, D]
  d_a = jax.lax.dot_general(d_linear, kernel, (((2,), (1,)), ((), ())))   # a's dtype
  # M: a^T g per example [B, K, D] (summed over examples when they share one gate).
  m = jnp.einsum("bnk,bnd->bkd" if per_example else "bnk,bnd->kd", a, grad.astype(a.dtype),
                 preferred_element_type=jnp.float32)
  if not per_example:
    m = m[None]
  # Each example's part in the kernel's dtype before the sum over examples (which spans
  # devices under data parallelism): the reduction moves what autodiff's would.
  d_kernel = (m * gate_f[:, 0, None, :]).astype(kernel.dtype).sum(0)
  d_gate = jnp.einsum("bkd,kd->bd", m, kernel.astype(jnp.float32))       # [B, D]
  d_bias = None
  if bias is not None:
    g_sum = g.sum(1) if per_example else g.sum((0, 1))[None]              # [B|1, D]
    d_gate = d_gate + g_sum * bias.astype(jnp.float32)
    d_bias = (g_sum * gate_f[:, 0]).sum(0).astype(bias.dtype)
  return d_a, d_kernel, d_bias, d_gate[:, None].astype(gate.dtype)


gated_linear.defvjp(_forward, _backward)
