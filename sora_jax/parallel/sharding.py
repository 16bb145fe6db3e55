"""Mesh construction and logical-to-mesh sharding.

`logical_to_spec` turns a tuple of logical axis names (see `axes.py`) into a
`PartitionSpec` using ordered rules `[(logical, mesh_axis | (mesh_axes...) | None)]`.
As in MaxText, a logical name may have several rules; the first whose mesh axes
are all unused in the spec so far (and of size > 1 in total) wins, so one mesh axis
never shards two dimensions of one array.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sora_jax.parallel import axes

Rules = Sequence[tuple[str, Any]]


def mesh_sizes(mesh_shape: dict[str, int], num_devices: int) -> dict[str, int]:
  """Resolves `{axis_name: size}` (one size may be -1, "the rest") for `num_devices`.

  Missing axes of `axes.MESH_AXES` get size 1.

  Raises:
    ValueError: naming `mesh.<axis>` when the sizes do not fit the device count.
  """
  unknown = set(mesh_shape) - set(axes.MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axes {sorted(unknown)}; allowed {axes.MESH_AXES}.")
  sizes = {name: int(mesh_shape.get(name, 1)) for name in axes.MESH_AXES}
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {free}.")
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{name}={size}: sizes must be positive or -1.")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
          f"mesh.{free[0]}=-1: the other axes multiply to {fixed}, which does not divide "
          f"the {num_devices} available devices.")
    sizes[free[0]] = num_devices // fixed
  total = int(np.prod(list(sizes.values())))
  if total != num_devices:
    named = [f"mesh.{n}={s}" for n, s in sizes.items() if s > 1]
    raise ValueError(
        f"mesh ({', '.join(named) or 'all 1'}) needs {total} devices but {num_devices} "
        "are available.")
  return sizes


def make_mesh(mesh_shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a `Mesh` with axes `axes.MESH_AXES` from `{axis_name: size}` (see `mesh_sizes`)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(mesh_shape, len(devices))
  device_array = np.asarray(devices).reshape([sizes[n] for n in axes.MESH_AXES])
  return Mesh(device_array, axes.MESH_AXES)


def entry_axes(entry: str | Sequence[str] | None) -> tuple[str, ...]:
  """The mesh axes of one `PartitionSpec` entry (or one rule's mesh axes): None -> (),
  "fsdp" -> ("fsdp",), ("data", "fsdp") as it is."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def entry_size(mesh: Mesh, entry: str | Sequence[str] | None) -> int:
  """How many shards one `PartitionSpec` entry splits a dimension into on `mesh`: the
  product of its axes' sizes (1 for None)."""
  return int(np.prod([mesh.shape[a] for a in entry_axes(entry)]))


def logical_to_spec(logical: Sequence[str | None] | None, rules: Rules,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical axis names to a `PartitionSpec` (see module docstring)."""
  if logical is None:
    return PartitionSpec()
  used: set[str] = set()
  spec = []
  for name in logical:
    choice = None
    for rule_name, mesh_axes in rules:
      if rule_name != name or mesh_axes is None:
        continue
      cand = entry_axes(mesh_axes)
      if mesh is not None:
        cand = tuple(a for a in cand if mesh.shape[a] > 1)
      if not cand or used & set(cand):
        continue
      choice = cand
      break
    if choice is None:
      spec.append(None)
    else:
      used.update(choice)
      spec.append(choice[0] if len(choice) == 1 else choice)
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> Any:
  """`NamedSharding` for every leaf of an (abstract) `nnx.State`, as a pure dict.

  Checks that every sharded dimension divides by its mesh axes and names the
  parameter when it does not.
  """
  def one(path, variable):
    names = variable.get_metadata().get("out_sharding")
    spec = logical_to_spec(names, rules, mesh)
    shape = variable.shape if hasattr(variable, "shape") else np.shape(variable[...])
    for dim, entry in zip(shape, spec):
      if entry is None:
        continue
      size = entry_size(mesh, entry)
      if dim % size:
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} of shape {tuple(shape)} cannot be sharded "
            f"as {spec}: dimension {dim} does not divide by mesh size {size}.")
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(
      one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


# Activation constraints ------------------------------------------------------

_CONTEXT = threading.local()
# Splash attention's default block of queries and keys (`model.splash_block`).
SPLASH_BLOCK = 512


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules, attention: str = "xla",
                        splash_block: int = SPLASH_BLOCK) -> Iterator[None]:
  """Within this context `constrain` shards activations over `mesh` by `rules`, and
  attention uses `attention` (see `models.attention.BACKENDS`; "auto" resolves by
  platform), splash attention in blocks of `splash_block` queries and keys."""
  previous = getattr(_CONTEXT, "value", None)
  _CONTEXT.value = (mesh, tuple(rules), resolve_backend(attention, mesh_platform(mesh)),
                    int(splash_block))
  try:
    yield
  finally:
    _CONTEXT.value = previous


ATTENTION_BACKENDS = ("xla", "dot_product", "splash", "ring", "ulysses", "auto")
# The backends that split self-attention's tokens over the `sequence` mesh axis.
SEQUENCE_BACKENDS = ("ring", "ulysses")


def mesh_platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices ("tpu", "gpu", "cpu"): what its programs compile
  for, which differs from the host's when compiling ahead of time for a TPU topology."""
  return mesh.devices.flat[0].platform


def compile_platform() -> str:
  """The platform the program being traced compiles for: the `activation_sharding`
  context's mesh's, else the host's default backend."""
  context = getattr(_CONTEXT, "value", None)
  return jax.default_backend() if context is None else mesh_platform(context[0])


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """`auto` -> splash on TPU, dot_product (cuDNN) on GPU, xla elsewhere (`platform`
  defaults to the host's; `activation_sharding` passes the mesh's)."""
  if backend != "auto":
    return backend
  platform = platform or jax.default_backend()
  return {"tpu": "splash", "gpu": "dot_product"}.get(platform, "xla")


def array_shapes(state: Any) -> Any:
  """`ShapeDtypeStruct`s of an (abstract) `nnx.State` or pytree of arrays, as a pure dict."""
  if isinstance(state, nnx.State):
    state = nnx.to_pure_dict(state)
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)


def attention_backend() -> str:
  """The attention backend of the current context ("xla" outside any)."""
  context = getattr(_CONTEXT, "value", None)
  return "xla" if context is None else context[2]


def splash_block() -> int:
  """Splash attention's block of queries and keys in the current context
  (`SPLASH_BLOCK` outside any)."""
  context = getattr(_CONTEXT, "value", None)
  return SPLASH_BLOCK if context is None else context[3]


def attention_layout() -> tuple[Mesh, PartitionSpec, PartitionSpec] | None:
  """`(mesh, qkv_spec, segment_spec)` for a kernel that must run per device under
  `shard_map` (Pallas kernels cannot be partitioned by the compiler): `[B, N, H, D]`
  queries/keys/values sharded over batch and heads by the context's rules (tokens whole
  on each device), `[B, N]` segment ids alike. None outside `activation_sharding`."""
  context = getattr(_CONTEXT, "value", None)
  if context is None:
    return None
  mesh, rules = context[:2]
  qkv = logical_to_spec((axes.BATCH, None, axes.ACT_HEADS, None), rules, mesh)
  return mesh, qkv, PartitionSpec(qkv[0], None)


def sequence_mesh() -> Mesh | None:
  """The mesh whose `sequence` axis splits self-attention's tokens, if the context asks
  for ring or Ulysses attention and that axis is split; None otherwise."""
  context = getattr(_CONTEXT, "value", None)
  if (context is None or context[2] not in SEQUENCE_BACKENDS
      or context[0].shape["sequence"] == 1):
    return None
  return context[0]


def tokens_split() -> bool:
  """Whether the current context splits activations' tokens (`[B, N, D]`'s N) over more
  than one device; False outside `activation_sharding`."""
  context = getattr(_CONTEXT, "value", None)
  if context is None:
    return False
  mesh, rules = context[:2]
  entry = logical_to_spec((axes.BATCH, axes.LENGTH, axes.ACT_EMBED), rules, mesh)[1]
  return entry_size(mesh, entry) > 1


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `activation_sharding`."""
  context = getattr(_CONTEXT, "value", None)
  if context is None:
    return x
  mesh, rules = context[:2]
  spec = logical_to_spec(logical, rules, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def gathered(x: jax.Array, logical: Sequence[str | None] | None) -> jax.Array:
  """A parameter with logical axis names `logical`, constrained to its layout for compute:
  whole over every mesh axis but `tensor` (its FSDP shards gathered), where one gather
  serves several uses (`models.layers.in_token_chunks`); a no-op outside
  `activation_sharding`. The gradient's reduce-scatter happens once, at the same point."""
  context = getattr(_CONTEXT, "value", None)
  if context is None:
    return x
  mesh, rules = context[:2]
  spec = PartitionSpec(*("tensor" if "tensor" in entry_axes(e) else None
                         for e in logical_to_spec(logical, rules, mesh)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def process_batch_rows(mesh: Mesh, rules: Rules, global_batch: int,
                       process_index: int | None = None,
                       process_of: Callable[[jax.Device], int] = lambda d: d.process_index
                       ) -> tuple[int, int]:
  """`(start, count)`: the rows of a `[global_batch, ...]` batch (`batch_sharding`) that the
  devices of process `process_index` (this one's by default) hold, which is what its input
  pipeline loads. Processes whose devices hold the same rows load the same rows: a batch
  split over fewer shards than there are processes (one sample split across hosts by the
  sequence or tensor axes) is loaded whole by each host of its group. `process_of`: a
  device's process (tests simulate hosts with it)."""
  process_index = jax.process_index() if process_index is None else process_index
  sharding = batch_sharding(mesh, rules, 1)
  spans = {index[0].indices(global_batch)[:2]
           for device, index in sharding.devices_indices_map((global_batch,)).items()
           if process_of(device) == process_index}
  if not spans:
    raise ValueError(f"process {process_index} holds no device of the mesh.")
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(f"process {process_index} holds rows {sorted(spans)} of the batch, not "
                     "one contiguous run; order the mesh's devices by process.")
  return start, stop - start


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a `[B, ...]` input array: batch by the rules, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec((axes.BATCH,) + (None,) * (ndim - 1), rules, mesh))
