"""sora_jax's Wan 2.1 train step side by side with MaxDiffusion's: both compiled ahead of
time for the same TPU slice by the same libtpu on this (CPU) machine, in one run.

  python -m experiments.aot_vs_maxdiffusion --maxdiffusion PATH [--topology v5p:2x2x2] \
      [--remat dots,full] [--size 1.3B] [--bound] [--out aot_vs_maxdiffusion.json] \
      [--config.KEY=VALUE ...]

PATH: a checkout of github.com/AI-Hypercomputer/maxdiffusion (its source is read from
there, never copied here; it needs `pip install jaxopt aqtp --no-deps`, see
experiments/maxdiffusion_wan.py). Same work on both sides: Wan 2.1 of `--size` at
480x832x81 (21x60x104 latents, 32,760 tokens per sample), one sample per chip, text states
`[B, 512, 4096]` given (cached), bfloat16 compute, every chip on fsdp, splash attention,
the same jax remat policy (sora_jax `model.remat` -> MaxDiffusion `remat_policy`: dots ->
MATMUL_WITHOUT_BATCH, full -> FULL, none -> NONE, dots_offload ->
OFFLOAD_MATMUL_WITHOUT_BATCH).

Rows per policy: MaxDiffusion (bfloat16 weights and AdamW moments, no EMA, no text encoder
on the chips); sora_jax's preset as shipped (`configs/wan2_1_t2v.py:SIZE`: float32
weights and moments, an EMA of the transformer, the frozen UMT5 in bfloat16 and, since
the step reads cached text states, in host memory), with `--config.` overrides applied;
and the same with MaxDiffusion's state (`optim.param_dtype=bfloat16`,
`optim.ema_decay=0`: bfloat16 weights and moments, no EMA). Columns:
per-chip memory (the state's parts, temporaries, total against HBM), collective bytes per
chip per step (`sora_jax.plan.collectives` on both compiled programs), what stays in host
memory instead (offloaded activations, frozen parameters the step never reads), compile
time; with `--bound`, each side's step-time lower bound by one method
(`sora_jax.plan.bound`: the compiler's cost model of the step with 1 and 2 unrolled layers,
plus the splash kernels at the chip's peak), its ratio to MaxDiffusion's and the MFU upper
bound it implies. Each side compiles in a process of its own (libtpu
loads in one process at a time; MaxDiffusion's stand-in modules stay in its process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Sequence

from experiments.report import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30
TOKENS_PER_SAMPLE = 21 * 30 * 52       # 480x832x81 -> 21x60x104 latents, patches 1x2x2
TEXT_TOKENS = 512
SIDES = ("maxdiffusion", "sora_jax", "sora_jax_matched")
LABELS = {"maxdiffusion": "MaxDiffusion", "sora_jax": "sora_jax (preset)",
          "sora_jax_matched": "sora_jax (MaxDiffusion's state)"}
# MaxDiffusion's state in sora_jax's terms: bfloat16 weights and AdamW moments, no EMA.
MATCHED = {"optim.param_dtype": "bfloat16", "optim.ema_decay": 0.0}


def sora_jax_side(topology: str, remat: str, size: str, overrides: Sequence[str],
                  matched: bool, bound: bool = False) -> dict[str, Any]:
  """`sora-jax plan` of the Wan preset's train step (its `programs[0]`, and the plan);
  with `bound`, its step-time bound (`sora_jax.plan.bound`)."""
  from sora_jax.cli.args import parse_with_config  # pylint: disable=g-import-not-at-top
  from sora_jax.plan import planner, topology as topology_lib  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="aot_vs_maxdiffusion")
  parser.add_argument("--config")
  _, config = parse_with_config(parser, [
      "--config", os.path.join(ROOT, "configs", f"wan2_1_t2v.py:{size}"), *overrides])
  flat = {"model.remat": remat, "mesh.data": 1, "mesh.fsdp": -1,
          "data.batch_size": len(topology_lib.topology_devices(topology))}   # one per chip
  if matched:
    flat.update(MATCHED)
  config.update_from_flattened_dict(flat)
  plan = planner.plan(config, topology, "train")
  train = plan["programs"][0]
  out = {"memory_per_chip_bytes": train["memory_per_chip_bytes"], "error": train["error"],
         "collectives": train["collectives"], "compile_seconds": train["compile_seconds"],
         "hbm_bytes": plan["hbm_bytes"], "overrides": flat,
         "model_flops_per_step": plan["model_flops_per_step"], "chips": plan["chips"]}
  if bound:
    from sora_jax.plan import bound as bound_lib  # pylint: disable=g-import-not-at-top
    out["bound"] = bound_lib.add_step_time_bound(plan, config)["step_time_bound"]
  return out


def maxdiffusion_side(source: str, topology: str, remat: str, size: str,
                      bound: bool = False) -> dict[str, Any]:
  """MaxDiffusion's train step compiled as `sora-jax plan` compiles sora_jax's; with
  `bound`, its step-time bound's parts by the same method: the cost model of its step with
  1 and 2 unrolled layers, and its splash kernels (self-attention and, with its
  `flash_min_seq_length: 0`, cross-attention to the 512 text tokens) at the chip's peak.
  The MFU needs the model FLOPs, which `main` takes from sora_jax's side (the same model)."""
  from experiments import maxdiffusion_wan  # pylint: disable=g-import-not-at-top
  from sora_jax.plan import bound as bound_lib, planner  # pylint: disable=g-import-not-at-top
  lowered, info = maxdiffusion_wan.lower_train_step(source, topology, remat, size=size)
  hbm_bytes = planner.chip_of(topology).hbm_bytes
  train = planner.compile_program("train_step", lowered, hbm_bytes)
  train.memory.update(parameters=info.pop("parameters"), optimizer=info.pop("optimizer"))
  out = {"memory_per_chip_bytes": train.memory, "error": train.error,
         "collectives": train.collectives, "compile_seconds": train.compile_seconds,
         "hbm_bytes": hbm_bytes, **info}
  if bound:
    one, two = (bound_lib.optimal_seconds(maxdiffusion_wan.lower_train_step(
        source, topology, remat, size=size, num_layers=n)[0]) for n in (1, 2))
    dims = maxdiffusion_wan.DIMS[size]
    tokens = TOKENS_PER_SAMPLE
    width = dims["num_attention_heads"] * dims["attention_head_dim"]
    attention = bound_lib.kernel_seconds(tokens * (tokens + TEXT_TOKENS), width, 1,
                                         planner.chip_of(topology))
    out["bound_parts"] = {"one": one, "two": two, "depth": dims["num_layers"],
                          "attention": attention}
  return out


def run_side(side: str, args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, Any]:
  """One side's compile in a process of its own; its result, or its one-line failure."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "side.json")
    command = [sys.executable, "-m", "experiments.aot_vs_maxdiffusion", "--side", side,
               "--result", out, "--topology", args.topology, "--remat", args.remat_one,
               "--size", args.size, "--maxdiffusion", args.maxdiffusion or "",
               *(["--bound"] if args.bound else []), *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode or not os.path.isfile(out):
      lines = [l for l in done.stderr.splitlines() if l.strip()]
      raise SystemExit(f"{LABELS[side]} ({args.remat_one}): {lines[-1] if lines else 'failed'}")
    with open(out, encoding="utf-8") as f:
      return json.load(f)


def row(side: str, remat: str, result: dict[str, Any],
        reference: dict[str, Any] | None) -> dict[str, Any]:
  from sora_jax.plan.report import heap_breakdown, needed_bytes  # pylint: disable=g-import-not-at-top
  memory = result["memory_per_chip_bytes"]
  total = memory.get("total")
  theirs = reference and reference["memory_per_chip_bytes"].get("total")
  bound = result.get("bound") or {}
  their_bound = (reference or {}).get("bound") or {}
  return {"side": LABELS[side], "remat": remat, "memory_per_chip_bytes": memory,
          "step_time_bound": bound or None,
          "bound_ratio_to_maxdiffusion": (bound["seconds"] / their_bound["seconds"]
                                          if bound and their_bound else None),
          "total": total, "fits": bool(total) and total <= result["hbm_bytes"],
          "needs": needed_bytes(result["error"]) if result.get("error") else "",
          "heap_at_refusal": heap_breakdown(result["error"]) if result.get("error") else None,
          "ratio_to_maxdiffusion": total / theirs if total and theirs else None,
          "collective_bytes": (result.get("collectives") or {}).get("total_bytes"),
          "compile_seconds": result.get("compile_seconds"),
          "extra": {k: v for k, v in result.items()
                    if k in ("commit", "stubs", "overrides", "mesh", "remat_policy")}}


def _gib(n) -> str:
  return f"{n / GiB:.2f}" if n is not None else ""


COLUMNS = [
    ("side", lambda r: r["side"]), ("remat", lambda r: r["remat"]),
    ("parameters GiB", lambda r: _gib(r["memory_per_chip_bytes"].get("parameters"))),
    ("optimiser GiB", lambda r: _gib(r["memory_per_chip_bytes"].get("optimizer"))),
    ("EMA GiB", lambda r: _gib(r["memory_per_chip_bytes"].get("ema", 0))),
    ("temporaries GiB", lambda r: _gib(r["memory_per_chip_bytes"].get("temporary"))),
    ("total GiB", lambda r: _gib(r["total"]) if r["total"] else f"needs {r['needs']}"),
    ("÷ MaxDiffusion", lambda r: f"{r['ratio_to_maxdiffusion']:.3f}"
     if r["ratio_to_maxdiffusion"] else ""),
    ("refused: data / fragmentation GiB", lambda r: (
        f"{_gib(r['heap_at_refusal']['data'])} / {_gib(r['heap_at_refusal']['fragmentation'])}"
        if r.get("heap_at_refusal") else "")),
    ("collectives GiB", lambda r: _gib(r["collective_bytes"])),
    ("in host memory GiB", lambda r: _gib(r["memory_per_chip_bytes"].get("host_offloaded", 0)
                                          + r["memory_per_chip_bytes"].get("host_parameters", 0))),
    ("compile s", lambda r: f"{r['compile_seconds']:.1f}" if r["compile_seconds"] else ""),
    ("step-time bound s", lambda r: f"{r['step_time_bound']['seconds']:.3f}"
     if r["step_time_bound"] else "not measured"),
    ("bound ÷ MaxDiffusion", lambda r: f"{r['bound_ratio_to_maxdiffusion']:.3f}"
     if r["bound_ratio_to_maxdiffusion"] else ""),
    ("MFU ≤", lambda r: f"{r['step_time_bound']['mfu_upper_bound']:.1%}"
     if r["step_time_bound"] else ""),
]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--maxdiffusion", metavar="PATH",
                      help="A checkout of MaxDiffusion's source (required).")
  parser.add_argument("--topology", default="v5p:2x2x2", help="TPU slice (default v5p:2x2x2).")
  parser.add_argument("--remat", default="dots,full",
                      help="sora_jax remat policies, comma-separated (default dots,full).")
  parser.add_argument("--size", default="1.3B", choices=("1.3B", "14B"))
  parser.add_argument("--out", default="aot_vs_maxdiffusion.json", help="JSON output path.")
  parser.add_argument("--bound", action="store_true",
                      help="Also the step-time lower bound of each side (sora_jax.plan.bound: "
                           "two more compiles per side, of 1 and 2 unrolled layers).")
  parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)     # a worker process
  parser.add_argument("--result", help=argparse.SUPPRESS)
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.") or "=" not in o]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides: --config.KEY=VALUE)")
  from experiments import maxdiffusion_wan  # pylint: disable=g-import-not-at-top
  remats = args.remat.split(",")
  unknown = sorted(set(remats) - set(maxdiffusion_wan.REMAT))
  if unknown:
    parser.error(f"--remat {unknown}: expected some of {sorted(maxdiffusion_wan.REMAT)}.")
  if not args.maxdiffusion:
    parser.error("--maxdiffusion PATH (a checkout of MaxDiffusion's source) is required.")
  if not os.path.isfile(os.path.join(args.maxdiffusion, "src", "maxdiffusion", "trainers",
                                     "wan_trainer.py")):
    parser.error(f"--maxdiffusion {args.maxdiffusion}: not a MaxDiffusion checkout (no "
                 f"src/maxdiffusion/trainers/wan_trainer.py).")
  if args.side:                                                             # worker
    if args.side == "maxdiffusion":
      result = maxdiffusion_side(args.maxdiffusion, args.topology, args.remat, args.size,
                                 bound=args.bound)
    else:
      result = sora_jax_side(args.topology, args.remat, args.size, overrides,
                             matched=args.side == "sora_jax_matched", bound=args.bound)
    with open(args.result, "w", encoding="utf-8") as f:
      json.dump(result, f)
    return
  rows = []
  for remat in remats:
    args.remat_one = remat
    theirs = run_side("maxdiffusion", args, overrides)
    ours = {side: run_side(side, args, overrides) for side in SIDES[1:]}
    if args.bound:    # MaxDiffusion's MFU from the same model's FLOPs (sora_jax's count)
      from sora_jax.plan import bound as bound_lib, planner  # pylint: disable=g-import-not-at-top
      parts, preset = theirs.pop("bound_parts"), ours["sora_jax"]
      theirs["bound"] = bound_lib.combine(
          parts["one"], parts["two"], parts["depth"], parts["attention"],
          preset["model_flops_per_step"] / preset["chips"], planner.chip_of(args.topology),
          bound_lib.METHOD)
    rows.append(row("maxdiffusion", remat, theirs, None))
    for side in SIDES[1:]:
      rows.append(row(side, remat, ours[side], theirs))
      print(f"{rows[-1]['side']} ({remat}) compiled", file=sys.stderr)
  commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
  report(rows, COLUMNS, args.out, topology=args.topology, size=args.size,
         maxdiffusion_commit=rows[0]["extra"].get("commit"), sora_jax_commit=commit,
         command=" ".join(["python -m experiments.aot_vs_maxdiffusion", *(argv or sys.argv[1:])]))


if __name__ == "__main__":
  main()
