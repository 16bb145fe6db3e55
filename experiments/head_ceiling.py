"""The best a pixel transformer's output layer can draw: ShapesBench on held-out world clips
projected onto the k-dimensional affine subspace of patches that fits the training clips
best.

  python -m experiments.head_ceiling --config configs/world_tiny.py \
      [--patch 8x8x8] [--ranks 64,128,256,512] [--train-clips 2000] [--clips 200] \
      [--out docs/results/demo/head_ceiling.json]
  python -m experiments.head_ceiling --config configs/world_camera.py --ranks 128,256,512

A linear output layer maps each token's state of `width` values to its patch's
`pt*ph*pw*C` values with one weight matrix and bias for every token, so every patch the
model can ever output lies in one affine subspace of dimension `width` (a two-layer MLP
head: of its hidden width, `model.output_head=mlp`), whatever it learns and however long.
The subspace that loses least of the data is the mean plus the top-k principal
components of the training clips' patches (Eckart-Young): projecting the held-out clips
onto it and scoring the projections with ShapesBench's trackers gives an upper bound of
what such a head can score on those clips, for k = each of `--ranks`. (An upper bound of
the model's best output of each clip; a model's sample must also be one.) The clips are
those the config's world makes (`world.*`), the held-out ones the first `--clips` of its
test split: the demo's prompts. On a camera world (`configs/world_camera.py`) the rows
also give the camera bench's camera adherence and the objects' direction on the world
plane under a still, panning and zooming camera (`experiments.camera_bench.score`).
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from experiments import camera_bench
from experiments.report import report
from sora_jax import configs
from sora_jax.cli.args import parse_with_config
from sora_jax.data.world import load_world_source
from sora_jax.demo import REPORTED
from sora_jax.evaluation import bench
from sora_jax.evaluation.reconstruction import psnr_uint8
from sora_jax.evaluation.shapes_bench import held_out_clips
from sora_jax.models.embeddings import patchify, unpatchify


def principal_subspace(patches: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """`(mean [P], basis [P, rank])`: the affine subspace of `rank` dimensions closest to
  `patches [N, P]` in squared error (their mean and top principal directions, float64)."""
  x = patches.astype(np.float64)
  mean = x.mean(0)
  centred = x - mean
  values, vectors = np.linalg.eigh(centred.T @ centred / len(x))
  return mean, vectors[:, np.argsort(values)[::-1][:rank]]


def project(videos: np.ndarray, patch: Sequence[int], mean: np.ndarray,
            basis: np.ndarray) -> np.ndarray:
  """uint8 `videos [N, T, H, W, 3]` with every patch replaced by its projection onto the
  subspace `mean + span(basis)`, back to uint8."""
  x = videos.astype(np.float32) / 127.5 - 1.0
  tokens = np.asarray(patchify(x, patch), np.float64)               # [N, n, P]
  projected = (tokens - mean) @ basis @ basis.T + mean
  grid = [s // p for s, p in zip(videos.shape[1:4], patch)]
  out = np.asarray(unpatchify(projected.astype(np.float32), grid, patch, videos.shape[-1]))
  return np.clip(np.round((out + 1.0) * 127.5), 0, 255).astype(np.uint8)


CAMERA_GROUPS = ("still camera", "panning", "zooming")


def scored(name: str, videos: np.ndarray, prompts, captions, world,
           truth: np.ndarray | None) -> dict:
  """ShapesBench's summary of `videos`, and on a camera world the camera bench's camera
  adherence and world-plane object direction per camera group."""
  rows = [bench.video_metrics(v, p, world) for v, p in zip(videos, prompts)]
  summary = bench.summarise(rows)
  confusion = bench.shape_confusion(rows)
  out = {"videos": name, **{k: summary[k] for k in REPORTED},
         "psnr_db": None if truth is None else psnr_uint8(videos, truth),
         "squares_read_as_squares": confusion.get("square", {}).get("square", 0),
         "squares_read": sum(v for k, v in confusion.get("square", {}).items() if k != "unread"),
         "shape_confusion": confusion}
  if world.camera:
    camera_rows = [camera_bench.score(v, c, p, world)
                   for v, c, p in zip(videos, captions, prompts)]
    out["camera"] = {r["camera"]: {"camera_ok": r["camera_ok"],
                                   "object_direction": r["object_direction"]}
                     for r in camera_bench.summarise(name, camera_rows)}
  return out


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="A pixel run's config (its world); overrides as --config.KEY=VALUE.")
  parser.add_argument("--patch", default="8x8x8", help="the patch, TxHxW")
  parser.add_argument("--ranks", default="64,128,256,512",
                      help="dimensions of the subspaces, comma-separated")
  parser.add_argument("--train-clips", type=int, default=2000,
                      help="training clips the subspaces are fitted to")
  parser.add_argument("--clips", type=int, default=200, help="held-out clips (the first N)")
  parser.add_argument("--out", default="head_ceiling.json", help="JSON output")
  args, config = parse_with_config(parser, argv, lock=False)
  try:
    patch = tuple(int(p) for p in args.patch.lower().split("x"))
    ranks = [int(r) for r in args.ranks.split(",")]
  except ValueError:
    parser.error(f"--patch {args.patch!r} / --ranks {args.ranks!r}: expected TxHxW and "
                 "comma-separated integers.")
  world = configs.world_config(config)
  if len(patch) != 3 or any(s % p for s, p in zip((world.frames, world.height, world.width),
                                                   patch)):
    parser.error(f"--patch {args.patch}: does not tile the world's {world.frames}x"
                 f"{world.height}x{world.width} clips.")
  dim = int(np.prod(patch)) * 3
  if args.train_clips < 1 or args.clips < 1 or not all(0 < r <= dim for r in ranks):
    parser.error(f"--train-clips and --clips must be positive, --ranks in [1, {dim}].")
  data_dir = config.world.get("data_dir") or None
  train = load_world_source(world, "train", data_dir)
  fit = np.stack([train[i]["video"] for i in range(min(args.train_clips, len(train)))])
  patches = np.asarray(patchify(fit.astype(np.float32) / 127.5 - 1.0, patch)).reshape(-1, dim)
  examples, captions, prompts = held_out_clips(world, data_dir, args.clips)
  videos = np.stack([e["video"] for e in examples])

  rows = [scored("held-out clips", videos, prompts, captions, world, None)]
  for rank in ranks:
    mean, basis = principal_subspace(patches, rank)
    rows.append({**scored(f"projected onto {rank} dimensions", project(videos, patch, mean,
                                                                       basis),
                          prompts, captions, world, videos), "rank": rank})
  number = lambda k: (lambda r: "-" if r.get(k) is None else f"{r[k]:.3f}")  # noqa: E731
  columns = ([("videos", lambda r: r["videos"])] + [(k, number(k)) for k in REPORTED]
             + [("squares read as squares",
                 lambda r: f"{r['squares_read_as_squares']}/{r['squares_read']}"),
                ("PSNR (dB)", lambda r: "-" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}")])
  if world.camera:     # the camera bench's columns: camera adherence, objects on the plane
    def group(name, key):
      return lambda r: (f"{r['camera'][name][key]:.3f}" if name in r["camera"] else "-")
    columns += [("camera adherence", group("all", "camera_ok"))] + [
        (f"objects (world plane): {name}", group(name, "object_direction"))
        for name in CAMERA_GROUPS]
  report(rows, columns, args.out, patch=list(patch), train_clips=len(fit), clips=len(videos),
         world={"frames": world.frames, "height": world.height, "width": world.width,
                "max_objects": world.max_objects})


if __name__ == "__main__":
  main()
