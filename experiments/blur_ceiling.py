"""How sharp must a sample be for ShapesBench to read its shapes? Held-out world clips
blurred by a Gaussian of sigma pixels, scored; and the edge softness of trained runs'
samples placed on the same scale.

  python -m experiments.blur_ceiling --config configs/world_tiny.py \
      [--sigmas 0.5,0.75,1,1.25,1.5,2] [--clips 200] [--workdir RUN ...] [--prompts 40] \
      [--cfg-scale G] [--out docs/results/demo/blur_ceiling.json]

Each frame of the world's first `--clips` held-out clips is blurred spatially (a Gaussian
of standard deviation sigma pixels, `scipy.ndimage.gaussian_filter`, the frame's edge
pixels repeated), rounded back to uint8 and scored by ShapesBench's trackers like a
sample: the shape column as a function of sigma is what an otherwise perfect model whose
edges are that soft can score.

Edge softness (`edge_softness`) is a model-free reading of how soft a video's objects'
edges are: each pixel's share `a` of its prompted object colours over the world's
background (`((p - b) . (c - b)) / |c - b|^2`, clipped to [0, 1], the largest over the
prompt's colours), and the ratio of transition pixels (0.15 < a < 0.85) to object pixels
(a >= 0.5). A hard-edged clip has none; the ratio grows with blur. For each `--workdir`
(a trained pixel-space run; its own world and held-out prompts, the demo's seeds), the
samples' mean softness is mapped onto the ground truth's softness at each sigma of its
world: the blur that makes the held-out clips as soft as the run's samples.

Each row also gives, per prompted shape, medians of what the shape classifier reads (the
share of its bounding box an object fills, its centroid's height in the box) and of two
readings that a blur leaves unchanged (`shape_moments`: cumulants of the object's colour
share; squareness 2 for a square and 1 for a circle, vertical skew about -1.7 for the
world's triangles and 0 for the others); `shape_features` has them, the objects' areas and
10th and 90th percentiles in the JSON. Softly drawn shapes stay apart in the blur-free
readings where the classifier's thresholds (tuned on hard edges) read them all as circles;
shapes drawn alike do not. The last column tests it: the one-sided Mann-Whitney p-value
that the prompted squares (each object's median squareness) are squarer than the circles.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np
from scipy import ndimage, stats

from experiments.report import markdown_table, report
from sora_jax import configs
from sora_jax.cli.args import parse_with_config
from sora_jax.data.world import PALETTE, WorldConfig
from sora_jax.demo import REPORTED
from sora_jax.evaluation import bench
from sora_jax.evaluation.shapes_bench import held_out_clips

MOMENT_MARGIN = 3       # pixels around a detection's box that `shape_moments` reads
MOMENT_FLOOR = 0.1      # colour shares below it (noise, a neighbour's blend) read as 0


def blurred(videos: np.ndarray, sigma: float) -> np.ndarray:
  """uint8 `videos [N, T, H, W, C]` with every frame blurred by a Gaussian of `sigma` px."""
  if sigma <= 0:
    return videos
  out = ndimage.gaussian_filter(videos.astype(np.float32), sigma=(0, 0, sigma, sigma, 0),
                                mode="nearest")
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def colour_share(pixels: np.ndarray, colour: str, world: WorldConfig) -> np.ndarray:
  """Each pixel's share of the palette's `colour` over the world's background, in [0, 1]:
  uint8 `pixels [..., 3]` -> `[...]` (the projection onto the line between the two)."""
  background = np.asarray(world.background, np.float64)
  direction = np.asarray(PALETTE[colour], np.float64) - background
  return np.clip((pixels.astype(np.float64) - background) @ direction
                 / (direction @ direction), 0.0, 1.0)


def edge_softness(video: np.ndarray, prompt: Sequence[bench.PromptObject],
                  world: WorldConfig, band: tuple[float, float] = (0.15, 0.85)) -> float:
  """Transition pixels per object pixel of uint8 `video [T, H, W, 3]` (module docstring):
  0 for hard edges, growing with their width."""
  share = np.max([colour_share(video, c, world) for c in {o.colour for o in prompt}], axis=0)
  transition = np.count_nonzero((share > band[0]) & (share < band[1]))
  return transition / max(np.count_nonzero(share >= 0.5), 1)


def equivalent_sigma(softness: float, sigmas: Sequence[float],
                     curve: Sequence[float]) -> float | None:
  """The sigma at which the ground truth's softness `curve` (increasing with `sigmas`)
  reaches `softness`, linearly between measured sigmas; None beyond the largest."""
  if softness > curve[-1]:
    return None
  return float(np.interp(softness, curve, sigmas))


def shape_moments(share: np.ndarray) -> tuple[float, float]:
  """`(squareness, vertical skew)` of an object's colour share `[h, w]` around it, read as
  a distribution of mass over the pixel centres: squareness is the fourth cumulants along
  the axes over those along the diagonals, `(k4(x) + k4(y)) / (k4(d1) + k4(d2))` (2 for an
  axis-aligned square, 1 for a disc), vertical skew the third cumulant of the height over
  the mass to the power 1.5, times 100 (about -1.7 for the world's up-pointing triangles,
  0 for symmetric shapes). Blurring adds a Gaussian's cumulants, which are zero beyond the
  second, and keeps the mass: both numbers are unchanged by a blur of the share itself."""
  ys, xs = np.mgrid[:share.shape[0], :share.shape[1]] + 0.5
  mass = share.sum()
  weights = share / mass

  def cumulants(u):                                   # (k2, k3, k4) of u under the weights
    centred = u - (weights * u).sum()
    m2, m3, m4 = ((weights * centred ** k).sum() for k in (2, 3, 4))
    return m2, m3, m4 - 3 * m2 ** 2

  k4 = [cumulants(u)[2] for u in (xs, ys, (xs + ys) / np.sqrt(2), (xs - ys) / np.sqrt(2))]
  return float((k4[0] + k4[1]) / (k4[2] + k4[3])), float(100 * cumulants(ys)[1] / mass ** 1.5)


def shape_features(videos: np.ndarray, prompts, world: WorldConfig) -> dict[str, dict]:
  """Per prompted shape, the 10th, 50th and 90th percentiles of what the shape classifier
  reads (`evaluation.objects.classify_shape`: the share of its bounding box a detection
  fills, its centroid's height in the box), of the detections' areas in pixels, and of
  `shape_moments` of the object's colour share in its box widened by `MOMENT_MARGIN`
  pixels (shares under `MOMENT_FLOOR` set to 0), over the frames where each prompted
  object's track (its colour's longest) is seen apart from other objects."""
  found: dict[str, list[tuple[float, ...]]] = {}
  per_object: dict[str, list[float]] = {}
  for video, prompt in zip(videos, prompts):
    _, _, _, main = bench.prompted_tracks(video, prompt, world)
    for obj, track in zip(prompt, main):
      rows = []
      for frame, d in enumerate(track.detections if track is not None else []):
        if d is None or d.touching:
          continue
        y0, x0, y1, x1 = d.bbox
        share = colour_share(video[frame, max(y0 - MOMENT_MARGIN, 0):y1 + MOMENT_MARGIN,
                                   max(x0 - MOMENT_MARGIN, 0):x1 + MOMENT_MARGIN],
                             obj.colour, world)
        rows.append((d.area / ((y1 - y0) * (x1 - x0)), (d.y - y0) / (y1 - y0), d.area,
                     *shape_moments(np.where(share < MOMENT_FLOOR, 0.0, share))))
      if rows:
        found.setdefault(obj.shape, []).extend(rows)
        per_object.setdefault(obj.shape, []).append(float(np.median([r[3] for r in rows])))
  percentiles = lambda a: [float(v) for v in np.percentile(a, [10, 50, 90])]  # noqa: E731
  return {shape: {"detections": len(rows),
                  **{key: percentiles(np.asarray(rows)[:, i]) for i, key in enumerate(
                      ("fill", "centroid_height", "area", "squareness", "vertical_skew"))},
                  "object_squareness": per_object[shape]}
          for shape, rows in sorted(found.items())}


def squares_squarer(features: dict[str, dict]) -> float | None:
  """One-sided Mann-Whitney p-value that the prompted squares are squarer than the prompted
  circles (`shape_features`' per-object median squareness; None without both): small when
  a model draws squares apart from circles however softly, about 0.5 or more when it
  draws them alike."""
  if "square" not in features or "circle" not in features:
    return None
  return float(stats.mannwhitneyu(features["square"]["object_squareness"],
                                  features["circle"]["object_squareness"],
                                  alternative="greater").pvalue)


def score(name: str, videos: np.ndarray, prompts, world: WorldConfig,
          rows: Sequence[dict] | None = None) -> dict:
  """ShapesBench's reported columns, the shape confusion and the mean edge softness.
  `rows`: the videos' `bench.video_metrics` when already computed (`run_bench`'s)."""
  if rows is None:
    rows = [bench.video_metrics(v, p, world) for v, p in zip(videos, prompts)]
  summary = bench.summarise(rows)
  confusion = bench.shape_confusion(rows)
  return {"videos": name, **{k: summary[k] for k in REPORTED},
          "read_as_prompted": {s: f"{c.get(s, 0)}/{sum(n for k, n in c.items() if k != 'unread')}"
                               for s, c in confusion.items()},
          "softness": float(np.mean([edge_softness(v, p, world)
                                     for v, p in zip(videos, prompts)])),
          "features": (features := shape_features(videos, prompts, world)),
          "squares_squarer_p": squares_squarer(features)}


def softness_curve(world: WorldConfig, data_dir: str | None, count: int,
                   sigmas: Sequence[float]) -> list[float]:
  """Mean edge softness of the world's first `count` held-out clips at each sigma."""
  examples, _, prompts = held_out_clips(world, data_dir, count)
  videos = np.stack([e["video"] for e in examples])
  return [float(np.mean([edge_softness(v, p, world)
                         for v, p in zip(blurred(videos, s), prompts)])) for s in sigmas]


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="The world's config; overrides as --config.KEY=VALUE.")
  parser.add_argument("--sigmas", default="0.5,0.75,1,1.25,1.5,2",
                      help="Gaussian blurs in pixels, comma-separated")
  parser.add_argument("--clips", type=int, default=200, help="held-out clips (the first N)")
  parser.add_argument("--workdir", action="append", default=[],
                      help="a trained pixel-space run whose samples' softness to place "
                      "(repeatable)")
  parser.add_argument("--prompts", type=int, default=40,
                      help="held-out prompts each run samples (the demo's seeds)")
  parser.add_argument("--cfg-scale", type=float, default=None,
                      help="text guidance the runs sample with (default: each run's "
                      "sample.cfg_scale)")
  parser.add_argument("--out", default="blur_ceiling.json", help="JSON output")
  args, config = parse_with_config(parser, argv, lock=False)
  try:
    sigmas = sorted({0.0, *(float(s) for s in args.sigmas.split(",") if s)})
  except ValueError:
    parser.error(f"--sigmas {args.sigmas!r}: expected comma-separated numbers.")
  if sigmas[0] < 0 or args.clips < 1 or args.prompts < 1:
    parser.error("--sigmas must be non-negative, --clips and --prompts positive.")
  if args.cfg_scale is not None and args.cfg_scale < 0:
    parser.error(f"--cfg-scale {args.cfg_scale}: must be non-negative.")
  world = configs.world_config(config)
  data_dir = config.world.get("data_dir") or None
  examples, _, prompts = held_out_clips(world, data_dir, args.clips)
  videos = np.stack([e["video"] for e in examples])
  rows = [{**score("held-out clips" if s == 0 else f"blurred, sigma {s:g} px",
                   blurred(videos, s), prompts, world), "sigma": s} for s in sigmas]

  # Ground truth's softness at each sigma per (world, data_dir): the rows hold it for the
  # config's world, which runs of the same world share.
  curves = {(world, data_dir): [r["softness"] for r in rows]}
  runs = []
  if args.workdir:
    from sora_jax.evaluation.shapes_bench import run_bench  # pylint: disable=g-import-not-at-top
    from sora_jax.sample import Sampler  # pylint: disable=g-import-not-at-top
    for workdir in args.workdir:
      sampler = Sampler.from_workdir(workdir)
      run_world = configs.world_config(sampler.config)
      key = (run_world, sampler.config.world.get("data_dir") or None)
      if key not in curves:
        curves[key] = softness_curve(*key, args.clips, sigmas)
      curve = curves[key]
      result = run_bench(sampler, args.prompts, 1, config.eval.seed, cfg_scale=args.cfg_scale)
      row = score(workdir, np.asarray(result["videos"]), result["prompts"], run_world,
                  result["rows"])
      runs.append({**row, "cfg_scale": sampler.options(cfg_scale=args.cfg_scale).cfg_scale,
                   "equivalent_sigma": equivalent_sigma(row["softness"], sigmas, curve),
                   "truth_softness": dict(zip(map(str, sigmas), curve))})

  number = lambda k: (lambda r: "-" if r[k] is None else f"{r[k]:.3f}")  # noqa: E731
  columns = ([("videos", lambda r: r["videos"])] + [(k, number(k)) for k in REPORTED]
             + [("read as prompted", lambda r: ", ".join(
                 f"{s} {n}" for s, n in sorted(r["read_as_prompted"].items()))),
                ("edge softness", number("softness"))]
             + [(f"median {label} ({', '.join(world.shapes)})", lambda r, key=key: " / ".join(
                 f"{r['features'][s][key][1]:.2f}" if s in r["features"] else "-"
                 for s in world.shapes))
                for key, label in (("fill", "fill"), ("centroid_height", "centroid height"),
                                   ("squareness", "squareness"),
                                   ("vertical_skew", "vertical skew"))]
             + [("squares squarer than circles (p)", lambda r: "-" if r["squares_squarer_p"]
                 is None else f"{r['squares_squarer_p']:.3g}")])
  report(rows, columns, args.out, sigmas=sigmas, clips=len(videos), runs=runs,
         world={"frames": world.frames, "height": world.height, "width": world.width,
                "max_objects": world.max_objects, "colours": list(world.colours)})
  if runs:
    print("\n" + markdown_table(runs, columns + [
        ("blur of equal softness (px)", lambda r: "beyond the largest sigma"
         if r["equivalent_sigma"] is None else f"{r['equivalent_sigma']:.2f}")]))


if __name__ == "__main__":
  main()
