"""The command line's one dialect: argparse options, and a config file with
`--config.SECTION.KEY=VALUE` overrides read by ml_collections (also how the experiments
read `--config`)."""

from __future__ import annotations

import argparse
import os
from typing import Sequence

CONFIG_EPILOG = ("Config overrides: --config.SECTION.KEY=VALUE for any key of the config "
                 "(e.g. --config.train.steps=100); see docs/reference/config-keys.md.")


def make_parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
  return argparse.ArgumentParser(prog=prog, description=description, **kwargs)


def config_parser(prog: str, description: str, dir_flag: str = "workdir",
                   dir_help: str = "Output directory (a run's checkpoints, logs, samples).",
                   config_required: bool = True) -> argparse.ArgumentParser:
  """A parser of `--config FILE[:ARG] --<dir_flag> DIR [--config.KEY=VALUE ...]`."""
  parser = make_parser(prog, description, epilog=CONFIG_EPILOG)
  parser.add_argument("--config", required=config_required, metavar="FILE[:ARG]",
                      help="Config file, e.g. configs/world_tiny.py or configs/world_tiny.py:test.")
  parser.add_argument(f"--{dir_flag}", required=True, metavar="DIR", help=dir_help)
  return parser


def parse_with_config(parser: argparse.ArgumentParser, args: Sequence[str] | None,
                      lock: bool = True):
  """`(options, config or None)`: argparse options, and the config of `--config` with the
  `--config.KEY=VALUE` (or `--config.KEY VALUE`) overrides applied and checked by
  ml_collections (an unknown key or a value of the wrong type is refused). `lock=False`
  lets the caller add keys (the experiments that derive configs). Also the experiments'
  way of reading `--config`."""
  opts, rest = parser.parse_known_args(args)
  overrides, unknown, i = [], [], 0
  while i < len(rest):
    arg = rest[i]
    if arg.startswith("--config.") and "=" not in arg and i + 1 < len(rest):
      overrides.append(f"{arg}={rest[i + 1]}")
      i += 2
      continue
    (overrides if arg.startswith("--config.") else unknown).append(arg)
    i += 1
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  if opts.config is None:
    if overrides:
      parser.error("--config.KEY overrides need --config FILE.")
    return opts, None
  config_file = opts.config.split(":", 1)[0]
  if not os.path.isfile(config_file):
    parser.error(f"--config {opts.config}: no such file {config_file!r}.")
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = [parser.prog, f"--config={opts.config}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=lock,
                                  sys_argv=argv)
  try:
    values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = (_missing_key(opts.config, overrides) or
               " ".join(str(e.args[0] if e.args else e).replace("\\n", " ").split()).strip("'"))
    if "Error whilst parsing config file" in message:
      # The config file raised; ml_collections re-raised it with its traceback as text:
      # say the config's own error, the first in the chain.
      first = e
      while first.__context__ is not None:
        first = first.__context__
      message = f"--config {opts.config}: {' '.join(str(first).split())}"
    parser.exit(2, f"{parser.prog}: error: {message}\n")
  return opts, values.config


def _missing_key(config_arg: str, overrides: Sequence[str]) -> str | None:
  """The first of `overrides` whose dotted key the config of `--config config_arg` lacks,
  said in one line naming where it stops, the closest key there and the keys there are;
  None when every key exists (the error was another)."""
  import difflib  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  argv = ["config", f"--config={config_arg}"]
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  try:
    values(argv)
  except Exception:  # pylint: disable=broad-except
    return None      # the config itself did not load: that error is the one to say
  for override in overrides:
    path = override.removeprefix("--config.").split("=", 1)[0].split(".")
    node, where = values.config, "the config"
    for depth, part in enumerate(path):
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        break
      if part not in node:
        keys = sorted(node.keys())
        close = difflib.get_close_matches(part, keys, n=1)
        guess = f' (did you mean "{close[0]}"?)' if close else ""
        return (f"--config.{'.'.join(path)}: {where} has no key \"{part}\"{guess}; its keys: "
                f"{', '.join(keys)}.")
      node, where = node[part], ".".join(path[:depth + 1])
  return None


def parse_lora_argument(value: str) -> tuple[str, float]:
  """`FILE[:STRENGTH]` (`--lora`) -> (path, strength); strength 1 when not given."""
  path, sep, strength = value.rpartition(":")
  if sep and path:
    try:
      return path, float(strength)
    except ValueError:
      pass
  return value, 1.0
