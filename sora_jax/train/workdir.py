"""What a run keeps in its workdir besides checkpoints: its config and its tokenizer.

  <workdir>/config.json       the config the run was started with
  <workdir>/tokenizer.model   the sentencepiece model trained on the captions
  <workdir>/checkpoints/      Orbax checkpoints
  <workdir>/metrics.jsonl, tensorboard/
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import jax
import ml_collections

from sora_jax import configs
from sora_jax.models.tokenizer import Tokenizer, train_tokenizer

# Sections that define the experiment: a workdir holding other values is another experiment.
IDENTITY_KEYS = ("seed", "world", "tokenizer", "text_encoder", "model", "autoencoder", "vae")


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer.model")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = config_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a sora_jax training workdir.")
  with open(path, encoding="utf-8") as f:
    return configs.from_json(f.read())


def _normalise(value: Any) -> Any:
  return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def _identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The identity sections of `config` with the keys it lacks (a run saved before they
  existed) at the schema's defaults, which mean "as before they existed"; keys the schema
  no longer has are kept, so they still compare."""
  full = configs.filled(config, strict=False)
  identity = {k: _normalise({**_plain(config.get(k)), **_plain(full.get(k))})
              if isinstance(config.get(k), ml_collections.ConfigDict)
              else _normalise(config.get(k)) for k in IDENTITY_KEYS}
  if isinstance(identity["world"], dict):
    identity["world"].pop("data_dir", None)   # where the world is cached, not what it is
  return identity


def _plain(value: Any) -> dict[str, Any]:
  return value.to_dict() if hasattr(value, "to_dict") else dict(value or {})


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `config.json`; if the workdir already holds a run, checks it is the same experiment.

  Raises:
    ValueError: naming the keys that differ from the stored run's.
  """
  os.makedirs(workdir, exist_ok=True)
  path = config_path(workdir)
  if os.path.exists(path):
    stored, current = _identity(load_config(workdir)), _identity(config)
    differ = [k for k in IDENTITY_KEYS if stored[k] != current[k]]
    if differ:
      raise ValueError(
          f"workdir {workdir!r} holds another experiment: config keys {differ} differ from its "
          f"config.json. Use a new --workdir, or the same values to resume.")
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(configs.to_json(config))
    os.replace(tmp, path)


def ensure_tokenizer(workdir: str, config: ml_collections.ConfigDict,
                     captions: Iterable[str]) -> Tokenizer:
  """Loads the run's tokenizer, training it on `captions` the first time."""
  path = tokenizer_path(workdir)
  if os.path.exists(path):
    return Tokenizer(path)
  return train_tokenizer(captions, path, vocab_size=config.tokenizer.vocab_size,
                         model_type=config.tokenizer.model_type)
