"""The camera world and the camera estimator: paths, matrices and records; the estimator
recovers the motion, its direction and speed of held-out world clips."""

import numpy as np
import pytest

from sora_jax.data import camera
from sora_jax.data.captions import caption_text
from sora_jax.data.world import SPLIT_SEEDS, WorldConfig, load_world_source, render_example
from sora_jax.evaluation import camera as estimator

MOTIONS = ("static", "pan_left", "pan_right", "pan_up", "pan_down", "zoom_in", "zoom_out")
WORLD = WorldConfig(camera=tuple((m, 1.0) for m in MOTIONS), texture_contrast=3.0)


def test_camera_matrices_project_the_plane_where_the_frame_sees_it():
  centre, zoom = camera.camera_path("zoom_in", 0.05, 4, 24, 32)
  intrinsics, extrinsics = camera.camera_matrices(centre, zoom, 24, 32)
  for f in range(4):
    ys, xs = camera.frame_to_world(centre[f], float(zoom[f]), 24, 32)
    world = np.stack([xs[3, 5], ys[3, 5], 0.0, 1.0])
    pixel = intrinsics[f] @ extrinsics[f] @ world
    np.testing.assert_allclose(pixel[:2] / pixel[2], [5.5, 3.5], atol=1e-4)
  centre, _ = camera.camera_path("pan_left", 0.05, 3, 20, 40)
  np.testing.assert_allclose(centre[:, 0], [20.0, 19.0, 18.0])   # 0.05 * min(20, 40)


def test_camera_world_records_name_the_motion_and_keep_the_objects():
  plain = render_example(WorldConfig(), 4)
  example = render_example(dataclasses_replace(WORLD, camera=(("pan_up", 1.0),)), 4)
  assert example["caption"].startswith("the camera pans up ")
  assert example["caption"].endswith(plain["caption"])
  np.testing.assert_array_equal(example["positions"], plain["positions"])
  assert camera.CAMERA_MOTIONS[int(example["camera_motion"])] == "pan_up"
  assert example["intrinsics"].shape == (8, 3, 3) and example["extrinsics"].shape == (8, 3, 4)
  # Worlds without a camera keep their datasets (the fingerprint ignores the new keys).
  assert WorldConfig().fingerprint() == "9477edf0fe"
  with pytest.raises(ValueError, match="world.camera"):
    WorldConfig(camera=(("dolly", 1.0),)).validate()


def dataclasses_replace(world, **changes):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(world, **changes)


def test_the_estimator_recovers_held_out_camera_motions():
  """Held-out clips (the test split's seeds) of every motion: the kind and direction of
  every one, pan speeds and zoom rates within 10% of the ground truth."""
  rows = []
  for i in range(84):
    example = render_example(WORLD, SPLIT_SEEDS["test"] + i)
    found = estimator.estimate(np.asarray(example["video"]), WORLD)
    rows.append((camera.CAMERA_MOTIONS[int(example["camera_motion"])],
                 float(example["camera_speed"]), found))
  assert {motion for motion, _, _ in rows} == set(MOTIONS)
  wrong = [(m, f.kind) for m, _, f in rows if f.kind != m]
  assert not wrong, wrong
  errors = [abs(abs(f.speed) - s) / s for m, s, f in rows if m != "static"]
  assert max(errors) <= 0.10, sorted(errors)[-5:]
  assert np.median(errors) < 0.02


def test_a_camera_world_dataset_stores_the_camera(tmp_path):
  world = dataclasses_replace(WORLD, num_train=2, num_test=3)
  source = load_world_source(world, "test", str(tmp_path))
  expected = {e["caption"]: e for e in (render_example(world, SPLIT_SEEDS["test"] + i)
                                        for i in range(3))}
  assert len(source) == 3
  for k in range(3):          # (TFDS shuffles records: matched by caption)
    record = source[k]
    want = expected[caption_text(record["caption"])]
    np.testing.assert_allclose(record["camera_centre"], want["camera_centre"])
    np.testing.assert_allclose(record["camera_zoom"], want["camera_zoom"])
    np.testing.assert_allclose(record["extrinsics"], want["extrinsics"])
    assert int(record["camera_motion"]) == int(want["camera_motion"])


def test_object_direction_on_the_plane_after_taking_the_camera_off():
  """An object moving right slowly under a camera panning right quickly moves left in the
  frame; with the measured camera taken off it moves right, as its caption says."""
  from sora_jax.data.world import render_view, simulate  # pylint: disable=g-import-not-at-top
  from sora_jax.evaluation import tracking  # pylint: disable=g-import-not-at-top
  world = dataclasses_replace(WORLD, camera=(("pan_right", 1.0),))
  centre, zoom = camera.camera_path("pan_right", 0.07, 8, 32, 32)
  path = simulate(np.asarray([8.0, 16.0]), np.asarray([0.96, 0.0]), 5.0, 8, 32, 32)
  video = render_view(world, camera.Texture(5, 32, 32), np.asarray([0]), np.asarray([0]),
                      np.asarray([5.0]), path[None], centre, zoom, 32, 32)
  frame_track = tracking.centroids(tracking.world_labels(video, world), 0)
  assert tracking.direction_of(frame_track) == "left"
  caption = "the camera pans right quickly as a red circle moves right slowly"
  prompt = estimator.camera_prompt(caption)
  assert prompt == estimator.CameraPrompt("pan_right", "quickly")
  metrics = estimator.camera_metrics(video, prompt, world, {"red circle": frame_track})
  assert metrics["camera_ok"] == 1.0 and metrics["camera_speed_error"] < 0.1
  assert metrics["world_directions"] == {"red circle": "right"}
  assert estimator.camera_prompt("a red circle moves left") is None
  assert estimator.camera_prompt("the camera stays still as a red circle") == \
      estimator.CameraPrompt("static")


def test_camera_bench_scores_a_model_beside_the_ground_truth(data_dir, tokenizer, tmp_path):
  """experiments/camera_bench.py on a random model of the camera world's test config: the
  ground truth follows every camera phrase; both sides are split by camera group;
  `--world-of` scores on another run's held-out clips (at `--cfg-scale`)."""
  import world_camera  # pylint: disable=g-import-not-at-top
  from helpers import random_model, run_experiment, write_export  # pylint: disable=g-import-not-at-top
  config = world_camera.get_config("test")
  config.world.data_dir = data_dir
  _, params = random_model(config, tokenizer.vocab_size, seed=3, scale=0.1)
  export = write_export(str(tmp_path / "camera"), config, tokenizer, params)
  out = str(tmp_path / "camera.json")
  printed = run_experiment("experiments.camera_bench", "--workdir", export, "--prompts", "6",
                           "--steps", "2", "--out", out)
  assert "| ground truth | all | 6 | 1.000 |" in printed and "| model, text | all |" in printed
  import json  # pylint: disable=g-import-not-at-top
  rows = json.load(open(out))["rows"]
  assert {(r["variant"], r["camera"]) for r in rows} >= {("model, text", "all"),
                                                         ("ground truth", "all")}
  assert len(json.load(open(out))["videos"]) == 6
  for row in rows:      # what each prompted object did, shares summing to one
    assert abs(sum(row["object_outcomes"].values()) - 1.0) < 1e-9
  truth = next(r for r in rows if (r["variant"], r["camera"]) == ("ground truth", "all"))
  assert truth["object_outcomes"]["prompted"] >= 0.5 and truth["object_outcomes"]["missing"] == 0
  # --world-of: the held-out clips of another run's world (here one that only zooms in).
  zooming = config.copy_and_resolve_references()
  zooming.world.camera = (("zoom_in", 1.0),)
  other = write_export(str(tmp_path / "zooming"), zooming, tokenizer, params)
  run_experiment("experiments.camera_bench", "--workdir", export, "--world-of", other,
                 "--prompts", "2", "--steps", "1", "--cfg-scale", "1.5", "--out", out)
  videos = json.load(open(out))["videos"]
  assert len(videos) == 2 and all(v["camera"] == "zoom_in" for v in videos), videos
  assert (json.load(open(out))["world_of"], json.load(open(out))["cfg_scale"]) == (other, 1.5)
  from experiments.camera_bench import object_outcome  # pylint: disable=g-import-not-at-top
  assert [object_outcome("left", True, "right"), object_outcome("up", True, "left"),
          object_outcome("up", True, "up"), object_outcome("up", True, None),
          object_outcome("up", False, None)] == ["opposite", "sideways", "prompted", "still",
                                                 "missing"]


def test_held_out_combinations_can_name_the_camera():
  """`world.holdout` "pan_left red": no train clip pans left over a red object; held-out
  clips do, and ShapesBench's categories call them held out."""
  from sora_jax.evaluation.bench import categories  # pylint: disable=g-import-not-at-top
  world = dataclasses_replace(WORLD, holdout=("pan_left red",))
  world.validate()
  train = [render_example(world, SPLIT_SEEDS["train"] + i, holdout=True) for i in range(60)]
  assert not any(camera.CAMERA_MOTIONS[int(e["camera_motion"])] == "pan_left"
                 and 0 in list(e["colour"]) for e in train)        # red is colour 0
  test = [render_example(world, SPLIT_SEEDS["test"] + i) for i in range(60)]
  held = [e for e in test if camera.CAMERA_MOTIONS[int(e["camera_motion"])] == "pan_left"
          and 0 in list(e["colour"])]
  assert held and all(categories(e, world)["held_out"] for e in held)
  with pytest.raises(ValueError, match="camera motion"):
    dataclasses_replace(WORLD, holdout=("dolly red",)).validate()


def test_texture_contrast_scales_the_plane_about_its_mean_grey():
  """`world.texture_contrast` c multiplies the texture's deviations from its mean grey
  (22 + 30 c) inside [22, 22 + 70 c]; c = 1 is the first camera world's faint plane."""
  ys, xs = np.mgrid[0:32, 0:48] + 0.5
  plane = camera.Texture(11, 32, 48)
  faint = plane(ys, xs).astype(np.float64) - plane.tint           # (the tint is not scaled)
  strong = camera.Texture(11, 32, 48, contrast=3.0)(ys, xs).astype(np.float64) - plane.tint
  assert faint.min() >= 22 - 4 and faint.max() <= 92 + 4 and strong.max() <= 232 + 4
  inside = (faint > 26) & (faint < 88) & (strong > 26) & (strong < 228)
  assert inside.mean() > 0.8
  # uint8 truncation: each side is off its float value by less than one level.
  assert (np.abs(strong[inside] - 112.0 - 3.0 * (faint[inside] - 52.0)) < 4.0).all()
  assert strong.std() > 2.5 * faint.std()
  # Camera worlds of the faint plane keep their datasets (the fingerprint before the key).
  assert dataclasses_replace(WORLD, texture_contrast=1.0).fingerprint() == "c2e384d35a"
  with pytest.raises(ValueError, match="contrast"):
    camera.Texture(0, 8, 8, contrast=0.0)
  # `world.texture_feature_size` 2: features twice as wide, so the plane changes about half
  # as fast from pixel to pixel.
  large = camera.Texture(11, 32, 48, contrast=3.0, feature_size=2.0)(ys, xs).astype(np.float64)
  ratio = np.abs(np.diff(large, axis=1)).mean() / np.abs(np.diff(strong, axis=1)).mean()
  assert 0.35 < ratio < 0.7, ratio
