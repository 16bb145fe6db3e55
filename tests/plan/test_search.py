"""The search's candidates: every mesh over the chips, as config overrides."""

import pytest

from sora_jax.plan import planner
from sora_jax.plan.search import candidates, mesh_candidates, overrides, search


def test_meshes_are_every_factorisation_of_the_chips():
  two = mesh_candidates(4, ["data", "fsdp"])
  assert sorted((m["data"], m["fsdp"]) for m in two) == [(1, 4), (2, 2), (4, 1)]
  assert all(m["tensor"] == m["sequence"] == 1 for m in two)
  # 8 = 2^3 over four axes: the ways to place three 2s in four boxes, C(6, 3) = 20.
  every = mesh_candidates(8, ["data", "fsdp", "tensor", "sequence"])
  assert len(every) == 20 and len({tuple(m.values()) for m in every}) == 20


def test_sequence_sharding_runs_ring_attention():
  assert overrides({"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}, "full") == {
      "mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.sequence": 4,
      "model.remat": "full", "model.attention": "ring"}
  assert "model.attention" not in overrides({"data": 8}, "none")


def test_sequence_meshes_try_ring_and_ulysses():
  rows = candidates(4, ["fsdp", "sequence"], ["full"])
  by_sequence = {}
  for row in rows:
    by_sequence.setdefault(row["mesh.sequence"], []).append(row.get("model.attention"))
  assert by_sequence == {1: [None], 2: ["ring", "ulysses"], 4: ["ring", "ulysses"]}


def test_bad_search_settings_are_named():
  with pytest.raises(planner.PlanError, match="--search-axes"):
    search(None, "v5p:2x2x1", axes=["pipeline"])
  with pytest.raises(planner.PlanError, match="--search-remat"):
    search(None, "v5p:2x2x1", remats=["some"])
  with pytest.raises(planner.PlanError, match="--search-microbatches"):
    search(None, "v5p:2x2x1", microbatches=[0])


def test_microbatch_counts_multiply_the_candidates():
  rows = candidates(2, ["data"], ["full", "dots"], microbatches=(1, 4))
  assert [(r["model.remat"], r.get("train.microbatches")) for r in rows] == [
      ("full", None), ("full", 4), ("dots", None), ("dots", 4)]


def test_options_multiply_the_candidates_and_attention_skips_sequence_meshes():
  rows = candidates(2, ["data", "sequence"], ["full"], options={
      "model.splash_block": [512, 1024], "model.scan_layers": [True, False],
      "model.attention": ["splash", "xla"]})
  plain = [(r["model.attention"], r["model.splash_block"], r["model.scan_layers"])
           for r in rows if r["mesh.sequence"] == 1]
  assert sorted(plain) == sorted((a, b, s) for a in ("splash", "xla") for b in (512, 1024)
                                 for s in (True, False))
  split = [(r["model.attention"], r["model.splash_block"], r["model.scan_layers"])
           for r in rows if r["mesh.sequence"] == 2]
  assert sorted(split) == sorted((a, b, s) for a in ("ring", "ulysses") for b in (512, 1024)
                                 for s in (True, False))


def test_a_program_already_compiled_for_the_same_devices_is_not_compiled_again():
  """Candidates that lower to the same program (a splash block clamped to a short
  sequence) compile once: the second plan is a copy under its own name."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  class Counted:     # a lowered program that counts its compiles
    def __init__(self, lowered):
      self.lowered, self.compiles = lowered, 0

    def as_text(self):
      return self.lowered.as_text()

    def compile(self):
      self.compiles += 1
      return self.lowered.compile()

  devices = jax.devices()[:1]
  program = Counted(jax.jit(lambda x: x * 3.0 + 1.0).lower(jnp.ones((4, 5))))
  first = planner.compile_program("a", program, 2 ** 30, devices)
  again = planner.compile_program("b", program, 2 ** 30, devices)
  assert program.compiles == 1 and again.name == "b" and first.name == "a"
  assert again.memory == first.memory and again.memory["total"] > 0 and again.fits
  again.memory["total"] = 0                        # a copy: the remembered plan stays
  assert planner.compile_program("c", program, 2 ** 30, devices).memory == first.memory
  planner.compile_program("d", program, 2 ** 29, devices)     # another HBM: compiled
  planner.compile_program("e", program, 2 ** 30)              # no devices named: compiled
  assert program.compiles == 3
