"""ShapesBench on one sampler: the world's held-out prompts sampled, scored and set beside
their ground truth.

Prompts are the captions of the first `num_prompts` clips of the world's held-out split
(their ground truth gives the prompted colour, shape and direction of every object). For
each prompt `run_bench` samples `samples_per_prompt` videos and scores them with
`bench.video_metrics`; the held-out clips themselves are scored the same way in the same
run, as the ceiling the trackers allow. Results are also split by object count and by
what a clip tests (attribute combinations held out of training, occlusions, wall bounces).
Used by `sora_jax.demo` and the experiments (`experiments/shapes_bench.py` and those that
compare checkpoints on it).
"""

from __future__ import annotations

import time

import numpy as np

from sora_jax.data.captions import caption_text
from sora_jax.data.world import WorldConfig, load_world_source
from sora_jax.evaluation import bench


def held_out_clips(world: WorldConfig, data_dir: str | None, count: int,
                   ) -> tuple[list[dict], list[str], list[list[bench.PromptObject]]]:
  """The first `count` clips of the world's held-out split (made under `data_dir` if
  missing): `(examples, captions, prompts)`, each example a record (`video [T, H, W, 3]`
  uint8, `caption`, the objects' tracks), its caption's text and its prompted objects."""
  source = load_world_source(world, "test", data_dir)
  examples = [source[i] for i in range(min(count, len(source)))]
  return (examples, [caption_text(e["caption"]) for e in examples],
          [bench.prompt_objects(e, world) for e in examples])


def run_bench(sampler, num_prompts: int, samples_per_prompt: int, seed: int,
              steps: int | None = None, world_section=None, **options) -> dict:
  """Samples and scores the held-out prompts (module docstring) with one sampler.

  `sampler`: a `sora_jax.sample.Sampler` (its `config` and `generate` are what is used).

  `world_section`: a config's `world` whose held-out split and `holdout` to use instead
  of the sampler's run's (models compared on the same prompts). `options`: sampling
  options (`SamplingOptions` fields) for `Sampler.generate`.

  Returns `{"videos" [N, T, H, W, 3], "rows" (per video), "truth_videos" (the held-out
  clips, `[P, T, H, W, 3]` when they share a size, else a list), "truth_rows", "model" and
  "ground_truth" (summaries), "by_objects" (summary per object count),
  "shape_confusion" (`bench.shape_confusion` of the samples), "captions",
  "prompts" (each caption's `bench.PromptObject`s), "sample_seconds"}`.
  """
  section = sampler.config.world if world_section is None else world_section
  world = WorldConfig.from_dict(dict(section))
  examples, captions, prompts = held_out_clips(world, section.get("data_dir") or None,
                                               num_prompts)
  start = time.perf_counter()
  texts = [c for c in captions for _ in range(samples_per_prompt)]
  seeds = [seed + i for i in range(len(texts))]
  videos = sampler.generate(texts, seeds, **({"steps": steps} if steps else {}), **options)
  sample_s = time.perf_counter() - start
  rows = [{"prompt": texts[i], "seed": seeds[i],
           **bench.video_metrics(video, prompts[i // samples_per_prompt], world)}
          for i, video in enumerate(videos)]
  truth_rows = [{"prompt": c, **bench.video_metrics(e["video"], p, world)}
                for c, p, e in zip(captions, prompts, examples)]
  objects_of = [len(prompts[i // samples_per_prompt]) for i in range(len(rows))]
  by_objects = {n: bench.summarise([r for r, k in zip(rows, objects_of) if k == n])
                for n in sorted(set(objects_of))}
  kinds = [bench.categories(e, world) for e in examples]
  by_category = {}
  for name in ("held_out", "occlusion", "bounce"):
    for flag in (True, False):
      chosen = [r for i, r in enumerate(rows) if kinds[i // samples_per_prompt][name] == flag]
      if chosen:
        label = {("held_out", True): "held-out combinations",
                 ("held_out", False): "in-distribution combinations",
                 ("occlusion", True): "with an occlusion", ("occlusion", False): None,
                 ("bounce", True): "with a wall bounce", ("bounce", False): None}[(name, flag)]
        if label:
          by_category[label] = {**bench.summarise(chosen), "videos": len(chosen)}
  truth_videos = [e["video"] for e in examples]
  if len({v.shape for v in truth_videos}) == 1:
    truth_videos = np.stack(truth_videos)
  return {"videos": videos, "rows": rows, "truth_videos": truth_videos, "truth_rows": truth_rows,
          "model": bench.summarise(rows), "ground_truth": bench.summarise(truth_rows),
          "by_objects": by_objects, "by_category": by_category,
          "shape_confusion": bench.shape_confusion(rows), "captions": captions,
          "prompts": prompts, "sample_seconds": sample_s}
