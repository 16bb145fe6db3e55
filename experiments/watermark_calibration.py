"""The watermark detector's scores on clips that carry no watermark: where to set the threshold.

  python -m experiments.watermark_calibration --workdir runs/demo_cond [--clips 150]
      [--out watermark_calibration.json]

Null clips from the train split, disjoint from `provenance_bench`'s held-out clips and
its classifier clips: `--clips` unwatermarked samples of the run (seeds 30000...) and as
many real clips (train-split seeds 5000... past the classifier's), written as
`sora-jax sample` writes them and decoded back, then put through every attack of
`provenance.attacks.ATTACKS`. Prints per attack the 99th percentile and the maximum of
the detector's score, and the threshold for about 1% false positives per attack (the
largest 99th percentile, rounded up to 0.1); writes every score as JSON.
`WatermarkConfig.threshold` is set from this.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Sequence

import numpy as np

from experiments.provenance_bench import attack_and_detect, attack_pool, through_file, world_clips
from sora_jax.provenance import attacks, watermark
from sora_jax.sample import Sampler

SAMPLE_SEED = 30_000
REAL_OFFSET = 5_000


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="A trained run (sora-jax train/demo).")
  parser.add_argument("--clips", type=int, default=150, help="null clips of each kind")
  parser.add_argument("--scale", type=int, default=8, help="upscaling of the written files")
  parser.add_argument("--steps", type=int, default=None, help="sampling steps (run default)")
  parser.add_argument("--workers", type=int, default=2,
                      help="processes for the attacks (1: this process)")
  parser.add_argument("--out", default="watermark_calibration.json")
  args = parser.parse_args(argv)

  sampler = Sampler.from_workdir(args.workdir)
  real, captions = world_clips(sampler.config, "train", args.clips, offset=REAL_OFFSET)
  options = {} if args.steps is None else {"steps": args.steps}
  generated = sampler.generate(captions, list(range(SAMPLE_SEED, SAMPLE_SEED + args.clips)),
                               **options)
  path = args.out + ".mp4"
  null = [through_file(v, path, args.scale) for v in np.concatenate([generated, real])]
  scores = {}
  with attack_pool(args.workers) as pool:
    for name in attacks.ATTACKS:
      found = pool.map(attack_and_detect, [(name, v) for v in null], chunksize=4)
      scores[name] = np.array([score for score, _ in found])
      print(f"{name:>11}: 99th percentile {np.quantile(scores[name], 0.99):.2f}, "
            f"max {scores[name].max():.2f}", flush=True)
  worst = max(float(np.quantile(s, 0.99)) for s in scores.values())
  threshold = math.ceil(worst * 10) / 10
  pooled = np.concatenate(list(scores.values()))
  print(f"threshold for <= 1% false positives per attack: {threshold:.1f} (null max "
        f"{pooled.max():.2f} over {len(pooled)} detections)")
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"workdir": args.workdir, "step": sampler.step, "clips": len(null),
               "threshold": threshold, "scheme": watermark.SCHEME,
               "percentile_99": {k: float(np.quantile(v, 0.99)) for k, v in scores.items()},
               "max": {k: float(v.max()) for k, v in scores.items()},
               "scores": {k: np.round(v, 3).tolist() for k, v in scores.items()}}, f, indent=1)


if __name__ == "__main__":
  main()
