"""A lower bound on the train step's time on a TPU slice, from the compiler's cost model.

`compiled.cost_analysis()["optimal_seconds"]` counts a `while` body once (the scanned
layers, XLA's windowed all-gather/reduce-scatter loops) and a Pallas kernel (splash
attention) as free, so it is no step time as it stands. The bound here:

  1. compile the step with 1 and with 2 unrolled layers (`model.scan_layers=False`,
     XLA's windowed-einsum loops off), so that every layer's work is counted;
  2. per layer = optimal(2) - optimal(1); outside the layers = optimal(1) - per layer;
  3. add each layer's attention kernels at the chip's bf16 peak when they run as Pallas
     kernels: 3 x 4 N N' W FLOPs per example (QK^T and AV, forward and backward as in the
     model-FLOPs convention; `attention_kernel_tokens` gives N N': self-attention over N
     video tokens as splash, or as Ulysses' per-device splash with its zero-padded heads;
     cross-attention to S text tokens as splash, XLA for packed rows), the batch spread
     over the chips; ring attention's einsums are XLA ops the cost model counts;
  4. bound = outside + depth x (per layer + attention).

It is a bound, not a forecast: the cost model assumes each op at its roofline and no
stalls. The MFU it implies (model FLOPs per chip / peak / bound) is an upper bound.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from sora_jax import configs
from sora_jax.parallel.context import ulysses_degree
from sora_jax.parallel.sharding import SEQUENCE_BACKENDS, mesh_sizes, resolve_backend
from sora_jax.plan import planner
from sora_jax.plan.topology import Chip, chip_of, topology_devices

# Compiler options that turn XLA:TPU's windowed einsum loops (whose body the cost model
# counts once) back into plain collectives.
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def optimal_seconds(lowered) -> float:
  """The compiler's `optimal_seconds` of a lowered program compiled with XLA's windowed
  einsum loops off (so that a loop body is not counted once for many iterations)."""
  compiled = lowered.compile(compiler_options=NO_WINDOWED_EINSUM)
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["optimal_seconds"])


def _optimal_seconds(config: ml_collections.ConfigDict, depth: int, devices) -> float:
  config = copy.deepcopy(config)
  config.model.update(depth=depth, scan_layers=False)
  return optimal_seconds(planner.lower_train(config, devices)[0])


def combine(one: float, two: float, depth: int, attention: float, model_flops_per_chip: float,
            chip: Chip, method: str) -> dict[str, Any]:
  """The bound from the cost model's seconds of the step with 1 and 2 unrolled layers and
  the attention kernels' seconds per layer (steps 2 and 4 of the module docstring):
  `{"seconds", "depth", "per_layer_seconds", "outside_seconds",
  "attention_kernel_seconds", "mfu_upper_bound", "method"}`."""
  per_layer = max(two - one, 0.0)
  outside = max(one - per_layer, 0.0)
  seconds = outside + depth * (per_layer + attention)
  return {"seconds": seconds, "depth": depth, "per_layer_seconds": per_layer,
          "outside_seconds": outside, "attention_kernel_seconds": attention,
          "mfu_upper_bound": (model_flops_per_chip / chip.peak_bf16_flops / seconds
                              if seconds else None),
          "method": method}


def kernel_seconds(pairs: float, width: int, examples_per_chip: float, chip: Chip) -> float:
  """Seconds per layer of attention kernels over `pairs` query-key pairs per example
  (`attention_kernel_tokens`) at the chip's bf16 peak: 3 x 4 pairs W FLOPs per example."""
  return 3 * 4 * pairs * width * examples_per_chip / chip.peak_bf16_flops


METHOD = ("cost model of 1 and 2 unrolled layers (windowed einsum off) + Pallas attention "
          "at peak")


def attention_kernel_tokens(config: ml_collections.ConfigDict, num_devices: int,
                            heads: int) -> float:
  """Query-key pairs per example and layer that a TPU runs in Pallas kernels (splash),
  scaled by the heads they run on over the model's: N^2 for self-attention as splash (or
  as Ulysses' per-device splash, times its padded heads / heads when the heads do not
  split its all-to-all degree), plus N S for
  cross-attention to S text tokens as splash (per device under a sequence split, or
  `model.attention=splash`; packed rows' masks run in XLA). 0 when nothing is a kernel."""
  t = configs.typed(config)
  backend = resolve_backend(t.model.attention, "tpu")
  sizes = mesh_sizes(configs.mesh_shape(config), num_devices)
  split = backend in SEQUENCE_BACKENDS and sizes["sequence"] > 1
  n = planner.tokens_per_example(config)
  text = 0 if t.data.grouping == "pack" else t.data.text_length
  pairs = 0.0
  if backend == "splash":
    pairs += n * n
  elif split and backend == "ulysses":
    local = heads // sizes["tensor"] if heads % sizes["tensor"] == 0 else heads
    # As models/layers.py runs it: block-causal splash needs plain Ulysses (padded heads).
    degree = (sizes["sequence"] if t.model.causal_frames
              else ulysses_degree(local, sizes["sequence"]))
    pairs += n * n * (-(-local // degree) * degree) / local
  if backend == "splash" or split:
    pairs += n * text
  return pairs


def step_time_bound(config: ml_collections.ConfigDict, devices, chip: Chip,
                    model_flops: float) -> dict[str, Any]:
  """`{"seconds", "depth", "per_layer_seconds", "outside_seconds",
  "attention_kernel_seconds", "mfu_upper_bound", "method"}` of the config's train step on
  `devices`."""
  t = configs.typed(config)
  vocab = planner.vocab_size(config)
  dit = configs.dit_config(config, text_width=configs.text_encoder_config(config, vocab).width)
  one, two = (_optimal_seconds(config, d, devices) for d in (1, 2))
  attention = kernel_seconds(attention_kernel_tokens(config, len(devices), dit.heads),
                             dit.width, t.data.batch_size / len(devices), chip)
  return combine(one, two, dit.depth, attention, model_flops / len(devices), chip, METHOD)


def add_step_time_bound(result: dict[str, Any], config: ml_collections.ConfigDict,
                        devices=None) -> dict[str, Any]:
  """`result` (`planner.plan`'s, with a train step) with `step_time_bound` added."""
  if result["model_flops_per_step"] is None:
    raise planner.PlanError("--bound: the step-time bound is of the train step "
                            "(--what train or both).")
  devices = topology_devices(result["topology"]) if devices is None else devices
  config = planner.without_weights(configs.filled(config))[0]
  result["step_time_bound"] = step_time_bound(config, devices, chip_of(result["topology"]),
                                              result["model_flops_per_step"])
  return result
