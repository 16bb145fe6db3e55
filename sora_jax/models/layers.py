"""Small building blocks shared by the text encoder and the diffusion transformer.

Every parameter is created with logical axis names (`sora_jax.parallel.axes`).
Norms compute in float32 and return the input dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax import nnx

from sora_jax.models import lora
from sora_jax.models.attention import (block_causal_mask, cudnn_attention,
                                       dot_product_attention, segment_mask, splash_attention)
from sora_jax.models.embeddings import apply_rope
from sora_jax.models.gated_linear import gated_linear
from sora_jax.models.norm_rope import rms_norm, rms_norm_rope, rms_normalised
from sora_jax.parallel import axes
from sora_jax.parallel.context import (cached_attention, ring_attention, sequence_specs,
                                       ulysses_attention)
from sora_jax.parallel.sharding import (attention_backend, attention_layout, entry_size,
                                        gathered, mesh_platform, sequence_mesh, splash_block,
                                        tokens_split)


def dense(in_features: int, out_features: int, logical: Sequence[str | None], *,
          rngs: nnx.Rngs, use_bias: bool = True, zero_init: bool = False) -> nnx.Linear:
  """`nnx.Linear` whose kernel `[in, out]` and bias `[out]` carry logical axis names."""
  kernel_init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.xavier_uniform()
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias,
      kernel_init=nnx.with_partitioning(kernel_init, tuple(logical)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (logical[-1],)),
      rngs=rngs)


def gated_dense(linear: nnx.Linear, x: jax.Array, gate: jax.Array | None) -> jax.Array:
  """`(linear(x) * gate)` in x's dtype (`linear(x)` when `gate` is None): x `[B, N, K]`,
  gate broadcastable to `[B, N, D]`. A gate per example (`[B|1, 1, D]`) on a plain
  `nnx.Linear` goes through `gated_linear`, whose backward does not keep the linear's
  output; LoRA-adapted layers, per-token gates and tokens split over devices
  (`mesh.sequence`, where each example's `a^T g` would be summed across them) take the
  plain product."""
  if gate is None:
    return linear(x)
  plain = (type(linear) is nnx.Linear and linear.dot_general is jax.lax.dot_general
           and linear.precision is None
           and getattr(linear, "preferred_element_type", None) is None)
  if plain and x.ndim == 3 and gate.ndim == 3 and gate.shape[1] == 1 and not tokens_split():
    bias = linear.bias[...] if linear.bias is not None else None
    # The kernel gathered once for its three uses (forward, input and gate gradients).
    a, kernel, bias = linear.promote_dtype((x, _gathered_value(linear.kernel), bias),
                                           dtype=linear.dtype)
    return gated_linear(a, kernel, bias, gate, x.dtype)
  return (linear(x) * gate).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis in float32, optionally without scale and bias."""

  def __init__(self, dim: int, *, affine: bool, eps: float = 1e-6):
    self.eps = eps
    if affine:
      self.scale = nnx.Param(jnp.ones((dim,)), out_sharding=(axes.NORM,))
      self.bias = nnx.Param(jnp.zeros((dim,)), out_sharding=(axes.NORM,))
    else:
      self.scale = self.bias = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x.astype(jnp.float32)
    mean = y.mean(-1, keepdims=True)
    y = (y - mean) * jax.lax.rsqrt(jnp.square(y - mean).mean(-1, keepdims=True) + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis in float32 with a learned scale.

  `l2=True` normalises as `x / max(|x|, eps) * sqrt(dim)` instead (the same up to where
  eps enters; `F.normalize`-based norms, e.g. Wan's VAE).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, l2: bool = False):
    self.eps, self.l2 = eps, l2
    self.scale = nnx.Param(jnp.ones((dim,)), out_sharding=(axes.NORM,))

  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.l2:
      return rms_norm(x, self.scale[...], self.eps)
    y = x.astype(jnp.float32)
    squares = jnp.square(y).sum(-1, keepdims=True)
    y = y * jax.lax.rsqrt(jnp.maximum(squares, self.eps ** 2)) * y.shape[-1] ** 0.5
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


ACTIVATIONS = {"gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False), "silu": jax.nn.silu,
               "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}   # OpenAI's CLIP


def in_token_chunks(fn: Callable[..., Any], chunks: int, *tokens: jax.Array | None,
                    weights: Sequence[nnx.Module] = ()) -> Any:
  """`fn(*tokens)` for a per-token `fn` of arrays `[B, N, ...]` (None passes through) to
  an array or a tuple of arrays `[B, N, ...]`, run on `chunks` pieces of the N tokens and
  concatenated: the same values, with the intermediate activations and their gradients
  in `[B, N/chunks, ...]` pieces, which XLA packs into less memory than whole ones
  (`model.token_chunks`; the Wan 1.3B train step on v5p-8: docs/results/tpu-plans.md).
  Whole where the sharding context splits the tokens over devices (`mesh.sequence`): a
  piece of a split axis would move data between them.

  `weights`: the modules `fn` uses, whose parameters are gathered once for all pieces
  (`parallel.sharding.gathered`) rather than by each piece's matmuls (under FSDP the
  compiler gathers per use: eight pieces, eight gathers of every weight)."""
  if chunks <= 1 or tokens_split():
    return fn(*tokens)
  pieces = [[None] * chunks if t is None else jnp.array_split(t, chunks, axis=1)
            for t in tokens]
  outs = []
  with _gathered(weights):
    for index, piece in enumerate(zip(*pieces)):
      with lora.token_chunk(index):       # LoRA dropout: a mask per chunk, not one repeated
        outs.append(fn(*piece))
  return jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=1), *outs)


def _gathered_value(param: nnx.Param) -> jax.Array:
  """A parameter's value in its layout for compute (`parallel.sharding.gathered`)."""
  value = param.get_value()
  names = param.get_metadata().get("out_sharding")
  if names is not None and len(names) > value.ndim:   # one layer of stacked blocks
    names = tuple(n for n in names if n != axes.LAYERS)
  return gathered(value, names)


@contextlib.contextmanager
def _gathered(modules: Sequence[nnx.Module]) -> Iterator[None]:
  """Within: the parameters of `modules` hold their gathered values
  (`parallel.sharding.gathered`), the originals put back after."""
  params = [v for m in modules if m is not None for _, v in nnx.iter_graph(m)
            if isinstance(v, nnx.Param)]
  originals = [p.get_value() for p in params]
  for p in params:
    p.set_value(_gathered_value(p))
  try:
    yield
  finally:
    for p, value in zip(params, originals):
      p.set_value(value)


class MLP(nnx.Module):
  """Two-layer MLP `[..., dim] -> [..., out]` with an activation of `ACTIVATIONS`;
  `logical`: the axis names of (dim, hidden, out); `zero_out`: the second layer starts at
  zero (the MLP outputs zeros until trained)."""

  def __init__(self, dim: int, hidden: int, out: int, logical: Sequence[str | None], *,
               activation: str = "gelu_tanh", zero_out: bool = False, token_chunks: int = 1,
               rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r}: expected one of {sorted(ACTIVATIONS)}.")
    self.activation = activation
    self.token_chunks = token_chunks
    self.fc1 = dense(dim, hidden, (logical[0], logical[1]), rngs=rngs)
    self.fc2 = dense(hidden, out, (logical[1], logical[2]), zero_init=zero_out, rngs=rngs)

  def __call__(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
    """`[..., dim] -> [..., out]`; `[B, N, dim]` in `token_chunks` pieces of the N tokens
    (`in_token_chunks`). `gate`: the output times it, in x's dtype (`gated_dense`)."""
    if gate is not None and gate.ndim == 3 and gate.shape[1] != 1:     # a gate per token
      return (self(x) * gate).astype(x.dtype)
    return in_token_chunks(
        lambda chunk: gated_dense(self.fc2, ACTIVATIONS[self.activation](self.fc1(chunk)), gate),
        self.token_chunks, x, weights=(self.fc1, self.fc2))


@flax.struct.dataclass
class KVCache:
  """Keys and values of earlier tokens that new queries attend to (autoregressive
  sampling): `keys`, `values` `[B, L, H, D]` (RoPE already applied at their own
  positions), `valid` `[B, L]` bool (False: an empty slot, attended by nobody). Every
  valid cached token is in the queries' past, so each query attends to all of them."""
  keys: jax.Array
  values: jax.Array
  valid: jax.Array


def cache_sharding(mesh: Mesh, rows: int, tokens: int, heads: int) -> KVCache:
  """Where a cache of `rows` rows, `tokens` slots and `heads` heads lies on `mesh` (a
  `KVCache` of shardings): keys and values `[depth, B, L, H, D]` with their L slots split
  over the `sequence` axis, rows over the batch axes and heads over `tensor` (as
  `parallel.context.cached_attention` reads them: on a sequence-split mesh with ring or Ulysses
  attention no device holds or gathers the whole cache), valid `[B, L]` alike; a
  dimension those axes do not divide stays whole."""
  spec, _ = sequence_specs(mesh)
  batch, slots, split_heads = (
      entry if size % entry_size(mesh, entry) == 0 else None
      for entry, size in zip(spec[:3], (rows, tokens, heads)))
  kv = NamedSharding(mesh, P(None, batch, slots, split_heads, None))
  return KVCache(kv, kv, NamedSharding(mesh, P(batch, slots)))


@flax.struct.dataclass
class BlockCausal:
  """Block-causal self-attention: `blocks` `[B, N]` int, each token's causal block (e.g. its
  latent frame; a token attends to its own block and earlier ones); `block_tokens`: the
  static tokens per block when token n is in block n // block_tokens (rows of one video
  in raster order; splash attention needs it), else None."""
  blocks: jax.Array
  block_tokens: int | None = flax.struct.field(pytree_node=False, default=None)


class Attention(nnx.Module):
  """Multi-head attention (self or cross) with optional QK RMSNorm and RoPE.

  qk_norm: "none"; "rms" (per head, over head_dim); "rms_across_heads" (over all
  heads at once, as Wan 2.1 does).
  image_kv: a second set of keys and values, from image tokens `[B, I, dim]` (Wan 2.1
  image-to-video's decoupled cross-attention: the same queries attend to the text and,
  separately and unmasked, to the image; the two results are summed before `out`).
  token_chunks: queries and keys are projected, normalised and rotated in this many pieces
  of the tokens (`in_token_chunks`; the same values).
  """

  def __init__(self, dim: int, heads: int, *, kv_dim: int | None = None,
               qk_norm: str = "rms", use_bias: bool = True, scale: float | None = None,
               eps: float = 1e-6, image_kv: bool = False, token_chunks: int = 1,
               rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"width {dim} does not divide by heads {heads}.")
    kv_dim = dim if kv_dim is None else kv_dim
    self.heads, self.head_dim, self.scale = heads, dim // heads, scale
    self.token_chunks = token_chunks
    self.qk_norm = qk_norm
    self.q = dense(dim, dim, (axes.EMBED, axes.HEADS), use_bias=use_bias, rngs=rngs)
    self.k = dense(kv_dim, dim, (axes.EMBED, axes.HEADS), use_bias=use_bias, rngs=rngs)
    self.v = dense(kv_dim, dim, (axes.EMBED, axes.HEADS), use_bias=use_bias, rngs=rngs)
    self.out = dense(dim, dim, (axes.HEADS, axes.EMBED), use_bias=use_bias, rngs=rngs)
    if qk_norm == "rms":
      self.norm_q = RMSNorm(self.head_dim, eps=eps)
      self.norm_k = RMSNorm(self.head_dim, eps=eps)
    elif qk_norm == "rms_across_heads":
      self.norm_q, self.norm_k = RMSNorm(dim, eps=eps), RMSNorm(dim, eps=eps)
    elif qk_norm == "none":
      self.norm_q = self.norm_k = None
    else:
      raise ValueError(f"qk_norm={qk_norm!r}: expected none, rms or rms_across_heads.")
    if image_kv:
      self.image_k = dense(dim, dim, (axes.EMBED, axes.HEADS), use_bias=use_bias, rngs=rngs)
      self.image_v = dense(dim, dim, (axes.EMBED, axes.HEADS), use_bias=use_bias, rngs=rngs)
      self.norm_image_k = (None if qk_norm == "none" else
                           RMSNorm(dim if qk_norm == "rms_across_heads" else self.head_dim,
                                   eps=eps))
    else:
      self.image_k = self.image_v = self.norm_image_k = None

  def _keys(self, k: jax.Array, norm: RMSNorm | None) -> jax.Array:
    """Projected keys `[B, K, dim]` -> normalised per head `[B, K, H, D]`."""
    if norm is None:
      return self._heads(k)
    return rms_normalised(k, norm.scale[...], self.heads, self.qk_norm == "rms", norm.eps)

  def _rotated(self, k: jax.Array, norm: RMSNorm | None, rope: jax.Array | None) -> jax.Array:
    """Projected queries or keys `[B, K, dim]` -> normalised, rotated by `rope` `[B, K,
    head_dim/2]` if given, `[B, K, H, D]`."""
    if rope is not None and norm is not None:
      return rms_norm_rope(k, norm.scale[...], rope, self.heads, self.qk_norm == "rms", norm.eps)
    k = self._keys(k, norm)
    return k if rope is None else apply_rope(k, rope)

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[:-1] + (self.heads, self.head_dim))  # [B, N, H, D]

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               mask: jax.Array | None = None, bias: jax.Array | None = None,
               rope: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               image: jax.Array | None = None,
               causal: BlockCausal | None = None,
               past: KVCache | None = None,
               return_kv: bool = False,
               gate: jax.Array | None = None
               ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """x: `[B, Q, dim]`; context: `[B, K, kv_dim]` (x itself when None);
    mask: boolean broadcastable to `[B, H, Q, K]`; rope: `[B, Q, head_dim/2]` angles;
    segment_ids: `[B, Q]` self-attention stays within a segment (packed examples);
    image: `[B, I, dim]` image tokens for the `image_kv` keys and values;
    causal: block-causal self-attention (`BlockCausal`); past: keys and values of earlier
    tokens the queries also attend to (self-attention of a chunk after a `KVCache`);
    return_kv: also return this call's own keys and values `[B, Q, H, D]` (after RoPE), what
    a cache keeps.
    gate: the output projection's result times it, in x's dtype (`gated_dense`: adaLN's
    gate `[B, 1, dim]` without keeping the projection's output for the backward).

    The backend comes from the sharding context (`parallel.sharding.activation_sharding`,
    `model.attention`): self-attention with segment ids (or none), optionally
    block-causal, and no mask/bias runs as ring or Ulysses attention over the sequence axis
    or as splash attention when asked; everything else runs on the XLA reference or
    `jax.nn.dot_product_attention`.
    """
    context = x if context is None else context
    if context is x:        # self-attention: each chunk's queries and keys together
      q, k = in_token_chunks(lambda x, rope: (self._rotated(self.q(x), self.norm_q, rope),
                                              self._rotated(self.k(x), self.norm_k, rope)),
                             self.token_chunks, x, rope)
    else:
      q = in_token_chunks(lambda x, rope: self._rotated(self.q(x), self.norm_q, rope),
                          self.token_chunks, x, rope)
      k = self._rotated(self.k(context), self.norm_k, rope)
    v = self._heads(self.v(context))
    if (causal is not None or past is not None) and context is not x:
      raise ValueError("Attention: causal and past are for self-attention.")
    if past is not None:
      out = self._attend_after(q, k, v, past, causal, segment_ids)
    else:
      out = self._attend(q, k, v, context is x, mask, bias, segment_ids, causal)
    if (image is None) != (self.image_k is None):
      raise ValueError("image tokens are given exactly to attention built with image_kv.")
    if image is not None:
      k_img = self._keys(self.image_k(image), self.norm_image_k)
      v_img = self._heads(self.image_v(image))
      if attention_backend() == "splash":
        out = out + _splash_per_device(q, k_img, v_img, None, self.scale)
      else:
        out = out + _masked_attention()(q, k_img, v_img, scale=self.scale)
    out = gated_dense(self.out, out.reshape(out.shape[:2] + (-1,)), gate)
    return (out, (k, v)) if return_kv else out

  def _attend(self, q, k, v, is_self, mask, bias, segment_ids, causal):
    """`[B, Q, H, D]` attention of q to k, v on the context's backend."""
    backend = attention_backend()
    plain_self = is_self and mask is None and bias is None
    # Cross-attention whose mask only says which keys exist ([B, 1, 1, K]) runs as splash.
    key_mask = (mask.reshape(mask.shape[0], -1) if mask is not None and mask.shape[1:3] == (1, 1)
                else None)
    splash_cross = (not is_self and bias is None and segment_ids is None
                    and (mask is None or key_mask is not None))
    blocks = None if causal is None else causal.blocks
    mesh = sequence_mesh()
    if mesh is not None and plain_self and backend == "ring":
      return ring_attention(q, k, v, mesh=mesh, segment_ids=segment_ids, scale=self.scale,
                            causal_blocks=blocks)
    if mesh is not None and plain_self:
      # Splash's block-causal mask needs whole sequences of queries: plain Ulysses.
      aligned = causal is not None and mesh_platform(mesh) == "tpu"
      return ulysses_attention(q, k, v, mesh=mesh, segment_ids=segment_ids,
                               causal_blocks=blocks,
                               attend=_whole_sequence_attention(self.scale, causal, mesh),
                               degree=mesh.shape["sequence"] if aligned else None)
    if (mesh is not None and bias is None and segment_ids is None and causal is None
        and (mask is None or mask.shape[1] == 1)):
      # Queries sharded over the ring's sequence axis attend to whole keys (the text).
      return _local_queries(q, k, v, mask, self.scale)
    if backend == "splash" and plain_self:
      if causal is not None and causal.block_tokens is None:
        raise ValueError("splash attention is block-causal over a static number of tokens "
                         "per block (rows of one video); these rows give none (packed "
                         "rows?). Use model.attention=xla or dot_product.")
      return _splash_per_device(q, k, v, segment_ids, self.scale,
                                causal_block=None if causal is None else causal.block_tokens)
    if backend == "splash" and splash_cross:
      if key_mask is not None:
        key_mask = jnp.broadcast_to(key_mask, (k.shape[0], k.shape[1]))
      return _splash_per_device(q, k, v, None, self.scale, key_mask=key_mask)
    if segment_ids is not None:
      mask = segment_mask(segment_ids) if mask is None else mask & segment_mask(segment_ids)
    if blocks is not None:
      mask = (block_causal_mask(blocks) if mask is None
              else mask & block_causal_mask(blocks))
    return _masked_attention()(q, k, v, mask=mask, bias=bias, scale=self.scale)

  def _attend_after(self, q, k, v, past, causal, segment_ids):
    """`[B, Q, H, D]` attention of a chunk's queries to the cached keys (the valid ones)
    and to the chunk's own keys (block-causal within the chunk with `causal`): splash
    with a key mask when the chunk attends to itself whole, else the XLA reference or
    `jax.nn.dot_product_attention` with a mask; on a sequence-split mesh (ring or Ulysses
    backends) `context.cached_attention`, the cache's tokens split over that axis."""
    if segment_ids is not None:
      raise ValueError("Attention: a KV cache is for rows of one video (no segment_ids).")
    mesh = sequence_mesh()
    if mesh is not None:
      return cached_attention(q, k, v, past.keys, past.values, past.valid, mesh=mesh,
                              causal_blocks=None if causal is None else causal.blocks,
                              scale=self.scale)
    keys = jnp.concatenate([past.keys.astype(k.dtype), k], axis=1)        # [B, L + Q, H, D]
    values = jnp.concatenate([past.values.astype(v.dtype), v], axis=1)
    b, length = q.shape[:2]
    valid = jnp.concatenate([jnp.broadcast_to(past.valid, (b, past.valid.shape[1])),
                             jnp.ones((b, length), bool)], axis=1)        # [B, L + Q]
    if causal is None and attention_backend() == "splash":
      return _splash_per_device(q, keys, values, None, self.scale, key_mask=valid)
    mask = valid[:, None, None, :]
    if causal is not None:
      cached = jnp.ones((b, 1, length, past.valid.shape[1]), bool)
      mask = mask & jnp.concatenate([cached, block_causal_mask(causal.blocks)], axis=-1)
    return _masked_attention()(q, keys, values, mask=mask, scale=self.scale)


def _masked_attention():
  """The context's backend among those that take any mask and bias: cuDNN's path
  (`jax.nn.dot_product_attention`) for "dot_product", else the XLA reference."""
  return cudnn_attention if attention_backend() == "dot_product" else dot_product_attention


def _local_queries(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                   scale: float) -> jax.Array:
  """Attention of queries `[B, Q, H, D]` sharded over the context mesh's sequence axis
  (the ring's; batch and heads as `attention_layout` shards them) to keys and
  values `[B, K, H, D]` whole on every device (cross-attention to the text), run per device
  under `shard_map` (splash on TPU when the mask only says which keys exist): without it the compiler gathers the queries of every device to run the
  query blocks of `dot_product_attention` (and everything after them whole). `mask`:
  `[B|1, 1, Q|1, K]` (the same for every head), its query axis sharded when it has one."""
  mesh, kv_spec, _ = attention_layout()
  batch, heads = kv_spec[0], kv_spec[2]
  q_spec = P(batch, "sequence", heads, None)
  if mask is None:
    mask = jnp.ones((1, 1, 1, k.shape[1]), bool)
  mask_spec = P(batch if mask.shape[0] > 1 else None, None,
                "sequence" if mask.shape[2] > 1 else None, None)

  splash = mesh_platform(mesh) == "tpu" and mask.shape[2] == 1
  block = splash_block()

  def local(q, k, v, mask):
    if splash:     # the mask only says which keys exist: a kernel on TPU
      key_mask = jnp.broadcast_to(mask[:, 0, 0, :], (q.shape[0], k.shape[1]))
      return splash_attention(q, k, v, key_mask=key_mask, scale=scale, interpret=False,
                              block=block)
    return cudnn_attention(q, k, v, mask=mask, scale=scale)    # the reference off GPUs

  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, mask)


def _whole_sequence_attention(scale: float, causal: BlockCausal | None,
                              mesh: Mesh) -> Callable[..., jax.Array]:
  """Ulysses' per-device attention (`parallel.context.ulysses_attention`'s `attend`):
  queries `[B, Q, H, D]` to the whole sequence's keys, with (queries', keys') pairs of
  segment ids and causal blocks. Splash on TPU meshes (block-causal only over aligned
  queries and keys, `causal.block_tokens` at a time), the XLA reference with segment and
  block-causal masks elsewhere (cuDNN's kernel on GPU meshes)."""
  if mesh_platform(mesh) == "tpu":
    if causal is not None and causal.block_tokens is None:
      raise ValueError("Ulysses attention on TPU runs splash, which is block-causal over a "
                       "static number of tokens per block (rows of one video); these rows "
                       "give none (packed rows?). Use model.attention=ring.")
    causal_block = None if causal is None else causal.block_tokens
    block = splash_block()

    def attend(q, k, v, segment_ids, blocks):
      del blocks   # splash's block-causal mask is static
      return splash_attention(q, k, v, segment_ids=segment_ids, scale=scale,
                              causal_block=causal_block, interpret=False, block=block)
    return attend

  def attend(q, k, v, segment_ids, blocks):
    mask = None
    if segment_ids is not None:
      mask = (segment_ids[0][:, :, None] == segment_ids[1][:, None, :])[:, None]
    if blocks is not None:
      causal_mask = block_causal_mask(*blocks)
      mask = causal_mask if mask is None else mask & causal_mask
    return cudnn_attention(q, k, v, mask=mask, scale=scale)    # the reference off GPUs
  return attend


def _splash_per_device(q: jax.Array, k: jax.Array, v: jax.Array,
                       segment_ids: jax.Array | None, scale: float, *,
                       key_mask: jax.Array | None = None,
                       causal_block: int | None = None) -> jax.Array:
  """Splash attention `[B, Q, H, D]` (self-attention with `segment_ids [B, N]`, optionally
  block-causal over `causal_block` tokens, or cross-attention to `[B, K, H, D]` keys with
  `key_mask [B, K]`) inside `shard_map` over the context's mesh (the compiler cannot
  partition a Pallas kernel), in Pallas' interpreter unless the mesh's devices are TPUs;
  called directly outside any sharding context."""
  layout, block = attention_layout(), splash_block()
  if layout is None:
    return splash_attention(q, k, v, segment_ids=segment_ids, key_mask=key_mask, scale=scale,
                            block=block,
                            causal_block=causal_block)
  mesh, qkv_spec, seg_spec = layout
  interpret = mesh_platform(mesh) != "tpu"
  if segment_ids is not None or causal_block is not None:
    def local(q, k, v, ids):
      return splash_attention(q, k, v, segment_ids=ids, scale=scale, interpret=interpret,
                              block=block,
                              causal_block=causal_block)
    ids = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
  else:
    def local(q, k, v, ids):
      return splash_attention(q, k, v, key_mask=ids, scale=scale, interpret=interpret,
                              block=block)
    ids = jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask

  return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,),
                       out_specs=qkv_spec, check_vma=False)(q, k, v, ids)
