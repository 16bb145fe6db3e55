"""Distilling a trained run into a faster sampler (`sora-jax distill`), flat like
`train.loop`: the student's config (the teacher's architecture plus a step-size or
guidance input) -> mesh -> data -> the teacher (frozen, sharded by the student's rules,
no optimiser state) -> the student's state (the teacher's weights, the new input's MLP at
zero: it starts as the teacher) or resume -> jitted step -> the shared loop
(`sora_jax.train.runner`: checkpoints, resume, faults and metrics as in training).

Methods (`distill.method`, the math in `sora_jax.diffusion.distillation`):
  shortcut: a few-step student with the teacher's guidance (`distill.cfg_scale`) folded
            in; it samples with `distill.steps` uniform Euler steps, one pass each.
  trajectory: the same student, each of its `distill.steps` steps trained on the
            teacher's guided ODE over that step, from the student's own rollouts.
  causal:   a block-causal trajectory student, one block of latent frames at a time after
            a clean past: streaming's few-step chunks (`sora-jax sample --stream`). Of a
            block-causal teacher (`model.causal_frames`; the past the data's, or with
            `distill.past=student` the student's own earlier blocks: Self-Forcing's
            rollouts), or of a bidirectional one with `distill.causal_frames` (the
            student's blocks; CausVid's route: the causal student starts from the
            bidirectional weights, the mask changed).
  `train.init_from` starts the student from an earlier student of the same teacher
  architecture (a stage of several: the ODE stage, then rollouts of its own past).
  dmd:      a `distill.steps`-step student trained by distribution matching on its own
            samples, beside a critic (the teacher's copy, `model.critic`) that learns their
            score; block-causal for a block-causal teacher or with `distill.causal_frames`
            (its whole clip its own streamed rollout: Self-Forcing; CausVid's second stage
            from a causal ODE-stage student, `train.init_from`). The critic trains with the
            student and is dropped on restore (`sample`, `export`).
  guidance: CFG distillation; the guidance scale becomes an input, one pass per step with
            any solver and step count.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from flax import nnx
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from sora_jax import configs
from sora_jax.data.sources import DataStats
from sora_jax.diffusion.distillation import STEP_METHODS
from sora_jax.models.lora import merge_trees
from sora_jax.parallel.sharding import make_mesh
from sora_jax.train import optim, workdir as wd
from sora_jax.train.autoencoders import make_autoencoder
from sora_jax.train.distill_step import make_distill_step
from sora_jax.train.restore import initial_params, without_adapters, without_critic
from sora_jax.train.runner import open_checkpointer, resume_or_start, run_steps
from sora_jax.train.sources import run_data
from sora_jax.train.step import null_text_states
from sora_jax.train.state import (abstract_model, abstract_train_state, create_train_state,
                                  initial_model_params, model_shardings,
                                  train_state_shardings)

# Sections that define the model: a student takes them from its teacher.
ARCHITECTURE = ("model", "text_encoder", "image_encoder", "autoencoder", "tokenizer",
                "conditioning")
# Model keys that do not change the parameters, which the distill config may set.
RUNTIME_MODEL_KEYS = ("attention", "remat")


def student_config(config: ml_collections.ConfigDict, teacher: str) -> ml_collections.ConfigDict:
  """The student's config: `config` (data, optimiser, training, mesh, `distill.*`) with
  the teacher's architecture (its `ARCHITECTURE` sections; `model.attention` and
  `model.remat` stay `config`'s), the input of `distill.method`, the text and image
  encoders frozen (they are the teacher's), `distill.cfg_scale` the teacher's
  `sample.cfg_scale` unless given, and, for a few-step student, sampling
  defaults of `distill.steps` Euler steps on its grid (uniform at `distill.shift`: 1 for
  a shortcut student) and the folded guidance."""
  if not os.path.isfile(wd.config_path(teacher)):
    raise ValueError(f"--teacher {teacher!r}: no run or export there (no config.json).")
  teacher_config = configs.filled(wd.load_config(teacher))
  if configs.typed(teacher_config).lora.rank:   # its adapters are folded in on restore
    teacher_config = without_adapters(teacher_config)
  tt = configs.typed(teacher_config)
  if tt.model.guidance_embedding or tt.model.step_embedding:
    raise ValueError(f"--teacher {teacher!r} is itself a distilled student; distil its teacher.")
  if tt.model.boundary:
    raise ValueError(f"--teacher {teacher!r} has two experts (Wan 2.2 A14B): distilling it is "
                     "not supported; distil a model with one transformer.")
  c = copy.deepcopy(configs.filled(config))
  t = configs.typed(c)
  if t.distill.method == "causal" and not (tt.model.causal_frames or t.distill.causal_frames):
    raise ValueError(f"distill.method='causal': --teacher {teacher!r} is bidirectional; give "
                     "the student's causal block (--config.distill.causal_frames=N) or use "
                     "shortcut or trajectory.")
  if tt.model.causal_frames and t.distill.causal_frames:
    raise ValueError(f"distill.causal_frames={t.distill.causal_frames}: --teacher {teacher!r} "
                     f"is block-causal (model.causal_frames={tt.model.causal_frames}) and its "
                     "student keeps its blocks; set distill.causal_frames=0.")
  if t.lora.rank:
    raise ValueError("lora.rank: a student trains its weights; set lora.rank=0 to distil.")
  if t.data.grouping == "pack":
    raise ValueError("data.grouping='pack': distillation reads whole clips; use 'none' or "
                     "'bucket'.")
  with c.unlocked():
    for name in ARCHITECTURE:
      if name in teacher_config:
        runtime = {k: c.model[k] for k in RUNTIME_MODEL_KEYS} if name == "model" else {}
        c[name] = copy.deepcopy(teacher_config[name])
        c[name].update(runtime)
    if t.distill.causal_frames:          # a causal student of a bidirectional teacher
      c.model.causal_frames = t.distill.causal_frames
    c.model.critic = t.distill.method == "dmd"     # its score of the student's samples
    shortcut = t.distill.method in STEP_METHODS      # a few-step student
    c.model.step_embedding = shortcut
    c.model.guidance_embedding = not shortcut
    encoders = ("text_encoder",) + (("image_encoder",) if tt.image_encoder.width else ())
    c.optim.frozen = tuple(dict.fromkeys(tuple(t.optim.frozen) + encoders))
    c.distill.teacher = os.path.abspath(teacher)
    if not t.distill.cfg_scale:          # the guidance the teacher samples with
      c.distill.cfg_scale = tt.sample.cfg_scale
    if t.distill.method in ("trajectory", "causal", "dmd") and not t.distill.shift:
      c.distill.shift = tt.sample.shift        # the teacher's own grid
    if shortcut:
      c.sample.update(steps=t.distill.steps, solver="euler", schedule="uniform",
                      shift=float(c.distill.shift),
                      cfg_scale=float(c.distill.cfg_scale), cache_threshold=0.0)
  return c


def distill(config: ml_collections.ConfigDict, workdir: str, *, teacher: str = "",
            progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
  """Distils the run or export `teacher` (default `distill.teacher`) into a student in
  `workdir` (an existing one resumes), for `config.train.steps` steps.

  Args:
    config: a training config with a `distill` section (e.g. `configs/world_tiny.py`);
      its architecture sections are replaced by the teacher's (`student_config`).
    workdir: the student's run directory (sample, export and calibrate-cache read it).
    teacher: a training workdir or an export (`sora-jax export`, `import-wan`).
    progress, stop_at: as `train.loop.train`'s.

  Returns:
    `{"step", "loss", "history", "preempted", "skipped_steps", "data", "method"}`, as
    `train.loop.train`'s plus the method.
  """
  teacher = teacher or configs.typed(config).distill.teacher
  if not teacher:
    raise ValueError("distill: no teacher; give --teacher WORKDIR (or distill.teacher).")
  config = student_config(config, teacher)
  configs.validate(config)
  config = configs.filled(config)
  t = configs.typed(config)
  wd.save_config(workdir, config)

  mesh = make_mesh(configs.mesh_shape(config))
  rules = configs.sharding_rules(config)
  tokenizer, dataset, _ = run_data(config, workdir, tokenizer_from=teacher, mesh=mesh)
  null_ids, null_mask = tokenizer.encode([""], t.data.text_length)
  iterator = iter(dataset)

  # The student (the train state) and the teacher, both sharded by the student's rules.
  tx = optim.for_run(config)
  vocab = tokenizer.vocab_size
  graphdef, abstract = abstract_model(config, vocab)
  shardings = train_state_shardings(config, vocab, mesh, tx, abstract=abstract)
  teacher_dit_graph, teacher_params = load_teacher(teacher, config, vocab, mesh)

  checkpointer = open_checkpointer(workdir, t.train)
  state, _ = resume_or_start(
      checkpointer, iterator, what="the distillation",
      start=lambda: initial_student(config, vocab, mesh, tx, teacher_params,
                                    model=(graphdef, abstract), shardings=shardings),
      target=lambda: abstract_train_state(shardings, config, vocab, tx, abstract=abstract))
  teacher_dit = teacher_params["dit"]     # the encoders are the student's (frozen, equal)
  teacher_params = None                   # their copies freed
  # Cached text: the frozen encoder's states of the empty caption, computed once (the
  # encoder may be kept in host memory, `state.host_groups`), as training does.
  null_text = (null_text_states(config, graphdef, state["params"], null_ids[0], null_mask[0])
               if t.data.latents_dir and t.data.cache_text else None)
  step_fn = make_distill_step(config, graphdef, teacher_dit_graph, teacher_dit, tx, shardings,
                              mesh, make_autoencoder(config.autoencoder), null_ids[0],
                              null_mask[0], null_text=null_text)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  data_stats = DataStats(t.data.max_skipped_fraction)
  result = run_steps(state, iterator, step_fn, mesh=mesh, rules=rules,
                     checkpointer=checkpointer, workdir=workdir, train=t.train,
                     data_stats=data_stats,
                     end=t.train.steps if stop_at is None else min(stop_at, t.train.steps),
                     desc=f"distill {t.distill.method} ({num_params / 1e6:.2f}M params)",
                     progress=progress)
  return {"step": int(result.state["step"]), "loss": result.loss, "history": result.history,
          "preempted": result.preempted, "skipped_steps": result.skipped_steps,
          "data": data_stats.summary(), "method": t.distill.method}


def load_teacher(teacher: str, config: ml_collections.ConfigDict, vocab_size: int,
                 mesh: Mesh) -> tuple[nnx.GraphDef, Any]:
  """`(transformer graph, parameters)` of the teacher of the student `config`: all its
  parameters (checked against the student's architecture), sharded by the student's
  rules; its transformer's graph definition."""
  teacher_config = teacher_model_config(config)
  graphdef, abstract = abstract_model(teacher_config, vocab_size)
  params = initial_params(teacher, teacher_config, vocab_size, mesh, abstract=abstract)
  return nnx.split(nnx.merge(graphdef, abstract).dit, nnx.Param)[0], params


def initial_student(config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh,
                    tx: optax.GradientTransformation, teacher_params: Any, *,
                    model: tuple[nnx.GraphDef, Any], shardings: Any) -> Any:
  """The student's first train state: the teacher's parameters, and the new input's MLP
  at its initialisation (its output layer at zero: the student starts as the teacher);
  with `train.init_from`, the parameters of that student instead (a run of this command
  with the same teacher architecture, e.g. the ODE stage before `distill.past=student`).
  A DMD student's critic (`model.critic`) starts as the teacher's transformer.
  `model`, `shardings`: the student's `abstract_model` and `train_state_shardings`."""
  t = configs.typed(config)
  out = model_shardings(config, mesh, model[1])
  if t.train.init_from:       # a student (DMD's critic, new here, is the teacher's copy)
    student = without_critic(config)
    abstract = model[1] if student is config else abstract_model(student, vocab_size)[1]
    params = initial_params(t.train.init_from, student, vocab_size, mesh, abstract=abstract)
  else:
    params = jax.jit(lambda key, teacher: merge_trees(
        initial_model_params(config, vocab_size, key), teacher),
        out_shardings=out)(jax.random.PRNGKey(t.seed), teacher_params)
  if t.model.critic:          # a copy of the teacher's transformer (new buffers)
    params = jax.jit(lambda p, dit: {**p, "critic": jax.tree.map(lambda x: x * 1, dit)},
                     out_shardings=out)(params, teacher_params["dit"])
  return create_train_state(config, vocab_size, mesh, tx, params, model=model,
                            shardings=shardings)[1]


def teacher_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The teacher's model config of a student's `config`: without the student's inputs
  (and bidirectional where the student's blocks are its own, `distill.causal_frames`)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.guidance_embedding = config.model.step_embedding = False
    config.model.critic = False
    if configs.typed(config).distill.causal_frames:
      config.model.causal_frames = 0
  return config
