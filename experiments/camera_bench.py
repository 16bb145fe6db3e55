"""Camera ShapesBench: does a model trained on the camera world follow the camera phrase,
and do its objects still move as prompted on the world plane?

  python -m experiments.camera_bench --workdir runs/camera [--prompts 56] [--steps 24] \
      [--explicit] [--out FILE.json]

(configs/world_camera.py trains one.) The held-out clips of the run's camera world give
the prompts (their captions, camera phrase first) and the ground truth. Each prompt is
sampled once; every video, generated and ground truth alike, is read by the camera
estimator (`sora_jax.evaluation.camera`, validated against the world's true camera paths
in `tests/evaluation/test_camera.py`) and by the object trackers, the objects' tracks
carried onto the world plane with the measured camera taken off. Rows: the model and the
ground truth, overall and split by the prompted camera (still, panning, panning left or
right, panning up or down, zooming):
camera adherence (the measured kind is the prompted one), zoom sign, the speed's relative
error against the prompted word's, the path error (pixels per frame between the measured
and the requested camera of still and panning prompts), and the objects' direction on the
world plane against the prompt's (each prompted object the longest track of its colour),
and what the prompted objects did there: the shares that moved the prompted way, the
opposite way (a camera motion taken for the object's, or the reverse), sideways, stayed
still, or were not found.
With `--explicit` (a model trained with `model.camera_control`), each prompt's camera
path (the held-out clip's intrinsics and extrinsics) is given as the camera input too, and
the text-only rows come first: text against explicit control in one run. Writes the table
and a JSON file (default `<workdir>/camera_bench.json`) with every generated video's
scores under `videos` (each with its variant).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import numpy as np

from experiments.report import report
from experiments.shapes_bench import cell
from sora_jax import configs
from sora_jax.data.camera import pack_camera
from sora_jax.data.world import DIRECTIONS
from sora_jax.evaluation import bench
from sora_jax.evaluation import camera as camera_eval
from sora_jax.evaluation.shapes_bench import held_out_clips
from sora_jax.sample import Sampler
from sora_jax.train import workdir as wd

GROUPS = {"still camera": ("static",), "panning": ("pan_left", "pan_right", "pan_up",
                                                   "pan_down"),
          "panning left/right": ("pan_left", "pan_right"),
          "panning up/down": ("pan_up", "pan_down"), "zooming": ("zoom_in", "zoom_out")}


def object_tracks(video: np.ndarray, prompt: Sequence[bench.PromptObject], world
                  ) -> dict[int, np.ndarray]:
  """Frame positions `[T, 2]` of each prompted object (index -> the longest track of its
  colour, `bench.prompted_tracks`; objects without a track left out)."""
  main = bench.prompted_tracks(video, prompt, world)[3]
  return {k: t.positions for k, t in enumerate(main) if t is not None}


def score(video: np.ndarray, caption: str, prompt: Sequence[bench.PromptObject], world
          ) -> dict[str, Any]:
  """Camera metrics of one video and its objects' world-plane direction accuracy."""
  wanted = camera_eval.camera_prompt(caption)
  if wanted is None:
    raise ValueError(f"{caption!r} names no camera motion: not a camera-world caption.")
  tracks = object_tracks(video, prompt, world)
  metrics = camera_eval.camera_metrics(video, wanted, world,
                                       {str(k): p for k, p in tracks.items()})
  found = metrics.pop("world_directions", {})
  outcomes = [object_outcome(o.direction, k in tracks, found.get(str(k)))
              for k, o in enumerate(prompt)]
  return {"camera": wanted.motion, **metrics,
          "object_direction": float(np.mean([o == "prompted" for o in outcomes])),
          "object_outcomes": outcomes}


OUTCOMES = ("prompted", "opposite", "sideways", "still", "missing")


def object_outcome(prompted: str, tracked: bool, moved: str | None) -> str:
  """What a prompted object did on the world plane: moved the "prompted" way, the
  "opposite" way (what a camera taken for object motion, or object motion for the
  camera's, gives), "sideways" (perpendicular), stayed "still" (moved less than half a
  pixel), or is "missing" (no track of its colour)."""
  if not tracked:
    return "missing"
  if moved is None:
    return "still"
  if moved == prompted:
    return "prompted"
  backwards = tuple(-v for v in DIRECTIONS[prompted]) == tuple(DIRECTIONS[moved])
  return "opposite" if backwards else "sideways"


def outcome_shares(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
  """The share of the prompted objects of `rows` with each `OUTCOMES` entry."""
  every = [o for r in rows for o in r["object_outcomes"]]
  return {k: every.count(k) / len(every) if every else 0.0 for k in OUTCOMES}


def summarise(name: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Table rows: `name` over all videos, then per camera group."""
  def mean(key, chosen):
    values = [r[key] for r in chosen if r[key] is not None]
    return float(np.mean(values)) if values else None

  out = []
  for group, motions in (("all", None), *GROUPS.items()):
    chosen = [r for r in rows if motions is None or r["camera"] in motions]
    if chosen:
      out.append({"variant": name, "camera": group, "videos": len(chosen),
                  "camera_ok": mean("camera_ok", chosen),
                  "zoom_sign_ok": mean("zoom_sign_ok", chosen),
                  "speed_error": (float(np.median([r["camera_speed_error"] for r in chosen
                                                   if r["camera_speed_error"] is not None]))
                                  if any(r["camera_speed_error"] is not None for r in chosen)
                                  else None),
                  "path_error_px": mean("path_error_px", chosen),
                  "object_direction": mean("object_direction", chosen),
                  "object_outcomes": outcome_shares(chosen)})
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--workdir", required=True, help="A run trained on a camera world.")
  parser.add_argument("--prompts", type=int, default=56)
  parser.add_argument("--steps", type=int, default=None, help="Solver steps (run default).")
  parser.add_argument("--cfg-scale", type=float, default=None,
                      help="Guidance scale (run default: its sample.cfg_scale).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--explicit", action="store_true",
                      help="Also give each prompt's camera path as the camera input (a model "
                           "trained with model.camera_control).")
  parser.add_argument("--world-of", default="",
                      help="Score on the held-out clips of this run's world instead (models "
                           "trained on different camera mixes, on the same prompts).")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  sampler = Sampler.from_workdir(args.workdir)
  world_run = configs.filled(wd.load_config(args.world_of)) if args.world_of else sampler.config
  world = configs.world_config(world_run)
  if not world.camera:
    raise SystemExit(f"{args.world_of or args.workdir}: its world has no camera "
                     "(world.camera); train on configs/world_camera.py.")
  examples, captions, prompts = held_out_clips(world, world_run.world.get("data_dir") or None,
                                               args.prompts)
  seeds = [args.seed + i for i in range(len(captions))]
  options = {"steps": args.steps} if args.steps else {}
  if args.cfg_scale is not None:
    options["cfg_scale"] = args.cfg_scale
  videos = sampler.generate(captions, seeds, **options)
  model_rows = [score(v, c, p, world) for v, c, p in zip(videos, captions, prompts)]
  truth_rows = [score(np.asarray(e["video"]), c, p, world)
                for e, c, p in zip(examples, captions, prompts)]
  rows = summarise("model, text", model_rows)
  per_video = [{"variant": "model, text", "prompt": c, **r}
               for c, r in zip(captions, model_rows)]
  if args.explicit:
    paths = np.stack([pack_camera(np.asarray(e["intrinsics"]), np.asarray(e["extrinsics"]))
                      for e in examples])
    guided = sampler.generate(captions, seeds, camera=paths, **options)
    guided_rows = [score(v, c, p, world) for v, c, p in zip(guided, captions, prompts)]
    rows += summarise("model, text + camera path", guided_rows)
    per_video += [{"variant": "model, text + camera path", "prompt": c, **r}
                  for c, r in zip(captions, guided_rows)]
  rows += summarise("ground truth", truth_rows)
  columns = [("variant", lambda r: r["variant"]), ("camera", lambda r: r["camera"]),
             ("videos", lambda r: str(r["videos"])),
             ("camera adherence", lambda r: cell(r["camera_ok"])),
             ("zoom sign", lambda r: cell(r["zoom_sign_ok"])),
             ("speed error (median)", lambda r: cell(r["speed_error"])),
             ("path error px/frame", lambda r: cell(r["path_error_px"])),
             ("object direction (world)", lambda r: cell(r["object_direction"])),
             ("objects prompted / opposite / sideways / still / missing",
              lambda r: " / ".join(f"{r['object_outcomes'][k]:.2f}" for k in OUTCOMES))]
  report(rows, columns, args.out or os.path.join(args.workdir, "camera_bench.json"),
         workdir=args.workdir, world_of=args.world_of or args.workdir, prompts=len(captions),
         steps=args.steps, cfg_scale=args.cfg_scale, videos=per_video)


if __name__ == "__main__":
  main()
