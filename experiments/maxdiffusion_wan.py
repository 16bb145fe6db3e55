"""MaxDiffusion's own Wan 2.1 training step, compiled ahead of time for a TPU slice.

From a user's checkout of MaxDiffusion's source (github.com/AI-Hypercomputer/maxdiffusion;
nothing of it is copied into this project): its pyconfig and `base_wan_1_3b.yml` /
`base_wan_14b.yml`, its mesh (`max_utils.create_device_mesh`), its `WanModel` (traced
abstractly with `nnx.eval_shape`: no weight is allocated), its parameter dtypes
(`wan_pipeline._final_param_dtype`, read from the source), its optimiser
(`max_utils.create_optimizer`), its scheduler, data shardings and jitted `train_step`
(`WanTrainer.create_scheduler`, `get_data_shardings`, `get_train_step`: its in/out
shardings and donation), lowered on latents `[B, 16, T, H, W]` and text states
`[B, L, 4096]` in float32 (what its tfrecord loader yields). `experiments.aot_vs_maxdiffusion`
compiles it, in a process of its own, as `sora-jax plan` compiles sora_jax's step
(`sora_jax.plan.planner.compile_program`).

What it needs besides this project's environment: `jaxopt` and `aqtp` (`pip install
jaxopt aqtp --no-deps`; MaxDiffusion's train step and quantisation module import them).
Modules the train step never uses (GCS, tensorflow's tfrecord reader, SSIM, video
generation, weight loading, data loaders) are replaced by empty stand-ins so that importing
its trainer does not pull them in; the list is in the result's `stubs`.
`WanModel.load_config` would read the Hub, so the architecture comes from `DIMS` (the
values of Wan2.1-T2V-1.3B/14B-Diffusers' `transformer/config.json`).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.machinery
import os
import subprocess
import sys
import types
from typing import Any

# Wan2.1-T2V-1.3B-Diffusers' transformer/config.json; 14B: its own.
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
DIMS = {"1.3B": WAN_1_3B,
        "14B": dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)}
# MaxDiffusion's remat_policy for each of sora_jax's `model.remat` (the same jax policy).
REMAT = {"none": "NONE", "full": "FULL", "dots": "MATMUL_WITHOUT_BATCH",
         "dots_offload": "OFFLOAD_MATMUL_WITHOUT_BATCH"}


def _stub_unused_modules() -> list[str]:
  """Empty stand-ins for modules MaxDiffusion's trainer imports and its train step never
  runs; returns `["module: why"]`."""
  def unavailable(name):
    def call(*args, **kwargs):
      raise RuntimeError(f"{name} is not available in an ahead-of-time compile.")
    return call

  stubs = []

  def stub(name: str, why: str, **attrs) -> None:
    if name in sys.modules:
      return
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.__path__ = []
    module.__dict__.update(attrs)
    sys.modules[name] = module
    stubs.append(f"{name}: {why}")

  try:
    import google.cloud  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    stub("google", "namespace of google.cloud")
    stub("google.cloud", "namespace of google.cloud.storage")
  stub("google.cloud.storage", "uploads of metrics and configs to GCS",
       Client=unavailable("google.cloud.storage.Client"))
  sys.modules["google.cloud"].storage = sys.modules["google.cloud.storage"]
  stub("tensorflow", "its tfrecord data loader")
  stub("skimage", "SSIM after training")
  stub("skimage.metrics", "SSIM after training", structural_similarity=unavailable("ssim"))
  stub("maxdiffusion.generate_wan", "video generation for evaluation",
       inference_generate_video=unavailable("inference_generate_video"),
       run=unavailable("generate_wan.run"))
  stub("maxdiffusion.pipelines.wan.wan_pipeline", "loading weights, the VAE and UMT5",
       WanPipeline=type("WanPipeline", (), {}))
  stub("maxdiffusion.checkpointing.wan_checkpointer_2_1", "Orbax checkpoints, weight loading",
       WanCheckpointer2_1=type("WanCheckpointer2_1", (), {}))
  stub("maxdiffusion.input_pipeline.input_pipeline_interface", "tfrecord and HF data loaders",
       make_data_iterator=unavailable("make_data_iterator"))
  return stubs


def _definitions(path: str, names: set[str], namespace: dict) -> dict:
  """The top-level definitions `names` of a source file, run without its imports."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  keep = [node for node in tree.body
          if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names)
          or (isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id in names for t in node.targets))]
  namespace = dict(namespace)
  exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)  # pylint: disable=exec-used
  missing = names - set(namespace)
  if missing:
    raise RuntimeError(f"{path}: no {sorted(missing)} (another MaxDiffusion version?)")
  return namespace


@contextlib.contextmanager
def _devices_are(jax, devices):
  """MaxDiffusion's pyconfig and attention read `jax.devices()` (batch size, TPU
  generation): they see the slice's devices while its config and model are built."""
  saved = (jax.devices, jax.device_count, jax.local_devices, jax.local_device_count)
  jax.devices = jax.local_devices = lambda *a, **k: list(devices)
  jax.device_count = jax.local_device_count = lambda *a, **k: len(devices)
  try:
    yield
  finally:
    jax.devices, jax.device_count, jax.local_devices, jax.local_device_count = saved


def source_commit(source: str) -> str:
  try:
    return subprocess.run(["git", "-C", source, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown (not a git checkout)"


def lower_train_step(source: str, topology: str, remat: str, *, size: str = "1.3B",
                     latent: tuple[int, int, int] = (21, 60, 104), text_length: int = 512,
                     per_chip_batch: int = 1, num_layers: int | None = None
                     ) -> tuple[Any, dict[str, Any]]:
  """MaxDiffusion's Wan `train_step` lowered for `topology` (all chips on fsdp, splash
  attention, bfloat16 weights and activations, `remat` one of `REMAT`'s keys), to compile
  with `sora_jax.plan.planner.compile_program`; with `num_layers`, that many layers
  unrolled (`scan_layers=False`), for the step-time bound.

  `source`: a MaxDiffusion checkout (the directory holding `src/maxdiffusion`). Returns
  `(lowered, info)`; `info`: `parameters` and `optimizer` (bytes per chip, from the
  state's shardings), `commit`, `stubs`, `overrides`, `mesh`, `global_batch`,
  `remat_policy`.
  """
  src = os.path.join(os.path.abspath(source), "src")
  if not os.path.isfile(os.path.join(src, "maxdiffusion", "trainers", "wan_trainer.py")):
    raise FileNotFoundError(f"{source}: not a MaxDiffusion checkout (no "
                            f"src/maxdiffusion/trainers/wan_trainer.py)")
  sys.path.insert(0, src)
  stubs = _stub_unused_modules()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flax.linen import partitioning  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  try:
    import maxdiffusion  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from maxdiffusion import max_utils, pyconfig  # pylint: disable=g-import-not-at-top
    from maxdiffusion.models.wan.transformers.transformer_wan import WanModel  # pylint: disable=g-import-not-at-top
    from maxdiffusion.trainers import wan_trainer  # pylint: disable=g-import-not-at-top
    from maxdiffusion.trainers.base_wan_trainer import TrainState  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"MaxDiffusion needs {e.name!r}: pip install jaxopt aqtp "
                              f"--no-deps (and {e.name} if it is neither)") from e
  from sora_jax.plan.planner import shard_bytes  # pylint: disable=g-import-not-at-top
  from sora_jax.plan.topology import topology_devices  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  with contextlib.suppress(LookupError):
    flax.config.update("flax_always_shard_variable", False)   # as its train_wan.py
  cast_rule = _definitions(os.path.join(src, "maxdiffusion", "pipelines", "wan", "wan_pipeline.py"),
                           {"_CAST_EXCLUSION_KEYWORDS", "_is_cast_excluded", "_final_param_dtype"},
                           {"np": np, "jax": jax, "jnp": jnp})["_final_param_dtype"]
  devices = topology_devices(topology)
  yml = os.path.join(src, "maxdiffusion", "configs",
                     "base_wan_1_3b.yml" if size == "1.3B" else "base_wan_14b.yml")
  overrides = ["run_name=aot", "attention=flash", f"remat_policy={REMAT[remat]}",
               "weights_dtype=bfloat16", "activations_dtype=bfloat16",
               "ici_data_parallelism=1", "ici_fsdp_parallelism=-1",
               "ici_context_parallelism=1", "ici_tensor_parallelism=1",
               "dcn_data_parallelism=1", "dcn_fsdp_parallelism=1",
               "dcn_context_parallelism=1", "dcn_tensor_parallelism=1",
               f"per_device_batch_size={float(per_chip_batch)}",
               "skip_jax_distributed_system=True", "write_metrics=False",
               "write_timing_metrics=False", "enable_ssim=False"]
  if num_layers is not None:
    overrides.append("scan_layers=False")
  with _devices_are(jax, devices):
    pyconfig.initialize([None, yml] + overrides, validate_training=True)
    config = pyconfig.config
    mesh = Mesh(max_utils.create_device_mesh(config, devices=devices), config.mesh_axes)
    layers = {} if num_layers is None else {"num_layers": num_layers}
    dims = dict(DIMS[size], **layers, mesh=mesh, dtype=config.activations_dtype,
                weights_dtype=config.weights_dtype, attention=config.attention,
                precision=max_utils.get_precision(config),
                flash_block_sizes=max_utils.get_flash_block_sizes(config),
                remat_policy=config.remat_policy,
                names_which_can_be_saved=config.names_which_can_be_saved,
                names_which_can_be_offloaded=config.names_which_can_be_offloaded,
                flash_min_seq_length=config.flash_min_seq_length, dropout=config.dropout,
                mask_padding_tokens=config.mask_padding_tokens, scan_layers=config.scan_layers,
                enable_jax_named_scopes=config.enable_jax_named_scopes,
                attention_config={"use_base2_exp": config.use_base2_exp,
                                  "use_experimental_scheduler": config.use_experimental_scheduler,
                                  "ulysses_shards": getattr(config, "ulysses_shards", -1),
                                  "ulysses_attention_chunks":
                                      getattr(config, "ulysses_attention_chunks", 1)})
    with mesh, partitioning.axis_rules(config.logical_axis_rules):
      model = nnx.eval_shape(lambda rngs: WanModel(**dims, rngs=rngs),
                             rngs=nnx.Rngs(jax.random.key(config.seed)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Weights as its pipeline loads them: weights_dtype, its exclusions in float32.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jax.ShapeDtypeStruct(x.shape, cast_rule(
          tuple(getattr(k, "key", getattr(k, "name", k)) for k in path), config.weights_dtype)),
      params)
  schedule = max_utils.create_learning_rate_schedule(
      config.learning_rate, config.learning_rate_schedule_steps, config.warmup_steps_fraction,
      config.max_train_steps)
  tx = max_utils.create_optimizer(config, schedule)
  trainer = wan_trainer.WanTrainer.__new__(wan_trainer.WanTrainer)   # its __init__ opens Orbax
  trainer.config = config
  scheduler, scheduler_state = trainer.create_scheduler()
  with mesh, partitioning.axis_rules(config.logical_axis_rules):
    state = jax.eval_shape(lambda p, r: TrainState.create(
        apply_fn=graphdef.apply, params=p, tx=tx, graphdef=graphdef, rest_of_state=r),
        params, rest)
    state_shardings = nnx.get_named_sharding(state, mesh)
  data_shardings = trainer.get_data_shardings(mesh)
  step = trainer.get_train_step(types.SimpleNamespace(scheduler=scheduler, mesh=mesh), mesh,
                                state_shardings, data_shardings)
  shaped = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  state = jax.tree.map(shaped, state, state_shardings)
  batch = config.global_batch_size_to_load
  data = {"latents": jax.ShapeDtypeStruct((batch, DIMS[size]["in_channels"], *latent),
                                          jnp.float32, sharding=data_shardings["latents"]),
          "encoder_hidden_states": jax.ShapeDtypeStruct(
              (batch, text_length, DIMS[size]["text_dim"]), jnp.float32,
              sharding=data_shardings["encoder_hidden_states"])}
  replicated = NamedSharding(mesh, PartitionSpec())
  key = jax.eval_shape(lambda: jax.random.key(config.seed))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  scheduler_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      np.shape(x), jnp.asarray(x).dtype, sharding=replicated), scheduler_state)

  info = {"commit": source_commit(source), "stubs": stubs, "overrides": overrides,
          "mesh": dict(mesh.shape), "global_batch": batch, "remat_policy": REMAT[remat],
          "parameters": shard_bytes(state.params), "optimizer": shard_bytes(state.opt_state)}
  with mesh, partitioning.axis_rules(config.logical_axis_rules):
    return step.lower(state, data, key, scheduler_state), info
