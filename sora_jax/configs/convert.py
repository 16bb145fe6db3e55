"""ConfigDicts in and out of the schema (`sora_jax.configs.schema`).

  typed(config)       the typed `Config` of a ConfigDict: missing keys take the schema's
                      defaults, an unknown key or a value of the wrong type is refused
                      with a ValueError naming `section.key`
  filled(config)      the ConfigDict with every missing key filled from the schema (for
                      code that still reads ConfigDicts)
  defaults(section)   a section's defaults as a dict, with overrides (for `configs/*.py`)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

import ml_collections

import sora_jax.configs.schema as schema  # the module, not the package (no import cycle)


def _plain(value: Any) -> Any:
  """ConfigDicts and mappings to dicts, lists to tuples, recursively."""
  if isinstance(value, (ml_collections.ConfigDict, Mapping)):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _refuse(key: str, value: Any, expected: str) -> None:
  raise ValueError(f"{key}={value!r}: expected {expected}.")


def _scalar(value: Any, tp: type, key: str) -> Any:
  if tp is bool:
    if not isinstance(value, bool):
      _refuse(key, value, "a bool")
    return value
  if tp is int:
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
      _refuse(key, value, "an int")
    return int(value)
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      _refuse(key, value, "a float")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      _refuse(key, value, "a str")
    return value
  raise TypeError(f"{key}: the schema has an unsupported type {tp!r}.")


def _convert(value: Any, tp: Any, key: str, strict: bool) -> Any:
  """`value` as type `tp` (a dataclass, scalar, tuple, dict, Optional or Any)."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any:
    return _plain(value)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    (inner,) = [a for a in args if a is not type(None)]
    return _convert(value, inner, key, strict)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, (ml_collections.ConfigDict, Mapping)):
      _refuse(key, value, f"a section of keys {[f.name for f in dataclasses.fields(tp)]}")
    return _section(tp, value, key, strict)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      _refuse(key, value, f"a tuple ({_name(tp)})")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(v, args[0], f"{key}[{i}]", strict) for i, v in enumerate(value))
    if len(value) != len(args):
      _refuse(key, value, f"{len(args)} values ({_name(tp)})")
    return tuple(_convert(v, a, f"{key}[{i}]", strict) for i, (v, a) in enumerate(zip(value, args)))
  if origin is dict:
    if not isinstance(value, (ml_collections.ConfigDict, Mapping)):
      _refuse(key, value, f"a mapping ({_name(tp)})")
    return {str(k): _convert(v, args[1], f"{key}.{k}", strict) for k, v in value.items()}
  return _scalar(value, tp, key)


def _name(tp: Any) -> str:
  return str(tp).replace("typing.", "")


def _section(cls: type, values: Mapping[str, Any] | None, prefix: str, strict: bool = True):
  """An instance of the dataclass `cls` from `values`; missing keys take the defaults."""
  values = {} if values is None else values
  hints = schema.field_types(cls)
  unknown = sorted(set(values) - set(hints))
  if unknown and strict:
    known = sorted(hints)
    raise ValueError(f"{prefix}.{unknown[0]}: unknown config key (known keys of {prefix}: "
                     f"{known}).")
  kw = {name: _convert(values[name], hints[name], f"{prefix}.{name}", strict)
        for name in hints if name in values}
  return cls(**kw)


def typed(config: ml_collections.ConfigDict | Mapping[str, Any] | schema.Config,
          strict: bool = True) -> schema.Config:
  """The typed `Config` of `config` (see module docstring); a `Config` is returned as is.
  `strict=False` ignores unknown keys instead (e.g. to compare with an older run's)."""
  if isinstance(config, schema.Config):
    return config
  unknown = sorted(set(config) - {"seed"} - set(schema.SECTIONS))
  if unknown and strict:
    raise ValueError(f"{unknown[0]}: unknown config section (known: "
                     f"{['seed', *schema.SECTIONS]}).")
  kw: dict[str, Any] = {}
  if "seed" in config:
    kw["seed"] = _scalar(config["seed"], int, "seed")
  for name, cls in schema.SECTIONS.items():
    if name in config and config[name] is not None:
      kw[name] = _section(cls, config[name], name, strict)
  return schema.Config(**kw)


def section(config: ml_collections.ConfigDict, name: str) -> Any:
  """The typed section `name` of a ConfigDict (cheaper than `typed` for one section)."""
  return _section(schema.SECTIONS[name], config.get(name), name)


def as_section(name: str, values: Any) -> Any:
  """Section `name` typed from its ConfigDict (or mapping) `values`; a typed section is
  returned as is. E.g. `as_section("optim", config.disc_optim)`."""
  cls = schema.SECTIONS[name]
  return values if isinstance(values, cls) else _section(cls, values, name)


def as_dict(value: Any) -> Any:
  """A typed config (or section) as plain nested dicts and tuples."""
  if dataclasses.is_dataclass(value):
    return {f.name: as_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, dict):
    return {k: as_dict(v) for k, v in value.items()}
  if isinstance(value, tuple):
    return tuple(as_dict(v) for v in value)
  return value


def filled(config: ml_collections.ConfigDict, strict: bool = True) -> ml_collections.ConfigDict:
  """`config` with every key of its sections (missing ones at the schema's defaults), values
  converted to the schema's types; a section it lacks stays absent (a VAE run has no
  `model`, an older run may have no `conditioning`). A new, unlocked ConfigDict."""
  values = as_dict(typed(config, strict))
  return ml_collections.ConfigDict({k: v for k, v in values.items() if k in config})


def defaults(name: str, /, **overrides: Any) -> dict[str, Any]:
  """Section `name`'s schema defaults with `overrides` (an unknown key is refused), as the
  plain dict a config file assigns, e.g. `c.train = configs.defaults("train", steps=900)`."""
  cls = schema.SECTIONS[name]
  base = as_dict(cls())
  unknown = sorted(set(overrides) - set(base))
  if unknown:
    raise ValueError(f"{name}.{unknown[0]}: unknown config key (known keys of {name}: "
                     f"{sorted(base)}).")
  return {**base, **overrides}
