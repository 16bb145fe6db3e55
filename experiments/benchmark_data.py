"""Does the input pipeline keep up with training? Decoded clips/s next to consumed clips/s.

  python -m experiments.benchmark_data --config configs/world_tiny.py \
      [--media DIR] [--files 48] [--scale 4] [--workers 0,1,2] [--batches 20] \
      [--out benchmark_data.json] [--config.KEY=VALUE ...]

Without --media, it writes `--files` videos of the procedural world as mp4 (its clips,
upscaled `--scale`x and three clips long, so decoding does real work) with sidecar
captions. Then, in one run:
  1. `prepare-data` on the folder with 1 and with 2 worker processes: files/s, clips/s;
  2. the training input pipeline of the config over the prepared dataset (PNG decoding,
     fitting, tokenising, batching), with each `--workers` count of Grain processes
     (0: threads of this process): clips/s over `--batches` batches after a warm-up;
  3. the config's train step (compiled, synthetic batch): the clips/s it consumes.
The ratio decoded / consumed above 1 means the pipeline is not the bottleneck.
"""

from __future__ import annotations

import argparse
from typing import Sequence
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from sora_jax.cli.args import parse_with_config
from experiments.report import report
from experiments.step_timing import time_sora_jax
from sora_jax import configs
from sora_jax.data import folder
from sora_jax.data.world import render_example
from sora_jax.models.tokenizer import train_tokenizer
from sora_jax.video_io import write_mp4



def write_world_videos(config, directory: str, count: int, scale: int) -> None:
  """`count` world videos of three clips each (one caption per video, as a sidecar)."""
  world = configs.world_config(config)
  os.makedirs(directory, exist_ok=True)
  for i in range(count):
    parts = [render_example(world, 10_000 + 3 * i + k) for k in range(3)]
    video = np.concatenate([p["video"] for p in parts])
    write_mp4(os.path.join(directory, f"world_{i:04d}.mp4"), video, fps=8, scale=scale)
    with open(os.path.join(directory, f"world_{i:04d}.txt"), "w", encoding="utf-8") as f:
      f.write(parts[0]["caption"])


def time_preparation(media_dir: str, settings, workers: int) -> dict[str, float]:
  out = tempfile.mkdtemp(prefix="prepare_")
  start = time.perf_counter()
  report_ = folder.prepare_media(media_dir, out, settings, workers=workers, progress=False)
  seconds = time.perf_counter() - start
  shutil.rmtree(out)
  clips = sum(report_.clips.values())
  return {"files": report_.files, "clips": clips, "seconds": seconds,
          "files_per_s": report_.files / seconds, "clips_per_s": clips / seconds}


def time_pipeline(config, tokenizer, workers: int, batches: int) -> float:
  """Clips/s of the config's training input pipeline with `workers` Grain processes."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.num_workers = workers
  from sora_jax.train.sources import make_dataset, training_source  # pylint: disable=g-import-not-at-top
  dataset, _ = make_dataset(config, training_source(config), tokenizer)
  iterator = iter(dataset)
  for _ in range(3):                       # start-up (worker processes), warm-up
    next(iterator)
  start = time.perf_counter()
  clips = sum(len(next(iterator)["video"]) for _ in range(batches))
  seconds = time.perf_counter() - start
  del iterator
  return clips / seconds


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]", help="Config file; overrides as --config.KEY=VALUE.")
  parser.add_argument("--media", type=str, default=None, help="A folder of videos (default: world videos).")
  parser.add_argument("--files", type=int, default=48, help="World videos to write when --media is not given.")
  parser.add_argument("--scale", type=int, default=4, help="Upscaling of the written world videos.")
  parser.add_argument("--workers", type=lambda v: v.split(","), default=['0', '1', '2'], help="Grain worker processes to time.")
  parser.add_argument("--batches", type=int, default=20, help="Timed batches per pipeline.")
  parser.add_argument("--steps", type=int, default=10, help="Timed train steps.")
  parser.add_argument("--out", type=str, default='benchmark_data.json', help="JSON output path.")
  args, config = parse_with_config(parser, argv, lock=True)
  config = config
  work = tempfile.mkdtemp(prefix="benchmark_data_")
  media_dir = args.media or os.path.join(work, "media")
  if not args.media:
    write_world_videos(config, media_dir, args.files, args.scale)
  settings = configs.media_settings(config)
  rows = []
  for workers in (1, 2):
    r = time_preparation(media_dir, settings, workers)
    rows.append({"stage": f"prepare-data, {workers} process{'es' if workers > 1 else ''}",
                 "clips_per_s": r["clips_per_s"],
                 "detail": f"{r['files_per_s']:.1f} files/s, {r['clips']} clips"})
  prepared = os.path.join(work, "prepared")
  folder.prepare_media(media_dir, prepared, settings, workers=2, progress=False)
  with config.unlocked():
    config.data.media_dir = prepared
  configs.validate(config)
  tokenizer = train_tokenizer(folder.load_media_source(prepared).captions(),
                              os.path.join(work, "tokenizer.model"),
                              config.tokenizer.vocab_size, config.tokenizer.model_type)
  step = time_sora_jax(config, vocab=tokenizer.vocab_size, steps=args.steps)
  consumed = config.data.batch_size / step["step_s"]
  for workers in (int(w) for w in args.workers):
    decoded = time_pipeline(config, tokenizer, workers, args.batches)
    rows.append({"stage": f"input pipeline, {workers} Grain worker{'' if workers == 1 else 's'}",
                 "clips_per_s": decoded, "ratio": decoded / consumed,
                 "detail": "threads of the training process" if workers == 0 else
                           f"{workers} decoding process{'' if workers == 1 else 'es'}"})
  rows.append({"stage": "train step (consumes)", "clips_per_s": consumed, "ratio": 1.0,
               "detail": f"{1e3 * step['step_s']:.1f} ms/step, batch {config.data.batch_size}"})
  report(rows, [
      ("stage", lambda r: r["stage"]),
      ("clips/s", lambda r: f"{r['clips_per_s']:.1f}"),
      ("decoded / consumed", lambda r: f"{r['ratio']:.2f}x" if "ratio" in r else ""),
      ("detail", lambda r: r["detail"]),
  ], args.out, config=configs.to_json(config), devices=jax.device_count(),
      device_kind=jax.devices()[0].device_kind, cpus=os.cpu_count())
  shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
