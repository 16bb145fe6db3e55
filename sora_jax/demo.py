"""The demo: train the tiny model on the procedural world, sample prompts, score colour adherence."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import ml_collections

from sora_jax import configs
from sora_jax.evaluation.colour import colour_score, single_object_prompts
from sora_jax.provenance import credentials, manifest
from sora_jax.provenance.outputs import write_generated
from sora_jax.sample import Sampler
from sora_jax.train.loop import train


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


def run_demo(config: ml_collections.ConfigDict, workdir: str, *, num_videos: int = 8,
             scale: int = 8) -> dict[str, Any]:
  """Trains, samples and scores; writes mp4s and a contact sheet, each watermarked and with
  a signed C2PA manifest (`sora_jax.provenance`; credentials are checked before training),
  and `demo_score.json`."""
  signing = credentials.default_credentials()
  start = time.perf_counter()
  summary = train(config, workdir)
  train_seconds = time.perf_counter() - start
  if summary["preempted"]:
    print(f"Preempted at step {summary['step']}: run the same command again to resume.")
    return {"preempted": True, "steps": summary["step"]}

  start = time.perf_counter()
  sampler = Sampler.from_workdir(workdir)
  result = evaluate_colour(sampler, config.eval.num_samples, config.eval.seed)
  sample_seconds = time.perf_counter() - start

  out_dir = os.path.join(workdir, "samples")
  videos, samples = result.pop("videos"), result["samples"]
  generation = {"seeds": [s["seed"] for s in samples],
                "sampler": dataclasses.asdict(sampler.options())}
  paths = []
  for i in range(min(num_videos, len(videos))):
    paths.append(os.path.join(out_dir, f"sample_{i:02d}.mp4"))
    write_generated(paths[-1], videos[i:i + 1], config=config, step=summary["step"],
                                generation={**generation, "file": i}, signing=signing,
                                fps=8, scale=scale)
  sheet = os.path.join(out_dir, "contact_sheet.png")
  write_generated(sheet, videos, config=config, step=summary["step"],
                  generation={**generation, "file": len(paths)}, signing=signing, scale=2,
                  labels=[f"{s['prompt']} (seed {s['seed']}) -> {s['found']}" for s in samples])
  report = {**result, "final_loss": summary["loss"], "steps": summary["step"],
            "train_seconds": train_seconds, "sample_seconds": sample_seconds,
            "videos": paths, "contact_sheet": sheet}
  with open(os.path.join(workdir, "demo_score.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)

  print(f"\nTrained {summary['step']} steps in {train_seconds:.0f}s (final loss "
        f"{summary['loss']:.4f}); sampled {len(videos)} videos in {sample_seconds:.0f}s.")
  print(f"Colour adherence: {result['score']:.0%} of {len(videos)} one-object prompts show the "
        f"prompted colour as the dominant one.")
  print(f"Videos:        {out_dir}/sample_*.mp4")
  print(f"Contact sheet: {sheet} (row labels in contact_sheet.txt)")
  print(f"Report:        {os.path.join(workdir, 'demo_score.json')}")
  print(f"Provenance:    {len(paths) + 1} C2PA manifests signed by "
        f"{manifest.signed_by(signing)}.")
  return report
