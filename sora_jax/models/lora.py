"""Low-rank adapters (LoRA, Hu et al. 2021) on chosen linear layers of a model.

`add_adapters` replaces each `nnx.Linear` whose dotted path matches one of the target
patterns with a `LoRALinear`: the same kernel and bias (same paths, so a base model's
parameters still load) plus `lora_a [in, r]` and `lora_b [r, out]` (`nnx.LoRAParam`),
computing `y = x W + b + (alpha / r) * (drop(x) A) B`. A is drawn as PEFT draws it
(uniform within +-1/sqrt(in)); B starts at zero, so the adapted model equals the base at
step 0.

Dropout on the adapters' input (the LoRA paper's, PEFT's `lora_dropout`) is active only
inside `dropout_randomness(key)` (the train step); elsewhere (sampling, export) the
adapters are deterministic. Each adapted layer draws its own mask from the key, its
site (its path without layer indices) and the index of the layer of a stack it is in
(`stack_layer`, set by the transformer's loop or scan over blocks), so a scanned
model drops what the same model as a loop drops.
Layers stacked by `scan_layers` (a leading `[L]` axis on the kernel) get adapters stacked
the same way. The adapters carry logical axis names: A's input axis is the kernel's, B's
output axis is the kernel's (the rank axis is never sharded).

Parameter trees: `split_adapters` separates the adapters (leaves named `lora_a` /
`lora_b`) from the rest; `merge_trees` joins two partial trees; and
`merged_weights` folds adapters into their kernels (`W + scale * A B`), leaving the
parameters of the plain model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import zlib
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ADAPTER_NAMES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class _Dropout:
  key: jax.Array
  layer: Any = 0
  chunk: int = 0


_ACTIVE_DROPOUT: contextvars.ContextVar[_Dropout | None] = contextvars.ContextVar(
    "lora_dropout", default=None)


@contextlib.contextmanager
def _active(dropout: _Dropout | None) -> Iterator[None]:
  token = _ACTIVE_DROPOUT.set(dropout)
  try:
    yield
  finally:
    _ACTIVE_DROPOUT.reset(token)


def dropout_randomness(key: jax.Array | None) -> contextlib.AbstractContextManager:
  """Within it (while a model is traced or run), adapters with dropout drop their inputs
  with masks drawn from `key`; None (or outside it): no dropout."""
  return _active(None if key is None else _Dropout(key))


def stack_layer(index: Any) -> contextlib.AbstractContextManager:
  """Marks layer `index` (an int, or a scan's traced iteration index) of a stack of blocks:
  adapters inside draw dropout masks of their own."""
  active = _ACTIVE_DROPOUT.get()
  return _active(None if active is None else dataclasses.replace(active, layer=index))


def token_chunk(index: int) -> contextlib.AbstractContextManager:
  """Marks chunk `index` of a layer's tokens (`layers.in_token_chunks`): adapters inside
  draw masks of their own, not the first chunk's again."""
  active = _ACTIVE_DROPOUT.get()
  return _active(None if active is None else dataclasses.replace(active, chunk=index))


def _site(path: Sequence[Any]) -> int:
  """A layer's dropout stream: its dotted path without list indices (layer numbers)."""
  name = ".".join(str(p) for p in path if not isinstance(p, int))
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


class LoRALinear(nnx.Module):
  """`nnx.Linear`'s kernel and bias (`[..., in, out]`, `[..., out]`) plus a low-rank update.

  `__call__(x [..., in]) -> [..., out]`: `x W + b + scale * (drop(x) A) B`, with the dtype
  policy of the layer it replaced (its `dtype` and `promote_dtype`); `drop` is inverted
  dropout at rate `dropout` inside `dropout_randomness`, the identity elsewhere. `site`:
  the layer's dropout stream (`_site` of its path)."""

  def __init__(self, linear: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs,
               dropout: float = 0.0, site: int = 0):
    kernel = linear.kernel
    lead, (fan_in, fan_out) = kernel.shape[:-2], kernel.shape[-2:]
    names = kernel.get_metadata().get("out_sharding")
    self.kernel, self.bias = kernel, linear.bias
    self.dtype, self.precision = linear.dtype, linear.precision
    self.promote_dtype = linear.promote_dtype
    self.rank, self.scale = rank, float(alpha) / rank
    self.dropout, self.site = float(dropout), int(site)
    bound = fan_in ** -0.5
    # The kernel's logical axis names on the adapters' outer axes (none if it has none).
    a_names = {} if names is None else {"out_sharding": tuple(names[:-1]) + (None,)}
    b_names = {} if names is None else {"out_sharding": tuple(names[:-2]) + (None, names[-1])}
    self.lora_a = nnx.LoRAParam(
        jax.random.uniform(rngs.params(), lead + (fan_in, rank), kernel.dtype, -bound, bound),
        **a_names)
    self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank, fan_out), kernel.dtype), **b_names)

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = None if self.bias is None else self.bias[...]
    x, kernel, bias, a, b = self.promote_dtype(
        (x, self.kernel[...], bias, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    y = jnp.dot(x, kernel, precision=self.precision)
    if bias is not None:
      y = y + bias
    low = jnp.dot(self._dropped(x), a, precision=self.precision)            # [..., r]
    if low.ndim > 1:
      # The up-projection as a matmul batched over the leading axis (B broadcast to it,
      # `[B0, r, out]`, small): `model.remat="dots"` keeps only unbatched matmul outputs,
      # so this `[..., out]` output is recomputed in the backward pass instead of being
      # kept beside the base layer's own (which would double the layer's saved bytes).
      b = jnp.broadcast_to(b, low.shape[:1] + b.shape)
      up = jnp.einsum("b...r,bro->b...o", low, b, precision=self.precision)
    else:
      up = jnp.dot(low, b, precision=self.precision)
    return y + (self.scale * up).astype(y.dtype)


  def _dropped(self, x: jax.Array) -> jax.Array:
    active = _ACTIVE_DROPOUT.get()
    if not self.dropout or active is None:
      return x
    key = jax.random.fold_in(jax.random.fold_in(active.key, self.site), active.layer)
    if active.chunk:
      key = jax.random.fold_in(key, active.chunk)
    keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)


def dotted(path: Sequence[Any]) -> str:
  return ".".join(str(p) for p in path)


def target_linears(model: nnx.Module, targets: Sequence[str]) -> list[tuple[Any, ...]]:
  """Paths of the `nnx.Linear` layers of `model` whose dotted path (list indices
  included, e.g. `dit.blocks.3.self_attn.q`) matches one of the `fnmatch` patterns."""
  return [path for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Linear) and not isinstance(node, LoRALinear)
          and any(fnmatch.fnmatchcase(dotted(path), p) for p in targets)]


def add_adapters(model: nnx.Module, targets: Sequence[str], rank: int, alpha: float, *,
                 rngs: nnx.Rngs, dropout: float = 0.0) -> list[str]:
  """Replaces the targeted linear layers of `model` in place with `LoRALinear`s (dropout
  rate `dropout` on their inputs in training); returns their dotted paths. Raises
  ValueError when no layer matches (a typo in a pattern)."""
  if rank < 1:
    raise ValueError(f"lora.rank={rank}: adapters need a rank of at least 1.")
  paths = target_linears(model, targets)
  if not paths:
    linears = sorted(dotted(p) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear))
    raise ValueError(f"lora.targets={tuple(targets)} match no linear layer of the model "
                     f"(its linear layers include {linears[:6]}).")
  for path in paths:
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    linear = parent[path[-1]] if isinstance(path[-1], int) else getattr(parent, path[-1])
    adapted = LoRALinear(linear, rank, alpha, rngs=rngs, dropout=dropout, site=_site(path))
    if isinstance(path[-1], int):
      parent[path[-1]] = adapted
    else:
      setattr(parent, path[-1], adapted)
  return [dotted(p) for p in paths]


def is_adapter(path: Sequence[Any]) -> bool:
  return bool(path) and path[-1] in ADAPTER_NAMES


def _partition(tree: Any, keep, prefix: tuple = ()) -> Any:
  if not isinstance(tree, dict):
    return tree if keep(prefix) else None
  out = {}
  for k, v in tree.items():
    part = _partition(v, keep, prefix + (k,))
    if part is not None and not (isinstance(part, dict) and not part):
      out[k] = part
  return out


def split_adapters(params: dict, whole: Sequence[str] = ()) -> tuple[dict, dict]:
  """`(adapters, rest)` of a pure-dict parameter tree: its `lora_a`/`lora_b` leaves (with
  the dicts above them), and the modules named in `whole` (trained whole beside the
  adapters, PEFT's `modules_to_save`: e.g. a new input the base lacks), then everything
  else."""
  def trained(path):
    return is_adapter(path) or any(name in path for name in whole)
  return (_partition(params, trained), _partition(params, lambda path: not trained(path)))


def merge_trees(base: dict, extra: dict) -> dict:
  """`base` with `extra`'s leaves added (or replacing base's at the same path)."""
  out = dict(base)
  for k, v in extra.items():
    out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def merged_weights(params: dict, scale: float) -> dict:
  """Parameters with every adapter folded into its kernel, `W + scale * A B` (float32,
  then the kernel's dtype), and the adapters removed: the plain model's parameters."""
  if not isinstance(params, dict):
    return params
  if "lora_a" in params and "lora_b" in params:
    kernel, a, b = params["kernel"], params["lora_a"], params["lora_b"]
    update = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    out = {k: v for k, v in params.items() if k not in ADAPTER_NAMES}
    out["kernel"] = (kernel.astype(jnp.float32) + scale * update).astype(kernel.dtype)
    return out
  return {k: merged_weights(v, scale) for k, v in params.items()}
