"""Exporting sora_jax models.

  sora-jax export --workdir runs/x --to safetensors --out exported/x     # any run
  sora-jax export --workdir runs/x --to orbax-params --out exported/x    # for inference
  sora-jax export --workdir runs/wan --to diffusers --out exported/wan   # Wan architecture
  sora-jax export --workdir runs/wan-lora --to lora --out exported/style # a LoRA run's adapters

- `safetensors`: every parameter under its dotted sora_jax path in `model.safetensors`
  (our layouts: Linear kernels `[in, out]`), with the run's `config.json` and
  `tokenizer.model`; `sora-jax sample --workdir <out>` reads it back.
- `orbax-params`: a params-only Orbax checkpoint in `<out>/params` (no optimiser state,
  about a third of a training checkpoint), with the config and tokenizer; also readable
  by `sample` and `restore_params`.
- `diffusers`: `transformer/` (`WanTransformer3DModel`), `text_encoder/`
  (transformers `UMT5EncoderModel`) and `tokenizer/` (`spiece.model`), each loadable
  with `from_pretrained`; the transformer must use Wan's options (configs/wan2_1_t2v.py).
  With Wan's VAE (`autoencoder.name="wan"`) also `vae/`, `scheduler/` and
  `model_index.json`: a whole directory `WanPipeline.from_pretrained` loads.
  A VAE run (`sora-jax train-vae`) exports to `orbax-params` only: a directory that reads
  like the run wherever a VAE workdir is named (`autoencoder.workdir`), with its
  parameters and latent statistics alone (`sora_jax.train.vae_loop.write_vae_weights`).
- `lora`: a LoRA run's adapters alone, as diffusers' LoRA file
  (`pytorch_lora_weights.safetensors`, `WanPipeline.load_lora_weights` loads it, and
  `sample --lora` reads it back); Wan architecture.

A LoRA run (`lora.rank`) exports in the other formats as its merged weights (adapters
folded into the base, `train.restore.restore_params`), with a config without adapters;
`loras` merges LoRA files into any export.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from typing import Any, Sequence

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sora_jax import configs
from sora_jax.diffusion import conditioning
from sora_jax.interop import tensors, umt5, wan, wan_vae
from sora_jax.interop.load import load_wan_vae, module_params
from sora_jax.interop import lora
from sora_jax.interop.lora import merge_lora_files
from sora_jax.models.dit import DiffusionTransformer, folded
from sora_jax.models.text import TextEncoder
from sora_jax.models.vae import VideoVAE
from sora_jax.train import workdir as wd
from sora_jax.models.tokenizer import Tokenizer
from sora_jax.train.restore import params_dir, restore_adapters, restore_params
from sora_jax.train.state import abstract_model
from sora_jax.train.vae_loop import EXPORTED, write_vae_weights

FORMATS = ("safetensors", "orbax-params", "diffusers", "lora")


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _write_json(path: str, value: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)


def save_wan_transformer(dit: DiffusionTransformer, directory: str, *,
                         dtype: np.dtype | None = None) -> None:
  """Writes `dit` as a diffusers `WanTransformer3DModel` directory (config.json +
  safetensors, sharded past 5 GiB); raises ValueError if `dit` is not Wan-shaped."""
  config = wan.diffusers_config_from_dit(dit.cfg)
  config["_diffusers_version"] = _version("diffusers") or "0.33.0"
  their = tensors.to_their_tensors(module_params(dit), wan.transformer_mapping(dit.cfg),
                                   dtype=dtype)
  tensors.save_safetensors(their, directory, "diffusion_pytorch_model")
  _write_json(os.path.join(directory, "config.json"), config)


def save_wan_vae(vae: VideoVAE, directory: str, *, dtype: np.dtype | None = None) -> None:
  """Writes a Wan-configured `vae` as a diffusers `AutoencoderKLWan` directory."""
  config = wan_vae.diffusers_config_from_vae(vae.config, np.asarray(vae.latent_mean[...]),
                                             np.asarray(vae.latent_std[...]))
  config["_diffusers_version"] = _version("diffusers") or "0.33.0"
  their = tensors.to_their_tensors(module_params(vae), wan_vae.vae_mapping(vae.config),
                                   dtype=dtype)
  tensors.save_safetensors(their, directory, "diffusion_pytorch_model")
  _write_json(os.path.join(directory, "config.json"), config)


def save_umt5_encoder(encoder: TextEncoder, directory: str, *,
                      dtype: np.dtype | None = None) -> None:
  """Writes `encoder` as a transformers `UMT5EncoderModel` directory."""
  their = tensors.to_their_tensors(module_params(encoder), umt5.text_encoder_mapping(encoder.cfg),
                                   dtype=dtype)
  tensors.save_safetensors(their, directory, "model")
  _write_json(os.path.join(directory, "config.json"), umt5.hf_config_from_text_encoder(encoder.cfg))


def save_t5_tokenizer(spiece_model: str, directory: str, max_length: int) -> None:
  """A transformers T5 tokenizer directory around a sentencepiece model."""
  os.makedirs(directory, exist_ok=True)
  shutil.copyfile(spiece_model, os.path.join(directory, "spiece.model"))
  _write_json(os.path.join(directory, "tokenizer_config.json"),
              {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": max_length,
               "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})


def _copy_run_files(workdir: str, out: str, config) -> None:
  """The run's tokenizer and `config` (a LoRA run's is its merged model's) beside the
  exported parameters."""
  os.makedirs(out, exist_ok=True)
  wd.save_config(out, config)
  shutil.copyfile(wd.tokenizer_path(workdir), wd.tokenizer_path(out))


def wan_model_index(scheduler: str, boundary: float = 0.0,
                    expand_timesteps: bool = False) -> dict[str, Any]:
  """`model_index.json` of a diffusers `WanPipeline` (text-to-video) whose scheduler is the
  diffusers class `scheduler`; `boundary > 0`: with Wan 2.2's low-noise expert
  (`transformer_2`) switched in below that share of the timesteps; `expand_timesteps`:
  a flow time per token (Wan 2.2 TI2V, whose given first frame runs at time 0)."""
  second = ["diffusers", "WanTransformer3DModel"] if boundary else [None, None]
  return {"_class_name": "WanPipeline", "_diffusers_version": _version("diffusers") or "0.33.0",
          "scheduler": ["diffusers", scheduler],
          "text_encoder": ["transformers", "UMT5EncoderModel"],
          "tokenizer": ["transformers", "T5Tokenizer"],
          "transformer": ["diffusers", "WanTransformer3DModel"],
          "transformer_2": second, "vae": ["diffusers", "AutoencoderKLWan"],
          "boundary_ratio": boundary or None, "expand_timesteps": expand_timesteps}


def save_scheduler(config, directory: str) -> str:
  """Writes the diffusers scheduler of the run's `sample.*` settings — UniPC over flow
  sigmas (Wan's release) with `sample.shift`, or FlowMatchEuler for
  `schedule=flow_match_euler` or a shortcut student's uniform steps — and returns its
  class name."""
  os.makedirs(directory, exist_ok=True)
  sample = configs.section(config, "sample")
  shift = sample.shift
  if configs.section(config, "model").step_embedding:
    # A shortcut student's `sample.steps` uniform Euler steps: FlowMatchEuler at shift 1
    # spaces linspace(1, 1e-3, steps) and stretches it to end at shift_terminal = 1/steps
    # (then 0): exactly 1, 1 - 1/steps, ..., 1/steps, 0 (one step: 1, 0 unstretched).
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0,
                 "num_train_timesteps": 1000,
                 "shift_terminal": 1.0 / sample.steps if sample.steps > 1 else None}
  elif sample.schedule == "flow_match_euler":
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift,
                 "num_train_timesteps": 1000}
  else:
    scheduler = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                 "use_flow_sigmas": True, "flow_shift": shift, "num_train_timesteps": 1000,
                 "solver_order": 2}
  _write_json(os.path.join(directory, "scheduler_config.json"), scheduler)
  return scheduler["_class_name"]


def _export_adapters(workdir: str, out: str, *, ema: bool, step: int | None) -> list[str]:
  """A LoRA run's adapters as diffusers' LoRA file (`lora.save_wan_lora`), in `out`."""
  config, adapters, step = restore_adapters(workdir, step, ema=ema)
  t = configs.typed(config)
  vocab = Tokenizer(wd.tokenizer_path(workdir)).vocab_size
  cfg = lora.wan_dit_config(config, vocab)
  if set(adapters) - {"dit"}:
    raise ValueError(f"lora.targets={t.lora.targets} adapt {sorted(set(adapters) - {'dit'})} "
                     "too; diffusers' Wan LoRA files hold the transformer's adapters only.")
  if t.model.camera_control:
    raise ValueError(f"{workdir}: model.camera_control; its camera input is trained whole "
                     "beside the adapters and diffusers' Wan LoRA files hold adapters only "
                     "(export --to safetensors or orbax-params keeps it).")
  tmp = out.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  path = lora.save_wan_lora(adapters["dit"], cfg, t.lora.rank, t.lora.alpha or t.lora.rank, tmp)
  _write_json(os.path.join(tmp, "export.json"),
              {"step": step, "ema": ema, "source": os.path.abspath(workdir), "format": "lora",
               "base": t.train.init_from or f"random initialisation (seed {t.seed})"})
  os.replace(tmp, out)
  return sorted(os.path.join(out, f) for f in (os.path.basename(path), "export.json"))


def folded_inputs(config) -> dict[str, float]:
  """The values a distilled student's inputs are fixed at for formats without them
  (`models.dit.folded`): the guidance input at `sample.cfg_scale`, the step input at
  `1 / sample.steps` (a shortcut student's uniform steps)."""
  model, sample = configs.section(config, "model"), configs.section(config, "sample")
  inputs = {}
  if model.guidance_embedding:
    inputs["guidance"] = float(sample.cfg_scale)
  if model.step_embedding:
    inputs["step_size"] = 1.0 / sample.steps
  return inputs


def export_run(workdir: str, to: str, out: str, *, ema: bool = True,
               step: int | None = None, loras: Sequence[tuple[str, float]] = (),
               loras_low: Sequence[tuple[str, float]] = ()) -> list[str]:
  """Exports a run's parameters (its EMA by default) in format `to` (one of `FORMATS`)
  to the directory `out`; returns the paths written. `out` must not exist yet. `loras`:
  `(file, strength)` pairs of LoRA files merged into the exported transformer, `loras_low`
  into a two-expert model's low-noise one (`sora_jax.interop.lora.merge_lora_files`)."""
  if to not in FORMATS:
    raise ValueError(f"--to={to!r}: expected one of {FORMATS}.")
  if os.path.exists(out):
    raise FileExistsError(f"{out!r} exists; export writes a new directory.")
  if to == "lora":
    return _export_adapters(workdir, out, ema=ema, step=step)
  vae_run = "vae" in wd.load_config(workdir)     # a train-vae run: weights for latent models
  if vae_run and (to != "orbax-params" or loras or loras_low):
    raise ValueError(f"{workdir!r} is a VAE run: it exports with --to=orbax-params (no "
                     f"LoRA files), not --to={to}.")
  tmp = out.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  if vae_run:
    record = {"step": write_vae_weights(workdir, tmp, step), "source": os.path.abspath(workdir),
              "format": to, "kept": list(EXPORTED)}
  else:
    record = _export_model(workdir, to, tmp, ema=ema, step=step, loras=loras,
                           loras_low=loras_low)
  _write_json(os.path.join(tmp, "export.json"), record)
  os.replace(tmp, out)
  return sorted(os.path.join(root, f) for root, _, files in os.walk(out) for f in files)


def _export_model(workdir: str, to: str, tmp: str, *, ema: bool, step: int | None,
                  loras: Sequence[tuple[str, float]], loras_low: Sequence[tuple[str, float]]
                  ) -> dict[str, Any]:
  """Writes a training run's (or export's) model in format `to` into `tmp` (`export_run`);
  returns its `export.json` record."""
  config, tokenizer, graphdef, params, step = restore_params(workdir, step, ema=ema)
  params = merge_lora_files(config, tokenizer.vocab_size, params, loras, loras_low)
  record = {"step": step, "ema": ema, "source": os.path.abspath(workdir), "format": to}
  for key, files in (("merged_loras", loras), ("merged_loras_low", loras_low)):
    if files:
      record[key] = [{"file": os.path.abspath(f), "strength": s} for f, s in files]
  if to == "safetensors":
    _copy_run_files(workdir, tmp, config)
    tensors.save_safetensors(tensors.flat_params(params), tmp, "model",
                             max_shard_bytes=2 ** 62,
                             metadata={"sora_jax_step": str(step), "sora_jax_ema": str(ema)})
  elif to == "orbax-params":
    _copy_run_files(workdir, tmp, config)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(params_dir(tmp), params)
  else:
    _, abstract = abstract_model(config, tokenizer.vocab_size)
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract)
    dit = model.dit
    cfg = dit.cfg
    unlike_wan = (   # (what this model has, what diffusers' Wan transformer has instead)
        (cfg.prediction != "velocity", f"model.prediction={cfg.prediction!r}",
         "outputs a velocity"),
        (cfg.output_head != "linear", f"model.output_head={cfg.output_head!r}",
         "has a linear output layer"),
        (cfg.head_overlap, f"model.head_overlap={cfg.head_overlap}",
         "has patches that only meet"),
        (cfg.camera_channels, "model.camera_control", "has no camera input"),
        (cfg.pooled_text, "model.pooled_text", "has no pooled-text input"),
        (cfg.self_condition, "model.self_condition", "has no self-conditioning input"))
    for differs, option, wan_has in unlike_wan:
      if differs:
        raise ValueError(f"{workdir}: {option}; diffusers' Wan transformer {wan_has}, so "
                         "this model exports with --to=safetensors or orbax-params.")
    if cfg.step_embedding and float(config.sample.shift) != 1.0:
      raise ValueError(f"{workdir}: a few-step student on a shifted grid (sample.shift="
                       f"{float(config.sample.shift):g}); diffusers' FlowMatchEuler scheduler "
                       "cannot space its steps, so it exports to safetensors or orbax-params "
                       "(or distil with distill.shift=1).")
    if cfg.guidance_embedding or cfg.step_embedding:   # a distilled student
      inputs = folded_inputs(config)
      steps = f" and num_inference_steps={config.sample.steps}" if "step_size" in inputs else ""
      record["folded"] = {**inputs, "note": (
          "the student's inputs are fixed into the transformer (diffusers' Wan has none): "
          f"sample with guidance_scale=1{steps}.")}
      dit = folded(dit, **inputs)
    save_wan_transformer(dit, os.path.join(tmp, "transformer"))
    if model.low_noise_dit is not None:
      save_wan_transformer(model.low_noise_dit, os.path.join(tmp, "transformer_2"))
    save_umt5_encoder(model.text_encoder, os.path.join(tmp, "text_encoder"))
    save_t5_tokenizer(wd.tokenizer_path(workdir), os.path.join(tmp, "tokenizer"),
                      int(config.data.text_length))
    conditioned = model.image_encoder is not None or model.dit.cfg.cond_channels
    if config.autoencoder.name == "wan" and not conditioned:   # a whole WanPipeline directory
      save_wan_vae(load_wan_vae(config.autoencoder.path), os.path.join(tmp, "vae"))
      scheduler = save_scheduler(config, os.path.join(tmp, "scheduler"))
      replace = conditioning.enabled(config) and conditioning.scheme(config) == "replace"
      _write_json(os.path.join(tmp, "model_index.json"),
                  wan_model_index(scheduler, model.boundary, expand_timesteps=replace))
    elif conditioned:
      record["note"] = ("transformer(s), text encoder and tokenizer: an image-conditioned "
                        "model exports no WanImageToVideoPipeline (its CLIP encoder is kept up "
                        "to the penultimate layer only); the imported directory has the rest.")
    else:
      record["note"] = ("transformer, text encoder and tokenizer: the run's autoencoder is "
                        f"{config.autoencoder.name!r}, not Wan's, so this is no WanPipeline.")
  return record
