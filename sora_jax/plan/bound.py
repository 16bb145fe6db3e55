"""A lower bound on the train step's time on a TPU slice, from the compiler's cost model.

`compiled.cost_analysis()["optimal_seconds"]` counts a `while` body once (the scanned
layers, XLA's windowed all-gather/reduce-scatter loops) and a Pallas kernel (splash
attention) as free, so it is no step time as it stands. The bound here:

  1. compile the step with 1 and with 2 unrolled layers (`model.scan_layers=False`,
     XLA's windowed-einsum loops off), so that every layer's work is counted;
  2. per layer = optimal(2) - optimal(1); outside the layers = optimal(1) - per layer;
  3. add each layer's attention kernels at the chip's bf16 peak when they run as Pallas
     kernels: 3 x 4 N (N + S) W FLOPs per example (QK^T and AV of self-attention over N
     video tokens and of cross-attention to S text tokens, forward and backward as in the
     model-FLOPs convention; packed rows' cross-attention runs in XLA, S = 0), the batch
     spread over the chips;
  4. bound = outside + depth x (per layer + attention).

It is a bound, not a forecast: the cost model assumes each op at its roofline and no
stalls. The MFU it implies (model FLOPs per chip / peak / bound) is an upper bound.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from sora_jax import configs
from sora_jax.parallel.sharding import resolve_backend
from sora_jax.plan import planner
from sora_jax.plan.topology import Chip, chip_of, topology_devices

# Compiler options that turn XLA:TPU's windowed einsum loops (whose body the cost model
# counts once) back into plain collectives.
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _optimal_seconds(config: ml_collections.ConfigDict, depth: int, devices) -> float:
  config = copy.deepcopy(config)
  config.model.update(depth=depth, scan_layers=False)
  lowered = planner.lower_train(config, devices)[0]
  compiled = lowered.compile(compiler_options=NO_WINDOWED_EINSUM)
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["optimal_seconds"])


def step_time_bound(config: ml_collections.ConfigDict, devices, chip: Chip,
                    model_flops: float) -> dict[str, Any]:
  """`{"seconds", "depth", "per_layer_seconds", "outside_seconds",
  "attention_kernel_seconds", "mfu_upper_bound", "method"}` of the config's train step on
  `devices`."""
  t = configs.typed(config)
  vocab = planner.vocab_size(config)
  dit = configs.dit_config(config, text_width=configs.text_encoder_config(config, vocab).width)
  one, two = (_optimal_seconds(config, d, devices) for d in (1, 2))
  per_layer = max(two - one, 0.0)
  outside = max(one - per_layer, 0.0)
  attention = 0.0
  if resolve_backend(t.model.attention, "tpu") == "splash":
    n = planner.tokens_per_example(config)
    s = 0 if t.data.grouping == "pack" else t.data.text_length
    attention = 3 * 4 * n * (n + s) * dit.width * t.data.batch_size / len(devices) / (
        chip.peak_bf16_flops)
  seconds = outside + dit.depth * (per_layer + attention)
  per_chip = model_flops / len(devices)
  return {"seconds": seconds, "depth": dit.depth, "per_layer_seconds": per_layer,
          "outside_seconds": outside, "attention_kernel_seconds": attention,
          "mfu_upper_bound": per_chip / chip.peak_bf16_flops / seconds if seconds else None,
          "method": "cost model of 1 and 2 unrolled layers (windowed einsum off) + Pallas "
                    "attention at peak"}


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
