"""Modules run inside `lax` loops and branches.

NNX records the JAX trace a module's variables were made at, and its own transforms (the
transformer's scan over layers, `nnx.remat`) refuse a module made at another: a model
merged at a jitted step's level and then called inside a `lax.fori_loop` body or a
`lax.cond` branch (a solver's steps, a distillation's teacher rollouts, the first pass of
self-conditioning) fails there once its layers are scanned or rematerialised. Such calls
take the module from `rebuilt_per_call`, which makes it again at the caller's level.

  teacher_here = rebuilt_per_call(teacher)          # where `teacher` was merged
  def body(i, x):
    return x - dt * teacher_here()(x, ...)          # inside the loop: made at its level
"""

from __future__ import annotations

from typing import Callable, TypeVar

from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def rebuilt_per_call(module: M) -> Callable[[], M]:
  """A function giving `module` made again at the trace level it is called at: its graph
  and state split here, merged with the variables copied at each call. The arrays are
  the same (tracers of an outer level may be closed over); only the NNX objects are new."""
  graphdef, state = nnx.split(module)
  return lambda: nnx.merge(graphdef, state, copy=True)
