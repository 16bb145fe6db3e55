"""Abstract modules: a module's graph and the shapes of its variables, without allocating
it, traced once per architecture in a process.

  graphdef, params = abstract_module(("dit", cfg), lambda: DiffusionTransformer(cfg, rngs=...),
                                     nnx.Param)
  module = nnx.merge(graphdef, params)      # variables hold `jax.ShapeDtypeStruct`s

A run asks for the same abstract model several times (the train state's shapes and
shardings, restoring, exporting, sampling), and tracing a model's initialisation costs
about as much as a small compile; keyed by everything the builder depends on, the trace
is done once.
"""

from __future__ import annotations

import collections
import copy
from typing import Any, Callable, Hashable

from flax import nnx

_MAX_ENTRIES = 32
_CACHE: collections.OrderedDict[Hashable, tuple[Any, ...]] = collections.OrderedDict()


def abstract_module(key: Hashable | None, build: Callable[[], nnx.Module],
                    *filters: Any) -> tuple[Any, ...]:
  """`nnx.split(nnx.eval_shape(build), *filters)`, built with eager sharding off.

  `key`: a hashable naming everything `build`'s module depends on (e.g. a frozen config
  dataclass), under which the split by `filters` is kept for the process (the 32 newest); None
  traces every time. Returns `(graphdef, *states)`; the states are the caller's own
  copies (filling them, e.g. with `nnx.replace_by_pure_dict`, leaves the kept ones
  abstract).
  """
  key = None if key is None else (key, filters)
  entry = None if key is None else _CACHE.get(key)
  if entry is None:
    with nnx.use_eager_sharding(False):
      entry = tuple(nnx.split(nnx.eval_shape(build), *filters))
    if key is not None:
      _CACHE[key] = entry
      while len(_CACHE) > _MAX_ENTRIES:
        _CACHE.popitem(last=False)
  else:
    _CACHE.move_to_end(key)
  graphdef, *states = entry
  return (graphdef, *copy.deepcopy(states))
