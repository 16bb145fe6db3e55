"""`sora-jax plan`: the configs compile for real TPU topologies with libtpu's compiler."""

import json
import os

import pytest

from sora_jax import cli
from sora_jax.plan import planner, report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("libtpu", reason="libtpu (the test extra) compiles for TPU topologies")
# One process at a time may load libtpu (its lock file): these tests share one worker.
pytestmark = pytest.mark.xdist_group("libtpu")

# Wan's presets at 2 layers (UMT5 at 2) on a small clip: the plan's every part in ~15 s;
# NARROW_WAN also at width 256 (2 heads of 128, MLP 512), which compiles in under half the
# time of the presets' own widths (the 1.3B's 1536: 18.6 s against 7.8 s for the train and
# sample programs on v5p:2x2x1) with the same program structure.
SMALL_WAN = ["--config.model.depth=2", "--config.text_encoder.depth=2",
             "--config.world.frames=5", "--config.world.height=64", "--config.world.width=64",
             "--config.data.batch_size=4", "--config.data.text_length=32"]
NARROW_WAN = SMALL_WAN + ["--config.model.width=256", "--config.model.heads=2",
                          "--config.model.mlp_hidden=512"]


def _plan(argv, tmp_path, capsys, code=0):
  out = str(tmp_path / "plan.json")
  try:
    cli.main(["sora-jax", "plan", *argv, "--json", out])
    got = 0
  except SystemExit as e:
    got = e.code
  printed = capsys.readouterr().out
  assert got == code, printed
  with open(out, encoding="utf-8") as f:
    return json.load(f), printed


@pytest.mark.slow
def test_a_two_layer_wan_preset_fits_a_v5p_slice(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  result, printed = _plan(["--config", "configs/wan2_1_t2v.py:1.3B", "--topology", "v5p:2x2x1",
                           "--what", "both", *NARROW_WAN], tmp_path, capsys)
  assert result["fits"] and result["chips"] == 4 and result["chip"] == "v5p"
  assert {p["name"] for p in result["programs"]} == {"train_step", "sample_model_call"}
  train = result["programs"][0]["memory_per_chip_bytes"]
  assert 0 < train["parameters"] <= train["argument"] <= train["total"] <= result["hbm_bytes"]
  # The EMA and AdamW's two moments cover the transformer alone (fp32); the frozen UMT5,
  # never read by a step on cached text, stays in host memory in bfloat16 with neither.
  assert train["ema"] == train["parameters"] > 0 and train["host_parameters"] > 0
  assert 2 * train["ema"] <= train["optimizer"] < 2 * train["ema"] + 1024
  assert result["memory_per_chip_bytes"] == max(
      p["memory_per_chip_bytes"]["total"] for p in result["programs"])
  assert result["model_flops_per_step"] > 0
  assert set(result["collectives"]["kinds"]) == {"all-gather", "reduce-scatter", "all-reduce",
                                                 "all-to-all", "collective-permute"}
  assert "fits on v5p:2x2x1" in printed and "Model FLOPs per train step" in printed


@pytest.mark.slow
def test_a_streamed_chunk_keeps_its_kv_cache_split_over_the_sequence_axis(tmp_path, capsys,
                                                                          monkeypatch):
  """`--what stream`: a block-causal Wan shape's chunk after a full KV cache of 4 chunks,
  on 4 chips, with the cache's tokens split 4 ways (ring attention over the sequence
  axis) or whole on each chip (fsdp, rows split: the 2 guidance rows padded to 4)."""
  monkeypatch.chdir(ROOT)
  common = ["--config", "configs/wan2_1_t2v.py:1.3B", "--topology", "v5p:2x2x1", "--what",
            "stream", "--config.model.causal_frames=1", *NARROW_WAN]
  sequence, printed = _plan(common + ["--config.mesh.fsdp=1", "--config.mesh.sequence=4",
                                      "--config.model.attention=ring"], tmp_path, capsys)
  rows_split, _ = _plan(common, tmp_path, capsys)
  # 2 layers, keys and values, 16 tokens a chunk (8x8 latents, 2x2 patches) x 4 chunks,
  # 2 heads of 128, bfloat16.
  whole = 2 * 2 * 64 * 2 * 128 * 2
  for result, rows, parts in ((sequence, 2, 4), (rows_split, 4, 4)):
    (program,) = result["programs"]
    assert program["name"] == "stream_chunk_call" and result["fits"]
    memory = program["memory_per_chip_bytes"]
    assert memory["kv_cache"] == whole * rows // parts + rows * 64 // parts
    assert memory["kv_cache"] <= memory["argument"] <= memory["total"]
  assert "| KV cache (streaming) |" in printed
  with pytest.raises(SystemExit, match="streaming needs a block-causal model"):
    cli.main(["sora-jax", "plan", "--config", "configs/wan2_1_t2v.py:1.3B", "--topology",
              "v5p:2x2x1", "--what", "stream", *NARROW_WAN])


def test_the_step_time_bound_adds_up():
  import world_tiny  # pylint: disable=g-import-not-at-top
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  from sora_jax.plan import bound as bound_lib, topology  # pylint: disable=g-import-not-at-top
  config = configs.filled(world_tiny.get_config("test"))
  devices = topology.topology_devices("v5e:2x2")
  bound = bound_lib.step_time_bound(config, devices, topology.CHIPS["v5e"], 1e9)
  assert bound["per_layer_seconds"] > 0 and bound["outside_seconds"] > 0 and bound["depth"] == 1
  assert bound["seconds"] == pytest.approx(
      bound["outside_seconds"]
      + bound["depth"] * (bound["per_layer_seconds"] + bound["attention_kernel_seconds"]))
  assert bound["mfu_upper_bound"] == pytest.approx(1e9 / 4 / 197e12 / bound["seconds"])
  # splash self- and cross-attention: 3 x 4 N (N + S) W FLOPs per example at the peak
  n, s = planner.tokens_per_example(config), config.data.text_length
  assert bound["attention_kernel_seconds"] == pytest.approx(
      3 * 4 * n * (n + s) * config.model.width * config.data.batch_size / 4 / 197e12)
  plan = {"topology": "v5e:2x2", "chips": 4, "chip": "v5e", "hbm_bytes": 16 * 2 ** 30,
          "fits": True, "mesh": {"data": 4}, "memory_per_chip_bytes": 1, "programs": [],
          "model_flops_per_step": 1e9, "notes": [], "step_time_bound": bound}
  assert "Step-time lower bound: " in report.format_plan(plan)


def test_the_attention_kernels_counted_follow_the_backend():
  """Pairs of tokens per example and layer the bound counts as Pallas kernels: splash's
  self- and cross-attention; a sequence split's cross-attention (per device, splash) and,
  for Ulysses, its self-attention (3 heads over sequence 2 and 4: gathered keys, no
  padding; block-causal, plain Ulysses on heads padded to the sequence axis, 3 -> 4)."""
  import world_tiny  # pylint: disable=g-import-not-at-top
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  from sora_jax.plan.bound import attention_kernel_tokens  # pylint: disable=g-import-not-at-top
  config = configs.filled(world_tiny.get_config("test"))
  n, s = planner.tokens_per_example(config), config.data.text_length

  def pairs(attention, sequence):
    config.model.attention, config.mesh.sequence = attention, sequence
    config.mesh.data = 4 // sequence
    return attention_kernel_tokens(config, 4, heads=3)

  assert pairs("xla", 1) == pairs("ring", 1) == 0
  assert pairs("splash", 1) == pairs("auto", 1) == n * (n + s)
  assert pairs("ring", 2) == n * s
  assert pairs("ulysses", 2) == pairs("ulysses", 4) == n * n + n * s
  config.model.causal_frames = 1
  assert pairs("ulysses", 2) == pytest.approx(n * n * 4 / 3 + n * s)
  assert pairs("ulysses", 4) == pytest.approx(n * n * 4 / 3 + n * s)


def test_the_bound_is_of_the_train_step(capsys, monkeypatch):
  """`--bound` through the command line: with `--what sample` there is no train step."""
  monkeypatch.chdir(ROOT)
  with pytest.raises(SystemExit, match="sora-jax plan: --bound: the step-time bound is of "
                                       "the train step"):
    cli.main(["sora-jax", "plan", "--config", "configs/world_tiny.py:test", "--topology",
              "v5e:2x2", "--what", "sample", "--bound"])


@pytest.mark.slow
def test_an_oversized_config_does_not_fit(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  result, printed = _plan(["--config", "configs/wan2_1_t2v.py:14B", "--topology", "v5e:2x2",
                           *SMALL_WAN, "--config.model.depth=12"], tmp_path, capsys, code=3)
  assert not result["fits"] and result["programs"][0]["largest_buffers"]
  assert printed.splitlines()[-1].startswith("does not fit on v5e:2x2: train_step needs ")


@pytest.mark.slow
def test_packed_native_sizes_fit_a_v6e_slice_and_the_search_ranks_the_meshes(
    tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  result, printed = _plan(["--config", "configs/world_native.py:test", "--topology", "v6e:2x2",
                           "--search", "--search-axes", "data", "--search-remat", "none",
                           "--search-microbatches", "2", "--search-splash-blocks", "128,512"],
                          tmp_path, capsys)
  tried = [(r["overrides"]["mesh.data"], r["overrides"]["model.remat"],
            r["overrides"]["train.microbatches"], r["overrides"]["model.splash_block"])
           for r in result["search"]]
  assert sorted(tried) == [(4, "none", 2, 128), (4, "none", 2, 512)]
  ranked = [r for r in result["search"] if r["fits"]]
  assert len(ranked) == 2 and [r["rank"] for r in ranked] == [1, 2]
  assert [r["collective_bytes"] for r in ranked] == sorted(r["collective_bytes"] for r in ranked)
  assert all(0 < r["memory_per_chip_bytes"] < 32 * 2 ** 30 for r in ranked)
  best = " ".join(f"--config.{k}={v}" for k, v in ranked[0]["overrides"].items())
  assert printed.splitlines()[-1] == f"Best: {best}"
  with pytest.raises(SystemExit, match="--search-scan='maybe': expected values such as"):
    cli.main(["sora-jax", "plan", "--config", "configs/world_native.py:test", "--topology",
              "v6e:2x2", "--search", "--search-scan", "maybe"])


# The configs whose docstrings name a TPU target and no other test compiles (world_native:
# the search test below; wan2_1_t2v: the test above; world_tiny: the step-time bound's
# test, whose two-layer probe is its test size's train step on v5e:2x2), at their test
# size or, for Wan 2.2, at 2 layers on a small clip, with the train step's attention as
# splash under shard_map.
@pytest.mark.parametrize("config,topology,extra", [
    ("world_long.py:test-causal", "v5e:2x2", []),
    ("world_camera.py:test", "v5e:2x2", []),
    ("wan2_2.py:ti2v-5B", "v5p:2x2x1", NARROW_WAN),
])
def test_every_config_compiles_for_its_tpu_target(config, topology, extra, tmp_path, capsys,
                                                  monkeypatch):
  monkeypatch.chdir(ROOT)
  result, printed = _plan(["--config", f"configs/{config}", "--topology", topology,
                           "--what", "train", *extra], tmp_path, capsys)
  assert result["fits"] and result["programs"][0]["error"] is None, printed
  assert result["programs"][0]["memory_per_chip_bytes"]["total"] > 0
  assert f"fits on {topology}" in printed


def test_unknown_topologies_are_named():
  with pytest.raises(planner.PlanError, match="v9x:2x2"):
    planner.plan(None, "v9x:2x2")   # noqa  (refused before the config is read)


def test_libtpu_held_by_another_process_is_one_line(monkeypatch):
  """libtpu's refusal when another process holds its lock file (a training run on a machine
  without a TPU loads it unless JAX_PLATFORMS=cpu) names the way out."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from sora_jax.plan import topology  # pylint: disable=g-import-not-at-top

  def held(**_):
    raise RuntimeError("ABORTED: Internal error when accessing libtpu multi-process lockfile. "
                       'Run "$ sudo rm /tmp/libtpu_lockfile".')
  monkeypatch.setattr(topologies, "get_topology_desc", held)
  with pytest.raises(planner.PlanError, match="another process has loaded libtpu .*"
                     "ALLOW_MULTIPLE_LIBTPU_LOAD=1"):
    topology.topology_devices("v5e:2x2")


def test_budgets_are_per_device():
  """A v4 topology lists each chip's two TensorCores as devices: a plan's budget is one
  device's half of the chip (the compiler refuses a v4 program over 15.25 GiB); chips
  that are one device keep their whole HBM and peak."""
  from sora_jax.plan.topology import GiB, chip_of  # pylint: disable=g-import-not-at-top
  v4, v5p = chip_of("v4:2x2x1"), chip_of("v5p:2x2x2")
  assert (v4.hbm_bytes, v4.peak_bf16_flops) == (16 * GiB, 137.5e12)
  assert (v5p.hbm_bytes, v5p.peak_bf16_flops) == (95 * GiB, 459e12)


def test_verdict_names_what_is_needed_and_the_largest_buffers():
  error = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (16.93G) exceeds available HBM (15.75G).")
  plan = {"topology": "v5e:2x2", "hbm_bytes": 16 * 2 ** 30, "fits": False,
          "programs": [{"name": "train_step", "fits": False, "memory_per_chip_bytes": {},
                        "error": error,
                        "largest_buffers": [{"name": "params.dit.blocks.mlp.fc1.kernel",
                                             "bytes": 2 ** 30}]}]}
  assert report.verdict(plan) == (
      "does not fit on v5e:2x2: train_step needs 16.93G of 15.75G (compiler); largest "
      "buffers: params.dit.blocks.mlp.fc1.kernel 1.00 GiB")


def test_an_itemised_refusal_splits_data_from_fragmentation():
  """A cap just under the need makes libtpu itemise the heap (abridged from the Wan 1.3B
  step refused at 44,312 MiB, docs/results/tpu-plans.md): the verdict and the plan's JSON
  say how much of the temporaries is data and how much fragmentation."""
  error = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. "
           "Ran out of memory in memory space hbm. Used 43.31G of 43.27G hbm. Exceeded hbm "
           "capacity by 41.27M.\nTotal hbm usage >= 43.57G:\n    reserved        263.00M \n"
           "    program          42.30G \n    arguments         1.01G \n\nProgram hbm "
           "requirement 42.30G:\n    global            1.12M\n    scoped            4.50M\n"
           "    HLO temp         42.25G (100.0% utilization: Unpadded (39.12G) Padded "
           "(39.12G), 7.4% fragmentation (3.13G))\n    overlays         44.50M\n")
  heap = report.heap_breakdown(error)
  assert heap == {"used": round(43.31 * 2 ** 30), "available": round(43.27 * 2 ** 30),
                  "temporaries": round(42.25 * 2 ** 30), "data": round(39.12 * 2 ** 30),
                  "fragmentation": round(3.13 * 2 ** 30)}
  assert report.heap_breakdown("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total "
                               "memory required for HLO temporaries (43.08G) exceeds "
                               "available HBM (19.53G).") is None
  plan = {"topology": "v5p:2x2x2", "hbm_bytes": 95 * 2 ** 30, "fits": False,
          "programs": [{"name": "train_step", "fits": False, "memory_per_chip_bytes": {},
                        "error": error, "largest_buffers": []}]}
  assert report.verdict(plan) == (
      "does not fit on v5p:2x2x2: train_step needs 43.31G of 43.27G (compiler), its "
      "temporaries 39.12 GiB of data and 3.13 GiB of fragmentation; largest buffers: ")


def test_without_weights_assumes_the_named_wan_vae():
  """No `autoencoder.path`: the planner assumes the published VAE of
  `autoencoder.wan_version` (Wan 2.2's for the TI2V-5B preset: 4x16x16 to 48 channels)."""
  import wan2_2  # pylint: disable=g-import-not-at-top
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  config, notes = planner.without_weights(wan2_2.get_config("ti2v-5B"))
  assert notes == ["autoencoder: Wan 2.2's VAE architecture (autoencoder.path not set)"]
  assert configs.latent_shape_of(config.autoencoder, 121, 704, 1280) == (31, 44, 80, 48)
  # One directory per version and process (removed at exit), not one per plan.
  again, _ = planner.without_weights(wan2_2.get_config("ti2v-5B"))
  assert again.autoencoder.path == config.autoencoder.path
  assert os.listdir(config.autoencoder.path) == ["config.json"]
  config.autoencoder.update(path="", wan_version="3.0")
  with pytest.raises(planner.PlanError, match="autoencoder.wan_version='3.0'"):
    planner.without_weights(config)
