"""Shared fixtures. Eight simulated CPU devices, so sharding tests can build real meshes."""

import atexit
import gc
import os
import shutil
import sys
import tempfile

# The test models are tiny, so compiling dominates their time: XLA:CPU's LLVM backend at
# optimisation level 0 compiles them fastest (level 1 vs the default: 12 s vs 26 s on the
# VAE shape tests; level 0 vs 1: 134 s vs 161 s on tests/models and the train-step tests),
# and without XLA:CPU's newer fusion emitters (the elemental emitter instead) faster still
# (tests/train/test_step.py, tests/models/test_dit.py and test_vae.py on 2 workers:
# 89 s vs 138 s). Other fusion changes float32 summation order, so cross-program
# comparisons (scan vs loop) use float32 tolerances. LLVM's module compiled whole, not
# split into parts for a thread pool two busy workers leave no cores for (the same three
# test files on 2 workers: 72 s vs 83 s). Processes the tests start get the same flags
# (helpers.subprocess_env); the library never sets them.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                  " --xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {TEST_XLA_FLAGS}"
                           + " --xla_force_host_platform_device_count=8").strip()
# CPU only, also where libtpu is installed (the test extra: `sora-jax plan` compiles for
# TPU topologies through it without initialising a TPU backend).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A compilation cache of this run's large programs only, shared by the run's processes
# (the workers and the processes tests start) and removed at its end: programs that took
# over a second to compile (train steps, train-state initialisations, samplers; a few dozen
# a run) are written, so a test that trains or initialises a config another test already
# compiled reads it instead of compiling it again (`train()` builds a new jitted closure
# per run, which the in-memory cache of `jax.jit` cannot match); the ~10,000 smaller
# programs (single eager operations) only pay a cache key. Measured on the trained-run
# tests (test_vae_train, test_checkpoint, test_faults, test_lora, test_c2pa; two workers,
# docs/results/test-suite.md, 2026-12-06): 256 and 241 s with this cache, 311 and 308 s
# without one, 272 s with a 0.3-s threshold; the keys cost nothing measurable
# (tests/models/test_block_causal.py alone: 46.9 and 48.4 s with, 46.7 and 48.4 s without).
# The environment's own cache settings are overridden: tests never write into a user's
# cache.
_CACHE_OWNER = "SORA_JAX_TEST_CACHE_DIR" not in os.environ
if _CACHE_OWNER:   # the first process of the run (pytest's, before its workers start)
  os.environ["SORA_JAX_TEST_CACHE_DIR"] = tempfile.mkdtemp(prefix="sora_jax_test_jit_")
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "true"
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SORA_JAX_TEST_CACHE_DIR"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1.0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# A directory per process (the processes tests start share their worker's), removed at its
# end, for the local C2PA development identity (not the user's ~/.config), gradio's copies
# of the files the studio serves and receives (not the system's /tmp/gradio) and the logs
# of libtpu's compiler (not /tmp/tpu_logs). Removed in pytest's unconfigure (xdist's
# workers leave without running exit handlers) and at exit (processes that import this
# module for its helpers, tests/train/multihost_worker.py, make one too).
_PROCESS_DIR = tempfile.mkdtemp(prefix="sora_jax_test_process_")
atexit.register(shutil.rmtree, _PROCESS_DIR, ignore_errors=True)
for _variable, _name in (("XDG_CONFIG_HOME", "config"), ("GRADIO_TEMP_DIR", "gradio"),
                         ("TPU_LOG_DIR", "tpu_logs")):
  os.environ[_variable] = os.path.join(_PROCESS_DIR, _name)
  os.makedirs(os.environ[_variable])

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import world_native  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import world_tiny  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from sora_jax import configs  # noqa: E402  pylint: disable=g-import-not-at-top
from sora_jax.data.world import load_world_source  # noqa: E402
from sora_jax.models.tokenizer import train_tokenizer  # noqa: E402
from sora_jax.data.sources import source_captions  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def make_test_config(data_dir: str, native: bool = False, **overrides):
  """The tiny test config (`configs/world_tiny.py:test`, or `world_native.py:test` for
  native sizes with packing) with dotted-key overrides."""
  config = (world_native if native else world_tiny).get_config("test")
  config.world.data_dir = data_dir
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def config(data_dir):
  return make_test_config(data_dir)


@pytest.fixture
def system_tmp(tmp_path, monkeypatch):
  """An empty directory under the test's `tmp_path` that stands for the system's temporary
  directory (`tempfile.gettempdir()`) during the test: what libraries leave there (TFDS's
  and gradio_client's empty directories) stays with the test, and can be looked at."""
  import tempfile as tempfile_lib  # pylint: disable=g-import-not-at-top
  directory = tmp_path / "system_tmp"
  directory.mkdir()
  monkeypatch.setattr(tempfile_lib, "tempdir", str(directory))
  return directory

@pytest.fixture(scope="session")
def train_source(data_dir):
  return load_world_source(configs.world_config(make_test_config(data_dir)), "train", data_dir)


@pytest.fixture(scope="session")
def tokenizer(train_source, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  return train_tokenizer(source_captions(train_source), path, vocab_size=64, model_type="word")


@pytest.fixture(scope="session")
def devices():
  assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
  return jax.devices()


@pytest.fixture(scope="session")
def trained_test_vae(data_dir, tmp_path_factory):
  """`(workdir, printed)` of the test VAE (`configs/vae_world_tiny.py:test`, 4 steps, a
  metrics line per step, evaluated), trained once per test process through `sora-jax
  train-vae` (what it printed is `printed`). Tests that use it are in the xdist group
  "vae", so one worker trains it."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from sora_jax.cli import main as cli_main  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("test_vae"))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    cli_main(["sora-jax", "train-vae", "--config", os.path.join(ROOT, "configs",
                                                                "vae_world_tiny.py:test"),
              "--workdir", workdir, f"--config.world.data_dir={data_dir}",
              "--config.train.log_every=1"])
  return workdir, printed.getvalue()


@pytest.fixture(scope="session")
def reference_run(data_dir, tmp_path_factory):
  """`(config, workdir, summary)` of the uninterrupted reference run that resume, fault and
  multi-process tests compare against: the test config, 10 steps, a metrics line per step,
  a checkpoint every 2 steps, all kept. Its tests are in the xdist group "reference", so
  one worker trains it."""
  from sora_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir)
  config.train.update(steps=10, log_every=1, checkpoint_every=2, keep_checkpoints=10)
  workdir = str(tmp_path_factory.mktemp("reference_run"))
  return config, workdir, train(config, workdir, progress=False)


@pytest.fixture(scope="session")
def causal_sampler(data_dir, tokenizer):
  """A block-causal model (the test config, blocks of one temporal patch) with random
  weights (seed 7, scale 0.1: every zero-initialised layer active, so that guidance and
  every input matter), as a `Sampler`."""
  from helpers import random_model  # pylint: disable=g-import-not-at-top
  from sora_jax.sample import Sampler  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, **{"model.causal_frames": 1})
  return Sampler(config, tokenizer, *random_model(config, tokenizer.vocab_size, seed=7,
                                                   scale=0.1))


@pytest.fixture(scope="session")
def causal_export(causal_sampler, tmp_path_factory):
  """The causal model written as a safetensors export (what `sora-jax export` writes): a
  causal run to stream, or a teacher to distil."""
  from helpers import write_export  # pylint: disable=g-import-not-at-top
  return write_export(str(tmp_path_factory.mktemp("causal")), causal_sampler.config,
                      causal_sampler.tokenizer, causal_sampler.params)


def pytest_sessionstart(session):
  """Python's cyclic garbage collector, tuned for a process that holds many long-lived
  objects (imported modules, compiled programs, traced models): what exists now is frozen
  out of its scans, and the youngest generation is collected every 20,000 allocations
  instead of 700. Collections took 16.2 s of 380 s on tests/interop/test_wan_pipeline.py
  and tests/train/test_step.py in one process, 5.1 s with these settings."""
  del session
  gc.collect()
  gc.freeze()
  gc.set_threshold(20_000, 20, 100)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Two things about how `make test` spreads tests over its 2 workers.

  - Modules holding tests marked slow run first (each module's tests stay together, so
    module fixtures are built once): the longest tests start early instead of making a
    tail at the end.
  - `--dist loadgroup` works again: pytest 9.2 keeps a node's id in `_id`, so xdist 3.8's
    group suffix (written to `item._nodeid`) no longer reached its scheduler, and tests
    of one `xdist_group` (e.g. the trained test VAE's) ran on both workers.
  """
  slow_modules = {item.module.__name__ for item in items
                  if item.get_closest_marker("slow") and hasattr(item, "module")}
  items.sort(key=lambda item: getattr(item, "module", None) is None
             or item.module.__name__ not in slow_modules)
  # On a worker, xdist has set `option.loadgroup` (and `dist` to "no").
  if not getattr(config.option, "loadgroup", False) or not items or not hasattr(items[0], "_id"):
    return
  from _pytest.nodeid import coerce_node_id  # pylint: disable=g-import-not-at-top
  for item in items:
    groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                     for m in item.iter_markers("xdist_group")})
    if groups and not item.nodeid.endswith("@" + "_".join(groups)):
      item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(groups)}")  # pylint: disable=protected-access


def pytest_unconfigure(config):
  """The process's own directory goes when it ends, and the run's compilation cache when
  the process that made it does (pytest's own; with xdist, after its workers)."""
  del config
  shutil.rmtree(_PROCESS_DIR, ignore_errors=True)
  if _CACHE_OWNER:
    shutil.rmtree(os.environ["SORA_JAX_TEST_CACHE_DIR"], ignore_errors=True)
