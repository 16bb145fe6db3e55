"""Moving parameters between sora_jax and checkpoints of other frameworks.

A *mapping* is a list of `Tensor`s, one per parameter of a sora_jax module: its path
in the module's pure-dict parameters (`nnx.to_pure_dict`), its name in the other
checkpoint (PyTorch `state_dict` names, as diffusers and transformers save them) and a
`Layout` that converts one array layout into the other. Given a mapping, this module

  - checks a checkpoint against a module before reading any tensor: missing tensors,
    unexpected ones and wrong shapes are reported by name (`CheckpointMismatch`);
  - loads tensor by tensor straight into the shardings of a mesh: each device's shard
    is read from the memory-mapped safetensors file (`jax.make_array_from_callback`),
    so no full host copy of a large model is ever made;
  - exports parameters back to the other layout and writes (sharded) safetensors with
    the index file diffusers and transformers read.

Shape letters in layouts: O/I output/input features, K kernel positions.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from safetensors import safe_open

Path = tuple[Any, ...]
Index = tuple[slice, ...]


class CheckpointMismatch(ValueError):
  """A checkpoint does not fit the module it is loaded into (names the tensors)."""


# Layouts ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
  """How one parameter's array layout differs between the two frameworks.

  to_ours / to_theirs: convert a whole array. their_index: for layouts where a block of
  ours is a block of theirs (identity, transpose), maps an index of ours to theirs'
  index and a function applied to that block; None means the whole tensor is read.
  """
  name: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_theirs: Callable[[np.ndarray], np.ndarray]
  their_index: Callable[[Index], tuple[Index, Callable[[np.ndarray], np.ndarray]]] | None = None

  def ours_shape(self, their_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(jax.eval_shape(lambda a: self.to_ours(a),
                                jax.ShapeDtypeStruct(tuple(their_shape), np.float32)).shape)


SAME = Layout("same", lambda a: a, lambda a: a, lambda idx: (idx, lambda a: a))

# torch.nn.Linear weight [O, I] <-> kernel [I, O].
LINEAR = Layout("linear", lambda a: a.T, lambda a: a.T,
                lambda idx: (tuple(reversed(idx)), lambda a: a.T))


# Theirs has a leading axis of size 1 (e.g. `[1, 6, D]` tables) that ours drops.
SQUEEZE0 = Layout("squeeze0", lambda a: a[0], lambda a: a[None],
                  lambda idx: ((slice(0, 1),) + tuple(idx), lambda a: a[0]))


def conv(spatial_dims: int) -> Layout:
  """torch ConvNd weight `[O, I, *K]` <-> flax Conv kernel `[*K, I, O]`."""
  n = spatial_dims
  to_ours = lambda a: np.transpose(a, tuple(range(2, 2 + n)) + (1, 0))
  to_theirs = lambda a: np.transpose(a, (n + 1, n) + tuple(range(n)))
  return Layout(f"conv{n}d", to_ours, to_theirs)


def conv2d_as_3d() -> Layout:
  """torch Conv2d weight `[O, I, kh, kw]` <-> a (1, kh, kw) flax Conv3d kernel `[1, kh, kw, I, O]`."""
  c = conv(2)
  return Layout("conv2d_as_3d", lambda a: c.to_ours(a)[None], lambda a: c.to_theirs(a[0]))


# torch 1x1 Conv2d weight [O, I, 1, 1] <-> a dense kernel [I, O].
CONV1X1_AS_DENSE = Layout("conv1x1_as_dense", lambda a: a[:, :, 0, 0].T,
                          lambda a: a.T[:, :, None, None])


def patch_conv(patch: Sequence[int]) -> Layout:
  """torch Conv3d patch embedding `[D, C, pt, ph, pw]` (kernel = stride = patch) <->
  a dense kernel `[pt*ph*pw*C, D]` over `embeddings.patchify`'s `(pt ph pw c)` order."""
  pt, ph, pw = patch

  def to_ours(a):
    return np.transpose(a, (2, 3, 4, 1, 0)).reshape(-1, a.shape[0])

  def to_theirs(a):
    d = a.shape[1]
    return np.transpose(a.reshape(pt, ph, pw, -1, d), (4, 3, 0, 1, 2))
  return Layout("patch_conv", to_ours, to_theirs)


def permuted(layout: Layout, axis: int, order: Sequence[int]) -> Layout:
  """`layout`, then our `axis` reordered: our index i holds their index `order[i]`."""
  order = np.asarray(order)
  inverse = np.argsort(order)
  take = lambda a, index: a[(slice(None),) * axis + (index,)]   # numpy or traced arrays
  return Layout(f"{layout.name}_permuted", lambda a: take(layout.to_ours(a), order),
                lambda a: layout.to_theirs(take(a, inverse)))


def flatten_channels() -> Layout:
  """Theirs `[C, 1, 1(, 1)]` (broadcastable per-channel gains) <-> ours `[C]`."""
  return Layout("flatten", lambda a: a.reshape(a.shape[0]), lambda a: a)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One parameter: our pure-dict `path`, their `name` (a tuple of names, one per layer,
  for parameters stacked over a leading layer axis) and the `layout` between them.

  `their_shape`, when the layout is not invertible from ours alone (e.g. `[C, 1, 1]`
  gains), is the shape to export; `aliases` are other names the tensor may have.
  """
  path: Path
  name: str | tuple[str, ...]
  layout: Layout = SAME
  their_shape: tuple[int, ...] | None = None
  aliases: tuple[str, ...] = ()

  @property
  def names(self) -> tuple[str, ...]:
    return self.name if isinstance(self.name, tuple) else (self.name,)

  @property
  def stacked(self) -> bool:
    return isinstance(self.name, tuple)


def linear(ours: Path, theirs: str) -> list[Tensor]:
  """A torch `nn.Linear` (`theirs.weight [O, I]`, `.bias`) as our `kernel [I, O]`, `bias`."""
  return [Tensor(ours + ("kernel",), f"{theirs}.weight", LINEAR),
          Tensor(ours + ("bias",), f"{theirs}.bias", SAME)]


def layer_norm(ours: Path, theirs: str) -> list[Tensor]:
  """An affine torch `nn.LayerNorm` (`theirs.weight`, `.bias`) as our `scale`, `bias`."""
  return [Tensor(ours + ("scale",), f"{theirs}.weight"), Tensor(ours + ("bias",), f"{theirs}.bias")]


def path_str(path: Path) -> str:
  return ".".join(str(p) for p in path)


def stack_layers(mapping: Sequence[Tensor], prefix: Path, depth: int) -> list[Tensor]:
  """Rewrites per-layer tensors `prefix + (i, ...)` as tensors stacked over a leading
  layer axis at `prefix + (...)` (modules built with `scan_layers`)."""
  per_layer: dict[Path, list[Tensor]] = {}
  out = []
  n = len(prefix)
  for t in mapping:
    if t.path[:n] == prefix and len(t.path) > n and isinstance(t.path[n], int):
      per_layer.setdefault(t.path[n + 1:], [None] * depth)[t.path[n]] = t
    else:
      out.append(t)
  for rest, layers in per_layer.items():
    out.append(Tensor(prefix + rest, tuple(t.name for t in layers), layers[0].layout,
                      layers[0].their_shape))
  return out


# Reading ------------------------------------------------------------------------------

class SafetensorsCheckpoint:
  """The tensors of a model directory (or one `.safetensors` file).

  A directory holds one `*.safetensors` file or several with a `*.safetensors.index.json`
  naming each tensor's file (how diffusers and transformers shard large models). Files
  are memory-mapped; `read` takes a block of a tensor without reading the rest.
  """

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise FileNotFoundError(f"no checkpoint at {path!r}.")
    if os.path.isdir(path):
      indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
      files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
      if indexes:
        with open(indexes[0], encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
      if not files:
        raise FileNotFoundError(f"{path!r} holds no .safetensors files.")
    else:
      files = [path]
    self.path = path
    # "flax" reads bfloat16 too (numpy has no bfloat16); blocks come back as host arrays.
    self._files = {f: safe_open(f, framework="flax") for f in files}
    self._where: dict[str, str] = {}
    for f, handle in self._files.items():
      for name in handle.keys():
        self._where[name] = f

  def names(self) -> set[str]:
    return set(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._files[self._where[name]].get_slice(name).get_shape())

  def read(self, name: str, index: Index | None = None) -> np.ndarray:
    """Tensor `name` (or its block `index`) as a host array."""
    block = self._files[self._where[name]].get_slice(name)
    array = block[index] if index is not None else block[:]
    return np.asarray(jax.device_get(array))


def _resolve(t: Tensor, available: set[str]) -> tuple[str, ...] | None:
  """Their names for `t` that exist in the checkpoint (aliases tried), or None."""
  if t.stacked:
    return t.names if all(n in available for n in t.names) else None
  for n in (t.name,) + t.aliases:
    if n in available:
      return (n,)
  return None


def path_leaves(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(path_leaves(v, prefix + (k,)))
    return out
  return {prefix: tree}


def set_path(tree: dict, path: Path, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def check(checkpoint: SafetensorsCheckpoint, mapping: Sequence[Tensor], abstract: Any, *,
          what: str, ignore: Iterable[str] = ()) -> dict[Path, tuple[str, ...]]:
  """Checks that `checkpoint` holds exactly the tensors of `mapping` with the shapes of
  `abstract` (a pure dict of arrays or ShapeDtypeStructs); raises `CheckpointMismatch`
  naming every missing, unexpected and misshapen tensor. Returns each path's names.

  `ignore`: their tensors allowed to be present and unused (e.g. tied duplicates).
  """
  leaves = path_leaves(abstract)
  by_path = {t.path: t for t in mapping}
  unmapped = sorted(path_str(p) for p in leaves if p not in by_path)
  if unmapped:   # the mapping and the module disagree: a bug in the mapping, not the file
    raise CheckpointMismatch(f"{what}: no checkpoint tensor is mapped to parameters "
                             f"{unmapped[:8]} of the module.")
  available = checkpoint.names()
  resolved, missing, wrong = {}, [], []
  for t in mapping:
    names = _resolve(t, available)
    if names is None:
      missing.extend(n for n in t.names if n not in available)
      continue
    resolved[t.path] = names
    want = tuple(leaves[t.path].shape)
    got = t.layout.ours_shape(checkpoint.shape(names[0]))
    if t.stacked:
      got = (len(names),) + got
    if got != want:
      wrong.append(f"{names[0]}: {checkpoint.shape(names[0])} in the checkpoint, the model "
                   f"needs {want} for {path_str(t.path)} ({t.layout.name} layout)")
  used = {n for names in resolved.values() for n in names}
  unexpected = sorted(available - used - set(ignore))
  problems = []
  if missing:
    problems.append(f"missing tensors {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
  if unexpected:
    problems.append(f"unexpected tensors {unexpected[:10]}"
                    + (" ..." if len(unexpected) > 10 else ""))
  problems.extend(f"wrong shape: {w}" for w in wrong[:10])
  if problems:
    raise CheckpointMismatch(f"{what} at {checkpoint.path!r} does not fit the config: "
                             + "; ".join(problems))
  return resolved


def load(checkpoint: SafetensorsCheckpoint, mapping: Sequence[Tensor], abstract: Any,
         shardings: Any | None = None, *, what: str, ignore: Iterable[str] = ()) -> Any:
  """Loads `mapping`'s tensors as a pure dict of arrays shaped and typed like `abstract`.

  With `shardings` (a pure dict of `NamedSharding`s mirroring `abstract`), every device
  receives only its block, read straight from the file; without, arrays land on the
  default device. Checks everything first (`check`).
  """
  resolved = check(checkpoint, mapping, abstract, what=what, ignore=ignore)
  leaves = path_leaves(abstract)
  shard_leaves = path_leaves(shardings) if shardings is not None else {}
  out: dict = {}
  for t in mapping:
    names, spec = resolved[t.path], leaves[t.path]
    dtype = spec.dtype

    def block(index: Index, names=names, t=t, dtype=dtype) -> np.ndarray:
      if t.stacked:
        layers = range(len(names))[index[0]]
        return np.stack([block_of(names[i], index[1:], t) for i in layers]).astype(dtype)
      return block_of(names[0], index, t).astype(dtype)

    def block_of(name: str, index: Index, t: Tensor) -> np.ndarray:
      if t.layout.their_index is not None:
        their, fix = t.layout.their_index(tuple(index))
        return fix(checkpoint.read(name, their))
      return t.layout.to_ours(checkpoint.read(name))[tuple(index)]

    sharding = shard_leaves.get(t.path)
    if sharding is None:
      # (device_put, not jnp.asarray: the latter compiles a copy program per shape.)
      value = jax.device_put(block(tuple(slice(None) for _ in spec.shape)))
    else:
      value = jax.make_array_from_callback(tuple(spec.shape), sharding, block)
    set_path(out, t.path, value)
  return out


def _dotted(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat_params(params: Any) -> dict[str, np.ndarray]:
  """`{dotted.path: host array}` of a pure-dict parameter tree."""
  flat = {}
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    flat[_dotted(path)] = np.asarray(jax.device_get(value))
  return flat


def dotted_names(tree: Any) -> list[str]:
  """The dotted path of every leaf of `tree`, in `jax.tree.leaves` order."""
  return [_dotted(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


# Writing ------------------------------------------------------------------------------

def to_their_tensors(params: Any, mapping: Sequence[Tensor], *,
                     dtype: np.dtype | None = None) -> dict[str, np.ndarray]:
  """Their-named host arrays of `params` (a pure dict; stacked parameters are split per
  layer). Each array is fetched from its devices on its own."""
  leaves = path_leaves(params)
  out = {}
  for t in mapping:
    value = np.asarray(jax.device_get(leaves[t.path]))
    if dtype is not None:
      value = value.astype(dtype)
    values = list(value) if t.stacked else [value]
    for name, v in zip(t.names, values):
      v = t.layout.to_theirs(v)
      if t.their_shape is not None:
        v = v.reshape(t.their_shape)
      out[name] = np.ascontiguousarray(v)
  return out


def save_safetensors(tensors: dict[str, np.ndarray], directory: str, prefix: str, *,
                     max_shard_bytes: int = 5 * 2 ** 30, metadata: dict[str, str] | None = None
                     ) -> list[str]:
  """Writes `tensors` as `<prefix>.safetensors`, or as numbered shards of at most
  `max_shard_bytes` with `<prefix>.safetensors.index.json` (the diffusers/transformers
  convention). Returns the files written."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  metadata = {"format": "pt", **(metadata or {})}
  if len(shards) == 1:
    path = os.path.join(directory, f"{prefix}.safetensors")
    save_file(shards[0], path, metadata=metadata)
    return [path]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    name = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, name), metadata=metadata)
    files.append(os.path.join(directory, name))
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
           "weight_map": weight_map}
  with open(os.path.join(directory, f"{prefix}.safetensors.index.json"), "w",
            encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  return files
