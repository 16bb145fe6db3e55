"""The `sora-jax` console script. Thin: every command calls the library.

  sora-jax train  --config configs/<name>.py[:arg] --workdir DIR [--config.KEY=VALUE ...]
  sora-jax sample --workdir DIR --prompt TEXT --out FILE.mp4|FILE.png [--seed N] [--steps N]
                  [--solver euler|heun|dpmpp_2m] [--cfg-scale S] [--frames T --height H --width W]
                  [--image PATH | --extend VIDEO [--direction D] [--times N] | --loop [VIDEO]
                   | --connect A B | --edit VIDEO --strength S] [--times N] [--context N]
                  [--verbatim] [--given-guidance W] [--cache-threshold E]
                  [--sharded]
                  [--no-sign] [--no-watermark] [--record-prompt]
  sora-jax distill --config configs/<name>.py[:arg] --teacher DIR --workdir DIR
                  [--config.distill.method=shortcut|trajectory|causal|guidance]
                  [--config.KEY=VALUE ...]
  sora-jax calibrate-cache --workdir DIR [--prompts N] [--steps N] [--solver S] [--schedule S]
  sora-jax studio --workdir DIR [--host 127.0.0.1] [--port 7860] [--queue-size N]
  sora-jax verify FILE [--trust-anchors PEM]
  sora-jax detect FILE [FILE ...] [--json]
  sora-jax demo   --config configs/world_tiny.py --workdir DIR [--config.KEY=VALUE ...]
  sora-jax train-vae --config configs/vae_world_tiny.py --workdir DIR [--config.KEY=VALUE ...]
  sora-jax encode-dataset --config configs/world_tiny.py:latent --out DIR [--config.KEY=VALUE ...]
  sora-jax prepare-data --media DIR --out DIR [--captions FILE.csv|FILE.jsonl] [--workers N]
                  [--config configs/<name>.py[:arg] [--config.media.KEY=VALUE ...]]
  sora-jax import-wan --model-dir DIFFUSERS_DIR --out DIR --config configs/wan2_1_t2v.py:1.3B
  sora-jax export --workdir DIR --to diffusers|safetensors|orbax-params --out DIR [--raw]
                  [--step N]
  sora-jax plan   --config configs/<name>.py[:arg] --topology v5p:2x2x2 [--what train|sample|both]
                  [--bound] [--search [--search-axes data,fsdp,...] [--search-remat none,dots,full]]
                  [--json FILE] [--config.KEY=VALUE ...]

Every command answers `--help`. One dialect: argparse options, and config overrides as
`--config.SECTION.KEY=VALUE` (ml_collections). A user error (a missing workdir or file, a
bad value, a foreign checkpoint) ends in one line naming it and exit code 1;
`SORA_JAX_TRACEBACK=1` shows the traceback instead.

The library is imported inside each command, so `--help` and usage errors answer at once
(the one place in the package that defers imports, see tests/test_layers.py).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from sora_jax.cli import commands
from sora_jax.cli.args import CONFIG_EPILOG, parse_with_config  # noqa: F401  (public)

USAGE = __doc__.split("\n\nEvery command")[0]

COMMANDS: dict[str, tuple[Callable[[str, list[str]], None], str]] = {
    "train": (commands.train, "train the text-to-video model (resumes)"),
    "sample": (commands.sample, "generate a video from a run, from text, an image or videos"),
    "distill": (commands.distill, "distil a run into a few-step or one-pass student"),
    "calibrate-cache": (commands.calibrate_cache, "calibrate step caching for a run"),
    "studio": (commands.studio, "serve the web studio for a run (Gradio, localhost)"),
    "verify": (commands.verify, "validate a file's signed C2PA manifest"),
    "detect": (commands.detect, "look for the invisible watermark"),
    "demo": (commands.demo, "train, sample and score the tiny model (make demo)"),
    "train-vae": (commands.train_vae, "train the causal video VAE"),
    "encode-dataset": (commands.encode_dataset, "encode a data source into a latent dataset"),
    "prepare-data": (commands.prepare_data, "a folder of videos and images -> a dataset"),
    "import-wan": (commands.import_wan, "import a diffusers Wan 2.1 T2V directory"),
    "export": (commands.export, "export a run: safetensors, orbax-params, diffusers, lora"),
    "plan": (commands.plan, "compile a config for a TPU slice here: does it fit, at what cost"),
}


def reference_markdown() -> str:
  """The command-line reference (docs/reference/cli.md): every command's `--help`, as
  argparse prints it at 100 columns. `sora-jax reference` prints it."""
  import contextlib, io  # pylint: disable=g-import-not-at-top,multiple-imports
  previous = os.environ.get("COLUMNS")
  os.environ["COLUMNS"] = "100"
  parts = ["# Command-line reference\n",
           "Generated from `sora_jax/cli/` by `sora-jax reference > docs/reference/cli.md`; "
           "a test keeps it current.\n", "```text", USAGE.strip(), "```\n"]
  try:
    for name, (handler, text) in COMMANDS.items():
      out = io.StringIO()
      with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        handler(f"sora-jax {name}", ["--help"])
      parts += [f"## `sora-jax {name}`\n", f"{text[0].upper()}{text[1:]}.\n", "```text",
                out.getvalue().strip(), "```\n"]
  finally:
    if previous is None:
      del os.environ["COLUMNS"]
    else:
      os.environ["COLUMNS"] = previous
  return "\n".join(parts)


def _user_errors() -> tuple[type[BaseException], ...]:
  """What a user's input can cause (bad values, missing or unreadable files, foreign or
  corrupt checkpoints, bad data, a run that diverged): one line, not a traceback."""
  from sora_jax.data.sources import DataError  # pylint: disable=g-import-not-at-top
  from sora_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from sora_jax.train.faults import NumericFault  # pylint: disable=g-import-not-at-top
  return (ValueError, OSError, DataError, CheckpointError, NumericFault)


def compilation_cache_dir(environ: dict[str, str] | None = None) -> str | None:
  """Where the console script keeps compiled programs between processes (JAX's persistent
  compilation cache; programs that took over a second to compile), so that a resumed run, a
  `train(stop_at=...)` slice, a sample or a sweep over the same config reads its programs
  instead of compiling them again: `JAX_COMPILATION_CACHE_DIR` when the environment sets
  it, else `$XDG_CACHE_HOME/sora_jax/jit` (`~/.cache/sora_jax/jit`); None (no cache) when
  `SORA_JAX_COMPILATION_CACHE=0`. Measured on this project's 2-core CPU machine: a 2-step
  `sora-jax train` of `configs/world_tiny.py` 59.0 s without, 52.6 s with an empty cache,
  28.2 s with a warm one (docs/guides/command-line.md)."""
  environ = os.environ if environ is None else environ
  if environ.get("SORA_JAX_COMPILATION_CACHE", "1") == "0":
    return None
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "sora_jax", "jit")


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv if argv is None else argv
  # Before the command imports JAX, which reads its cache directory from the environment
  # (processes the command starts inherit it).
  cache_dir = compilation_cache_dir()
  if cache_dir and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    if "jax" in sys.modules and not sys.modules["jax"].config.jax_compilation_cache_dir:
      sys.modules["jax"].config.update("jax_compilation_cache_dir", cache_dir)
  if len(argv) == 2 and argv[1] == "reference":
    print(reference_markdown(), end="")
    return
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    print("commands:\n" + "\n".join(f"  {name:15s} {text}" for name, (_, text) in COMMANDS.items()))
    print("\n`sora-jax COMMAND --help` lists a command's options.")
    return
  command, args, prog = argv[1], list(argv[2:]), f"sora-jax {argv[1]}"
  if command not in COMMANDS:
    raise SystemExit(f"sora-jax: unknown command {command!r}; commands: "
                     f"{', '.join(COMMANDS)} (sora-jax --help).")
  handler = COMMANDS[command][0]
  try:
    handler(prog, args)
  except Exception as e:  # pylint: disable=broad-except
    if os.environ.get("SORA_JAX_TRACEBACK") or not isinstance(e, _user_errors()):
      raise
    message = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.filename not in message:
      message = f"{e.filename}: {message}"
    raise SystemExit(f"{prog}: {message}") from None
