"""Compile a config's programs for a TPU slice and say whether they fit.

`plan(config, topology, what)` builds the config's mesh over the slice's devices
(`topology.topology_devices`), traces the model abstractly (no parameter is ever
allocated), compiles

  train   the real train step (`train.step.make_train_step`: loss, gradients, optimiser,
          EMA, donated state) on a global batch of `data.batch_size` clips of the
          config's training size, as cached latents (`data.latents_dir`, what
          `sora-jax encode-dataset` writes: Wan and MaxDiffusion fine-tune this way; with
          a frozen text encoder, its cached text states too, `data.cache_text`) or
          packed rows (`data.grouping="pack"`);
  sample  one solver step's model call: the transformer on the guidance batch
          (2 x `sample.batch_size`) at the config's size, on the EMA weights in the
          compute dtype, with the prompt's text states given;
  stream  (a block-causal model) one solver step's model call of a streamed chunk: one
          causal block of latent frames on the guidance batch after a full KV cache of
          `sample.stream_window` chunks, the cache split over the `sequence` axis as the
          streaming sampler keeps it (`sora_jax.autoregressive`);

and reads per chip from the compiled programs: memory (`memory_analysis`, exact; a
program over the chip's HBM is refused by the compiler, and its message names the
largest buffers), the collectives (`collectives.collectives`), compile time; and the
model FLOPs per step from the analytic count (`models.flops`).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import configs
from sora_jax.interop import wan_vae
from sora_jax.models import flops
from sora_jax.models.autoencoder import IdentityAutoencoder
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.layers import KVCache, cache_sharding
from sora_jax.parallel.sharding import (activation_sharding, batch_sharding, entry_size,
                                        make_mesh, mesh_sizes, state_shardings)
from sora_jax.plan import collectives as collectives_lib
from sora_jax.plan import report
from sora_jax.plan.topology import GiB, PlanError, chip_of, topology_devices
from sora_jax.train import optim
from sora_jax.train.state import (abstract_model, abstract_train_state, array_shapes,
                                  base_part, base_shardings, stored_base,
                                  train_state_shardings, with_shardings)
from sora_jax.train.step import make_train_step

WHAT = ("train", "sample", "both", "stream")


@dataclasses.dataclass
class ProgramPlan:
  """What one compiled program needs per chip. `memory` holds the compiler's figures
  (argument, output, alias, temporary, generated code and their total) and, for the
  train step, the state's parts (parameters, optimiser state, EMA); `error` the
  compiler's refusal (e.g. out of HBM) when it did not compile."""
  name: str
  fits: bool
  memory: dict[str, int]
  collectives: dict[str, Any]
  compile_seconds: float
  error: str | None = None
  largest_buffers: list[tuple[str, int]] = dataclasses.field(default_factory=list)


def vocab_size(config: ml_collections.ConfigDict) -> int:
  """Embedding rows of the text encoder: `text_encoder.vocab_size`, or the tokenizer's."""
  t = configs.typed(config)
  return t.text_encoder.vocab_size or t.tokenizer.vocab_size


def without_weights(config: ml_collections.ConfigDict,
                    ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """`(config, notes)`: a Wan config whose `autoencoder.path` is not set (no weights at
  hand, the usual case when planning) gets a directory holding only the `config.json` of
  the published VAE named by `autoencoder.wan_version` (Wan 2.1's or Wan 2.2's)."""
  section = configs.typed(config).autoencoder
  if section.name != "wan" or config.autoencoder.path:
    return config, []
  if section.wan_version not in wan_vae.PUBLISHED_CONFIGS:
    raise PlanError(f"autoencoder.wan_version={section.wan_version!r}: expected one of "
                    f"{sorted(wan_vae.PUBLISHED_CONFIGS)}.")
  config = copy.deepcopy(config)
  config.autoencoder.path = _published_vae_directory(section.wan_version)
  return config, [f"autoencoder: Wan {section.wan_version}'s VAE architecture "
                  "(autoencoder.path not set)"]


@functools.cache
def _published_vae_directory(wan_version: str) -> str:
  """A directory holding only the `config.json` of the published Wan VAE `wan_version`:
  one per version and process, removed when the process exits."""
  directory = tempfile.mkdtemp(prefix="sora_jax_plan_wan_vae_")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(wan_vae.PUBLISHED_CONFIGS[wan_version], f)
  return directory


def training_latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """`(T', H', W', C')`: what the transformer diffuses for the config's clip size
  (`world.frames/height/width`)."""
  t = configs.typed(config)
  return configs.latent_shape_of(config.autoencoder, t.world.frames, t.world.height,
                                 t.world.width)


def _chip_bytes(leaf: jax.ShapeDtypeStruct) -> int:
  """Bytes per chip of one `ShapeDtypeStruct` with a sharding."""
  return int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize


def _on_host(leaf: jax.ShapeDtypeStruct) -> bool:
  return getattr(leaf.sharding, "memory_kind", None) == "pinned_host"


def shard_bytes(shapes: Any, host: bool = False) -> int:
  """Bytes per chip of a pytree of `ShapeDtypeStruct`s with shardings: those in the
  accelerator's memory, or with `host` those in host memory."""
  return sum(_chip_bytes(leaf) for leaf in jax.tree.leaves(shapes) if _on_host(leaf) == host)


def largest_buffers(shapes: Any, count: int = 5) -> list[tuple[str, int]]:
  """`[(path, bytes per chip)]` of the largest arrays of a pytree of sharded shapes in
  the accelerator's memory (host memory is not what runs out)."""
  sizes = [(jax.tree_util.keystr(path, simple=True, separator="."), _chip_bytes(leaf))
           for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
           if not _on_host(leaf)]
  return sorted(sizes, key=lambda x: -x[1])[:count]


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
         "alias": int(m.alias_size_in_bytes), "temporary": int(m.temp_size_in_bytes),
         "generated_code": int(m.generated_code_size_in_bytes)}
  out["total"] = (out["argument"] + out["output"] - out["alias"] + out["temporary"]
                  + out["generated_code"])
  return out


# Plans of the programs this process compiled, by program text, target devices and HBM: a
# search's candidates that lower to the same program (e.g. splash blocks that clamp to a
# short sequence's length) compile once. (The persistent compilation cache cannot serve
# them: a TPU executable is not read back without a TPU.)
_COMPILED: dict[tuple[str, tuple[tuple[str, int], ...], int], ProgramPlan] = {}


def compile_program(name: str, lowered: Any, hbm_bytes: int,
                    devices: list[jax.Device] | None = None) -> ProgramPlan:
  """Compiles a lowered program; a refusal (out of HBM) becomes a plan that does not fit.
  With the `devices` it was lowered for, a program this process already compiled for them
  is not compiled again (its plan is copied)."""
  key = None
  if devices is not None:
    text = hashlib.sha256(lowered.as_text().encode()).hexdigest()
    key = (text, tuple((d.device_kind, d.id) for d in devices), hbm_bytes)
    if key in _COMPILED:
      return dataclasses.replace(copy.deepcopy(_COMPILED[key]), name=name)
  plan = _compile(name, lowered, hbm_bytes)
  if key is not None:
    _COMPILED[key] = copy.deepcopy(plan)
  return plan


def _compile(name: str, lowered: Any, hbm_bytes: int) -> ProgramPlan:
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # the compiler's refusal: XlaRuntimeError RESOURCE_EXHAUSTED & co.
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
      raise
    return ProgramPlan(name, False, {}, {}, time.perf_counter() - start, error=message)
  seconds = time.perf_counter() - start
  memory, hlo = _memory(compiled), compiled.as_text()
  # Host memory the layer loop keeps per chip (remat residuals offloaded by
  # `model.remat="dots_offload"`): not HBM, so not in the total (`memory_analysis`
  # reports none of it).
  memory["host_offloaded"] = collectives_lib.host_loop_bytes(hlo)
  return ProgramPlan(name, memory["total"] <= hbm_bytes, memory,
                     collectives_lib.collectives(hlo), seconds)


def _train_batch(config: ml_collections.ConfigDict, mesh, rules, latent: tuple[int, ...],
                 text_width: int) -> dict[str, jax.ShapeDtypeStruct]:
  t = configs.typed(config)
  b, length = t.data.batch_size, t.data.text_length
  if t.data.grouping == "pack":
    patch = configs.decode_variant(t.model.variant)["patch"]
    n, s = t.data.tokens_per_row, t.data.text_tokens_per_row
    shapes = {"patches": ((b, n, int(np.prod(patch)) * latent[-1]), jnp.float32),
              "positions": ((b, n, 3), jnp.int32), "segment_ids": ((b, n), jnp.int32),
              "text_ids": ((b, s), jnp.int32), "text_segment_ids": ((b, s), jnp.int32),
              "text_positions": ((b, s), jnp.int32)}
  else:
    shapes = {"latent": ((b, *latent), jnp.float32), "text_ids": ((b, length), jnp.int32),
              "text_mask": ((b, length), jnp.bool_)}
    if t.data.cache_text:
      shapes["text_states"] = ((b, length, text_width), jnp.float32)
  return {k: jax.ShapeDtypeStruct(shape, dtype,
                                  sharding=batch_sharding(mesh, rules, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def tokens_per_example(config: ml_collections.ConfigDict) -> int:
  """Video tokens of one training example (a packed row's length when packing)."""
  t = configs.typed(config)
  if t.data.grouping == "pack":
    return t.data.tokens_per_row
  patch = configs.decode_variant(t.model.variant)["patch"]
  return num_tokens(training_latent_shape(config)[:3], patch)


def lower_train(config: ml_collections.ConfigDict, devices) -> tuple[Any, Any, float]:
  """`(lowered train step, abstract state, model FLOPs per step)`."""
  config = copy.deepcopy(config)
  if configs.typed(config).data.grouping != "pack":
    config.data.latents_dir = config.data.latents_dir or "(planned: cached latents)"
    if "text_encoder" in configs.typed(config).optim.frozen:
      config.data.cache_text = True   # a frozen encoder's states are cached with the latents
  t = configs.typed(config)
  vocab = vocab_size(config)
  mesh = make_mesh(configs.mesh_shape(config), devices=devices)
  rules = configs.sharding_rules(config)
  latent = training_latent_shape(config)
  tx = optim.for_run(config)
  graphdef, abstract = abstract_model(config, vocab)
  shardings = train_state_shardings(config, vocab, mesh, tx, abstract=abstract)
  state = abstract_train_state(shardings, config, vocab, tx, abstract=abstract)
  text_cfg = configs.text_encoder_config(config, vocab)
  batch = _train_batch(config, mesh, rules, latent, text_cfg.width)
  null = np.zeros((t.data.text_length,), np.int32)
  null_text = (jnp.zeros((1, t.data.text_length, text_cfg.width), t.train.compute_dtype)
               if t.data.cache_text else None)   # computed once by the run; values unused here
  base = with_shardings(stored_base(config, base_part(config, array_shapes(abstract))),
                        base_shardings(config, mesh, abstract))   # a LoRA run's, abstract
  step = make_train_step(config, graphdef, tx, shardings, mesh, IdentityAutoencoder(), null,
                         null == 0, null_text=null_text, base=base)
  dit_cfg = configs.dit_config(config, text_width=text_cfg.width, in_channels=latent[-1])
  text_tokens = t.data.text_tokens_per_row if t.data.grouping == "pack" else t.data.text_length
  model_flops = flops.train_step_flops(dit_cfg, text_cfg, tokens_per_example(config),
                                       text_tokens, t.data.batch_size,
                                       t.flow.self_condition_rate,
                                       experts=len(optim.trained_experts(t)))
  return step.lower(state, batch), state, model_flops


def plan_train(config: ml_collections.ConfigDict, devices, hbm_bytes: int,
               ) -> tuple[ProgramPlan, float]:
  """The train step's plan and its model FLOPs (per step, whole batch)."""
  lowered, state, model_flops = lower_train(config, devices)
  plan = compile_program("train_step", lowered, hbm_bytes, devices)
  plan.memory.update(parameters=shard_bytes(state["params"]),
                     host_parameters=shard_bytes(state["params"], host=True),
                     optimizer=shard_bytes(state["opt_state"]), ema=shard_bytes(state["ema"]))
  plan.largest_buffers = largest_buffers(state)
  return plan, model_flops


@dataclasses.dataclass
class _ModelCall:
  """What a sampling program's plan needs: the mesh and rules, the transformer alone (its
  graph and parameters as sharded `ShapeDtypeStruct`s in the compute dtype: text states
  are given), and `inputs(video_shape, **extra)`, the call's sharded inputs on the
  guidance batch."""
  mesh: Any
  rules: Any
  graphdef: Any
  params: Any
  cfg: Any        # the transformer's DiTConfig
  rows: int
  inputs: Any


def _model_call(config: ml_collections.ConfigDict, devices) -> _ModelCall:
  t = configs.typed(config)
  vocab = vocab_size(config)
  mesh = make_mesh(configs.mesh_shape(config), devices=devices)
  rules = configs.sharding_rules(config)
  dit = nnx.merge(*abstract_model(config, vocab)).dit
  graphdef, abstract = nnx.split(dit, nnx.Param)     # the transformer alone: text is given
  dtype = jnp.dtype(t.train.compute_dtype)
  params = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                        else x.dtype, sharding=s),
      nnx.to_pure_dict(abstract), state_shardings(abstract, mesh, rules))
  # Conditional and unconditional passes, padded to whole shards of the batch (as the
  # sharded sampler pads its batch).
  shards = entry_size(mesh, batch_sharding(mesh, rules, 1).spec[0])
  b = -(-2 * t.sample.batch_size // shards) * shards
  text_width = configs.text_encoder_config(config, vocab).width

  def inputs(video_shape, **extra: jax.ShapeDtypeStruct) -> dict[str, Any]:
    shapes = {"x": jax.ShapeDtypeStruct((b, *video_shape), dtype),
              "t": jax.ShapeDtypeStruct((b,), jnp.float32),
              "text": jax.ShapeDtypeStruct((b, t.data.text_length, text_width), dtype),
              "mask": jax.ShapeDtypeStruct((b, t.data.text_length), jnp.bool_), **extra}
    return with_shardings(shapes, {k: batch_sharding(mesh, rules, len(v.shape))
                                   for k, v in shapes.items()})

  return _ModelCall(mesh, rules, graphdef, params, dit.cfg, b, inputs)


def _compile_call(name: str, call: _ModelCall, fn, args: dict[str, Any], config,
                  hbm_bytes: int, devices, **fixed: Any) -> ProgramPlan:
  """Compiles `fn(params, **args, **fixed)` under the config's activation sharding."""
  t = configs.typed(config)

  def model_call(params, args, fixed):
    with activation_sharding(call.mesh, call.rules, t.model.attention, t.model.splash_block):
      return fn(nnx.merge(call.graphdef, params), **args, **fixed)

  jitted = jax.jit(model_call, out_shardings=batch_sharding(call.mesh, call.rules, 5))
  plan = compile_program(name, jitted.lower(call.params, args, fixed), hbm_bytes, devices)
  plan.memory["parameters"] = shard_bytes(call.params)
  plan.largest_buffers = largest_buffers({"params": call.params, **fixed} if fixed
                                         else call.params)
  return plan


def plan_sample(config: ml_collections.ConfigDict, devices, hbm_bytes: int) -> ProgramPlan:
  """The plan of one solver step's model call (transformer on the guidance batch)."""
  call = _model_call(config, devices)
  return _compile_call("sample_model_call", call,
                       lambda dit, x, t, text, mask: dit(x, t, text, mask),
                       call.inputs(training_latent_shape(config)), config, hbm_bytes, devices)


def plan_stream(config: ml_collections.ConfigDict, devices, hbm_bytes: int) -> ProgramPlan:
  """The plan of one solver step's model call of a streamed chunk (`sora_jax.autoregressive`,
  a block-causal model): the transformer on the guidance batch of one causal block of
  latent frames at the config's frame size, attending to a full KV cache of
  `sample.stream_window` chunks, laid out as the streaming sampler keeps it (its tokens
  over the `sequence` axis, rows over the batch axes, heads over `tensor`)."""
  t = configs.typed(config)
  if not t.model.causal_frames:
    raise PlanError("--what stream: streaming needs a block-causal model "
                    "(--config.model.causal_frames=1 or more).")
  call = _model_call(config, devices)
  dit_cfg = call.cfg
  patch = configs.decode_variant(t.model.variant)["patch"]
  chunk = (t.model.causal_frames * patch[0],) + tuple(training_latent_shape(config)[1:])
  tokens = num_tokens(chunk[:3], patch)
  slots = t.sample.stream_window * tokens
  layout = cache_sharding(call.mesh, call.rows, slots, dit_cfg.heads)
  kv = jax.ShapeDtypeStruct(dit_cfg.kv_cache_shape(call.rows, slots),
                            jnp.dtype(t.train.compute_dtype), sharding=layout.keys)
  cache = KVCache(kv, kv, jax.ShapeDtypeStruct((call.rows, slots), jnp.bool_,
                                               sharding=layout.valid))
  args = call.inputs(chunk, positions=jax.ShapeDtypeStruct((call.rows, tokens, 3), jnp.int32))
  plan = _compile_call(
      "stream_chunk_call", call,
      lambda dit, x, t, text, mask, positions, kv_cache: dit(
          x, t, text, mask, positions=positions, kv_cache=kv_cache),
      args, config, hbm_bytes, devices, kv_cache=cache)
  plan.memory["kv_cache"] = shard_bytes(cache)
  return plan


def plan(config: ml_collections.ConfigDict, topology: str, what: str = "train",
         devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """The plan of `config` on the TPU slice `topology` as a JSON-able dict:
  `topology`, `chip`, `chips`, `hbm_bytes`, `fits`, `programs` (one per compiled program:
  `name`, `fits`, `memory_per_chip_bytes` with its parts, `collectives`,
  `compile_seconds`, `error`), `memory_per_chip_bytes` (the largest program's total),
  `collectives` (the train step's, else the sampler's), `model_flops_per_step` (train),
  `mesh`, `notes`.

  `devices`: compile for these instead of the topology's (tests pass CPU devices).
  """
  if what not in WHAT:
    raise PlanError(f"--what {what!r}: expected one of {list(WHAT)}.")
  chip = chip_of(topology)
  devices = topology_devices(topology) if devices is None else devices
  config, notes = without_weights(configs.filled(config))
  configs.validate(config, num_devices=len(devices),
                   num_processes=len({d.process_index for d in devices}))
  programs, model_flops = [], None
  if what in ("train", "both"):
    train_plan, model_flops = plan_train(config, devices, chip.hbm_bytes)
    programs.append(train_plan)
    if configs.typed(config).data.grouping != "pack" and not config.data.latents_dir:
      notes.append("train: on cached latents (sora-jax encode-dataset), no VAE encoder in the "
                   "step")
  if what in ("sample", "both"):
    programs.append(plan_sample(config, devices, chip.hbm_bytes))
  if what == "stream":
    programs.append(plan_stream(config, devices, chip.hbm_bytes))
  sizes = configs.mesh_shape(config)
  return {
      "topology": topology, "chip": chip.name, "chips": len(devices),
      "hbm_bytes": chip.hbm_bytes, "fits": all(p.fits for p in programs),
      "mesh": mesh_sizes(sizes, len(devices)),
      "memory_per_chip_bytes": max((p.memory.get("total", 0) for p in programs), default=0),
      "collectives": programs[0].collectives,
      "model_flops_per_step": model_flops,
      "programs": [{"name": p.name, "fits": p.fits, "memory_per_chip_bytes": p.memory,
                    "collectives": p.collectives, "compile_seconds": round(p.compile_seconds, 2),
                    "error": p.error,
                    "heap_at_refusal": p.error and report.heap_breakdown(p.error),
                    "largest_buffers": [{"name": n, "bytes": b} for n, b in p.largest_buffers]}
                   for p in programs],
      "notes": notes,
  }


__all__ = ["GiB", "PlanError", "ProgramPlan", "WHAT", "compile_program", "plan", "plan_sample",
           "plan_stream", "plan_train", "shard_bytes", "tokens_per_example",
           "training_latent_shape", "vocab_size", "without_weights"]
