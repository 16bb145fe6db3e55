"""The demo: train the tiny model on the procedural world, then judge it with ShapesBench.

`run_demo` trains `config` from scratch, samples the world's held-out prompts (one and two
objects, every shape, direction and speed of the world), scores them with ShapesBench
beside the held-out clips of the same prompts (`sora_jax.evaluation.shapes_bench`), and
writes what a person can look at: mp4s, a contact sheet and an animated grid of
generated | ground truth, each watermarked and signed. `evaluate_colour` is the older
one-number check (the dominant colour of one-object prompts) that experiments use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from sora_jax import configs, video_io
from sora_jax.data.world import WorldConfig
from sora_jax.evaluation import bench
from sora_jax.evaluation.colour import colour_score, single_object_prompts
from sora_jax.evaluation.shapes_bench import run_bench
from sora_jax.provenance import credentials, manifest
from sora_jax.provenance.outputs import write_generated
from sora_jax.sample import Sampler
from sora_jax.train.loop import train
from sora_jax.train.sources import encode_dataset

# ShapesBench columns of the demo's report: adherence, then failures (lower is better).
REPORTED = ("count", "shape", "colour", "direction", "hallucinated_frames", "appear_vanish",
            "physics")
GRID_PROMPTS = 16    # prompts in the animated grid (4 x 4 pairs)


def evaluate_colour(sampler: Sampler, num_samples: int, seed: int,
                    size: tuple[int, int, int] | None = None) -> dict[str, Any]:
  """Samples `num_samples` one-object prompts (at `size = (frames, height, width)`, the
  world's size by default) and scores their dominant colour.

  Returns:
    `{"score", "num_samples", "samples": [{prompt, seed, expected, found}], "videos"}`.
  """
  world = configs.world_config(sampler.config)
  prompts = single_object_prompts(world, num_samples, seed)
  seeds = [seed + i for i in range(num_samples)]
  frames, height, width = size or (None, None, None)
  videos = sampler.generate([p.text for p in prompts], seeds, frames=frames, height=height,
                            width=width)
  score, found = colour_score(videos, [p.colour for p in prompts], world)
  samples = [{"prompt": p.text, "seed": s, "expected": p.colour, "found": f}
             for p, s, f in zip(prompts, seeds, found)]
  return {"score": score, "num_samples": num_samples, "samples": samples, "videos": videos}


def prompt_coverage(prompts: list[list[bench.PromptObject]], world: WorldConfig
                    ) -> dict[str, list]:
  """What the demo's prompts cover (`run_bench`'s "prompts"): the object counts, and the
  world's shapes, directions and speeds that some prompted object has (in world order)."""
  objects = [o for prompt in prompts for o in prompt]
  named = lambda values, attribute: [v for v in values
                                     if any(getattr(o, attribute) == v for o in objects)]
  return {"shapes": named(world.shapes, "shape"),
          "directions": named(world.directions, "direction"),
          "speeds": named([name for name, _ in world.speeds], "speed"),
          "objects": sorted({len(prompt) for prompt in prompts})}


def report_table(model: dict, truth: dict) -> str:
  """The demo's ShapesBench table (markdown): the model beside the ground-truth clips."""
  head = "| videos | " + " | ".join(REPORTED) + " |"
  rule = "| --- " * (len(REPORTED) + 1) + "|"
  row = lambda name, summary: f"| {name} | " + " | ".join(
      "-" if summary[k] is None else f"{summary[k]:.3f}" for k in REPORTED) + " |"
  return "\n".join([head, rule, row("generated", model), row("ground truth", truth)])


def with_encoded_latents(config: ml_collections.ConfigDict, workdir: str
                         ) -> ml_collections.ConfigDict:
  """A latent model's config with `data.latents_dir` set: when unset, `<workdir>/latents`,
  written there once from the config's data and VAE (`encode_dataset`; a rerun reuses it),
  so that training reads latents instead of encoding every batch. Pixel configs and
  configs that name their latents come back unchanged."""
  if config.autoencoder.name == "identity" or config.data.latents_dir:
    return config
  config = config.copy_and_resolve_references()
  config.data.latents_dir = os.path.join(workdir, "latents")
  start = time.perf_counter()
  encode_dataset(config, config.data.latents_dir)
  print(f"Latents of the training clips in {config.data.latents_dir} "
        f"({time.perf_counter() - start:.0f}s).")
  return config


def run_demo(config: ml_collections.ConfigDict, workdir: str, *, num_videos: int = 8,
             scale: int = 8) -> dict[str, Any]:
  """Trains, samples the held-out prompts and scores them with ShapesBench.

  Writes to `workdir`: `samples/sample_*.mp4` (the first `num_videos` generated videos),
  `samples/side_by_side.png` (a contact sheet: each row a prompt's generated frames, a
  white frame, then its ground truth), `samples/side_by_side.mp4` (an animated grid of
  generated | ground truth pairs), each watermarked and with a signed C2PA manifest
  (credentials are checked before training), and `demo_score.json` / `demo_report.md`
  (every video's metrics, the summaries, what the prompts cover, the timings). A latent
  model's training clips are encoded first (`with_encoded_latents`; in the training time).
  `config.eval.num_samples` prompts are sampled once each from `config.eval.seed`.
  """
  signing = credentials.default_credentials()
  start = time.perf_counter()
  config = with_encoded_latents(config, workdir)
  summary = train(config, workdir)
  train_seconds = time.perf_counter() - start
  if summary["preempted"]:
    print(f"Preempted at step {summary['step']}: run the same command again to resume.")
    return {"preempted": True, "steps": summary["step"]}

  start = time.perf_counter()
  sampler = Sampler.from_workdir(workdir)
  result = run_bench(sampler, int(config.eval.num_samples), 1, int(config.eval.seed))
  sample_seconds = time.perf_counter() - start
  videos, truth = result["videos"], np.asarray(result["truth_videos"])
  rows, captions = result["rows"], result["captions"]

  out_dir = os.path.join(workdir, "samples")
  generation = {"seeds": [r["seed"] for r in rows],
                "sampler": dataclasses.asdict(sampler.options())}
  write = lambda path, frames, file, **kw: write_generated(
      path, frames, config=config, step=summary["step"], signing=signing,
      generation={**generation, "file": file}, **kw)
  paths = []
  for i in range(min(num_videos, len(videos))):
    paths.append(os.path.join(out_dir, f"sample_{i:02d}.mp4"))
    write(paths[-1], videos[i:i + 1], i, fps=8, scale=scale)
  pairs = video_io.side_by_side(videos, truth)                     # [N, T, H, 2W + 2, 3]
  white = np.full_like(videos[:, :1], 255)
  sheet = os.path.join(out_dir, "side_by_side.png")
  write(sheet, np.concatenate([videos, white, truth], axis=1), len(paths), scale=2,
        labels=[f"{r['prompt']} (seed {r['seed']}): generated | ground truth; count "
                f"{r['count']}, shape {r['shape']}, direction {r['direction']}" for r in rows])
  grid = os.path.join(out_dir, "side_by_side.mp4")
  write(grid, video_io.video_grid(pairs[:GRID_PROMPTS], columns=4)[None], len(paths) + 1,
        fps=4, scale=4)

  model, ground_truth = result["model"], result["ground_truth"]
  table = report_table(model, ground_truth)
  coverage = prompt_coverage(result["prompts"], configs.world_config(config))
  report = {"model": model, "ground_truth": ground_truth, "score": bench.score(model),
            "by_objects": result["by_objects"], "shape_confusion": result["shape_confusion"],
            "prompts": len(captions),
            "coverage": coverage, "videos_metrics": rows, "ground_truth_metrics":
            result["truth_rows"], "final_loss": summary["loss"], "steps": summary["step"],
            "train_seconds": train_seconds, "sample_seconds": sample_seconds,
            "videos": paths, "contact_sheet": sheet, "grid": grid}
  with open(os.path.join(workdir, "demo_score.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  shapes = ("Shapes as ShapesBench reads them:\n\n"
            + bench.confusion_table(result["shape_confusion"]))
  with open(os.path.join(workdir, "demo_report.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n\n" + shapes + "\n")

  print(f"\nTrained {summary['step']} steps in {train_seconds:.0f}s (final loss "
        f"{summary['loss']:.4f}); sampled and scored {len(videos)} held-out prompts in "
        f"{sample_seconds:.0f}s ({', '.join(map(str, coverage['objects']))} objects; shapes "
        f"{', '.join(coverage['shapes'])}; directions {', '.join(coverage['directions'])}; "
        f"speeds {', '.join(coverage['speeds'])}).\n")
  print(table)
  print("\n" + shapes)
  print(f"\nVideos:        {out_dir}/sample_*.mp4")
  print(f"Side by side:  {sheet} (row labels in side_by_side.txt), {grid}")
  print(f"Report:        {os.path.join(workdir, 'demo_score.json')}, demo_report.md")
  print(f"Provenance:    {len(paths) + 2} C2PA manifests signed by "
        f"{manifest.signed_by(signing)}.")
  return report
