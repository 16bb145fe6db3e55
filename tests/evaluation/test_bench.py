"""ShapesBench: the trackers agree with the world's ground truth, and the metrics catch
hand-made defects (an object deleted for two frames, a teleport, a colour swap)."""

import numpy as np
import pytest

from sora_jax.data.world import PALETTE, WorldConfig, render, render_example
from sora_jax.evaluation import bench, objects, tracking

WORLD = WorldConfig(frames=8, height=32, width=32, min_objects=1, max_objects=3,
                    shapes=("circle", "square", "triangle", "diamond"))


def visibility(example, world=WORLD):
  return bench.visibility(example, world)


def test_trackers_agree_with_ground_truth():
  """Over 300 clips of 1-3 objects: centroids within 1.5 px for >= 99% of object-frames
  at least 80% visible; shape class right for >= 99% of objects seen whole and apart;
  object counts right in >= 99% of frames where every object is whole; identity kept
  through >= 90% of full occlusions."""
  agree = seen = shape_ok = shapes = count_ok = counted = kept = occluded = 0
  for seed in range(300):
    ex = render_example(WORLD, seed)
    labels = tracking.world_labels(ex["video"], WORLD)
    detections = objects.detect(labels, len(WORLD.colours))
    tracks = objects.track(detections, max_jump=8, frame_size=(32, 32))
    vis = visibility(ex)
    for k, colour in enumerate(ex["colour"]):
      mine = [t for t in tracks if t.colour == colour]
      main = max(mine, key=lambda t: t.seen.sum())
      for f in range(WORLD.frames):
        d = main.detections[f]
        if vis[k, f] >= 0.8:
          seen += 1
          agree += d is not None and np.hypot(d.x - ex["positions"][k, f, 0],
                                              d.y - ex["positions"][k, f, 1]) <= 1.5
        if vis[k, f] == 1.0 and d is not None and not d.touching:
          shapes += 1
          shape_ok += d.shape == WORLD.shapes[ex["shape"][k]]
      hidden = np.nonzero(vis[k] < 0.1)[0]
      if len(hidden) and (vis[k, :hidden[0]] >= 0.5).any() and (vis[k, hidden[-1]:] >= 0.5).any():
        occluded += 1
        kept += main.seen[:hidden[0]].any() and main.seen[hidden[-1]:].any()
    for f in range(WORLD.frames):
      if (vis[:, f] == 1.0).all():
        counted += 1
        count_ok += len(detections[f]) == len(ex["colour"])
  assert agree / seen >= 0.99, agree / seen
  assert shape_ok / shapes >= 0.99, shape_ok / shapes
  assert count_ok / counted >= 0.99, count_ok / counted
  assert occluded >= 3 and kept / occluded >= 0.9, (kept, occluded)


@pytest.fixture(scope="module")
def ground_truth_scores():
  rows = []
  for seed in range(100):
    ex = render_example(WORLD, seed)
    rows.append(bench.video_metrics(ex["video"], bench.prompt_objects(ex, WORLD), WORLD))
  return bench.summarise(rows)


def test_ground_truth_videos_score_as_ground_truth(ground_truth_scores):
  s = ground_truth_scores
  assert s["colour"] == 1.0 and s["shape"] >= 0.98 and s["count"] >= 0.99
  # A clip whose object bounces off a wall within its first frame reads reversed.
  assert s["direction"] >= 0.85
  assert s["hallucinated_frames"] <= 0.02 and s["appear_vanish"] <= 0.05
  assert s["physics"] < 0.4 and s["shape_stability"] >= 0.98 and s["flicker"] == 0.0


def _clip(seed=5, objects_=2):
  world = WorldConfig(frames=8, height=32, width=32, min_objects=objects_,
                      max_objects=objects_, shapes=WORLD.shapes)
  for s in range(seed, seed + 200):   # a clip whose objects never touch: defects stand alone
    ex = render_example(world, s)
    if (visibility(ex, world) == 1.0).all() and min(
        np.linalg.norm(ex["positions"][0] - ex["positions"][1], axis=-1)) > 16:
      return world, ex
  raise AssertionError("no clip without contact")


def _redraw(world, ex, positions=None, colours=None, keep=None):
  """Renders the clip's objects again (optionally moved, recoloured, or some frames
  without object `keep[0]`)."""
  positions = ex["positions"] if positions is None else positions
  colours = ex["colour"] if colours is None else colours
  return render(world, colours, ex["shape"], ex["size"], positions, 32, 32)


def test_metrics_catch_an_object_deleted_for_two_frames():
  world, ex = _clip()
  prompt = bench.prompt_objects(ex, world)
  clean = bench.video_metrics(ex["video"], prompt, world)
  assert clean["hallucinated_frames"] == 0 and clean["appear_vanish"] == 0
  without = render(world, ex["colour"][1:], ex["shape"][1:], ex["size"][1:],
                   ex["positions"][1:], 32, 32)
  video = ex["video"].copy()
  video[3:5] = without[3:5]
  broken = bench.video_metrics(video, prompt, world)
  assert broken["hallucinated_frames"] == pytest.approx(2 / 8)
  assert broken["appear_vanish"] >= 1 or broken["permanence"] == 0.0


def test_metrics_catch_a_teleport():
  world, ex = _clip()
  prompt = bench.prompt_objects(ex, world)
  clean = bench.video_metrics(ex["video"], prompt, world)
  positions = ex["positions"].copy()
  positions[0, 5:] = positions[0, 5:] + np.array([6.0, 4.0])
  positions[0, 5:] = np.clip(positions[0, 5:], 6, 26)
  jumped = bench.video_metrics(_redraw(world, ex, positions=positions), prompt, world)
  assert clean["physics"] < 0.5
  assert jumped["physics"] > 1.0 and jumped["physics"] > 3 * clean["physics"]


def test_metrics_catch_a_colour_swap():
  world, ex = _clip()
  prompt = bench.prompt_objects(ex, world)
  spare = next(c for c in range(len(world.colours)) if c not in ex["colour"])
  swapped = _redraw(world, ex, colours=np.array([spare, ex["colour"][1]]))
  video = ex["video"].copy()
  video[4:] = swapped[4:]
  broken = bench.video_metrics(video, prompt, world)
  assert broken["hallucinated_frames"] == pytest.approx(4 / 8)   # an unprompted colour
  assert broken["appear_vanish"] >= 2                           # one vanishes, one appears
  assert PALETTE  # the palette the world draws with


def test_single_object_prompts_carry_the_skeleton_colour_score():
  world = WorldConfig(frames=8, height=32, width=32, min_objects=1, max_objects=1)
  ex = render_example(world, 1)
  prompt = bench.prompt_objects(ex, world)
  assert bench.video_metrics(ex["video"], prompt, world)["dominant_colour"] == 1.0
  other = bench.PromptObject(next(c for c in world.colours if c != prompt[0].colour),
                             prompt[0].shape, prompt[0].direction)
  assert bench.video_metrics(ex["video"], [other], world)["dominant_colour"] == 0.0


def test_reflect_folds_into_the_interval():
  assert objects.reflect(12.0, 2.0, 10.0) == 8.0
  assert objects.reflect(-1.0, 2.0, 10.0) == 5.0
  assert objects.reflect(5.0, 2.0, 10.0) == 5.0


def test_categories_name_what_a_clip_tests():
  world = WorldConfig(frames=8, height=32, width=32, min_objects=2, max_objects=3,
                      shapes=WORLD.shapes, holdout=("red circle",))
  kinds = [bench.categories(render_example(world, s), world) for s in range(60)]
  for key in ("held_out", "occlusion", "bounce"):
    assert 0 < sum(k[key] for k in kinds) < 60, key
  for s in range(60):
    ex = render_example(world, s)
    reds = [a for a in bench.prompt_objects(ex, world) if (a.colour, a.shape) == ("red", "circle")]
    assert bench.categories(ex, world)["held_out"] == bool(reds)


def test_relative_score_interval_is_a_paired_bootstrap():
  """Against itself the interval is exactly 0; a model better on half the videos gets an
  interval around its true relative gain; the resampled score equals `score` when every
  video is drawn once."""
  rng = np.random.default_rng(0)
  rows = [{"colour": float(rng.integers(0, 2)), "shape": float(rng.integers(0, 2)),
           "direction": None if i % 3 else 1.0, "count": 0.0,
           "hallucinated_frames": float(rng.uniform())} for i in range(300)]
  assert bench.relative_score_interval(rows, rows) == (0.0, 0.0)
  better = [dict(r, colour=1.0) for r in rows]
  gain = bench.score(bench.summarise(better)) / bench.score(bench.summarise(rows)) - 1
  low, high = bench.relative_score_interval(better, rows)
  assert 0 < low < gain < high < 2 * gain
  once = bench._resampled_scores(bench._score_parts(rows), np.ones((1, len(rows))))
  np.testing.assert_allclose(once, [bench.score(bench.summarise(rows))])
  with pytest.raises(ValueError, match="paired"):
    bench.relative_score_interval(rows, rows[:-1])


def test_leaks_catch_attributes_bound_to_the_other_object():
  """Two objects that each take the other's shape, then the other's motion: every shape,
  then every direction, is the other object's (leak 1); the clip itself leaks nothing."""
  world = WorldConfig(frames=8, height=32, width=32, min_objects=2, max_objects=2,
                      shapes=WORLD.shapes)
  red, blue = world.colours.index("red"), world.colours.index("blue")
  colours, sizes = np.array([red, blue]), np.array([4.0, 4.0])
  square, triangle = world.shapes.index("square"), world.shapes.index("triangle")
  steps = 1.5 * np.arange(8)
  left_at_top = np.stack([16 - steps, np.full(8, 8.0)], -1)        # [T, 2] (x, y)
  right_below = np.stack([16 + steps, np.full(8, 24.0)], -1)
  prompt = [bench.PromptObject("red", "square", "left"),
            bench.PromptObject("blue", "triangle", "right")]
  clip = render(world, colours, np.array([square, triangle]), sizes,
                np.stack([left_at_top, right_below]), 32, 32)
  clean = bench.video_metrics(clip, prompt, world)
  assert clean["shape"] == clean["direction"] == 1.0
  assert clean["direction_leak"] == 0.0 and clean["shape_leak"] == 0.0
  swapped_shapes = render(world, colours, np.array([triangle, square]), sizes,
                          np.stack([left_at_top, right_below]), 32, 32)
  got = got_shapes = bench.video_metrics(swapped_shapes, prompt, world)
  assert got["shape_leak"] == 1.0 and got["shape"] == 0.0 and got["direction_leak"] == 0.0
  right_at_top = np.stack([16 + steps, np.full(8, 8.0)], -1)
  left_below = np.stack([16 - steps, np.full(8, 24.0)], -1)
  swapped_motion = render(world, colours, np.array([square, triangle]), sizes,
                          np.stack([right_at_top, left_below]), 32, 32)
  got = bench.video_metrics(swapped_motion, prompt, world)
  assert got["direction_leak"] == 1.0 and got["direction"] == 0.0 and got["shape_leak"] == 0.0
  # One object's prompt has nothing to leak from.
  assert bench.video_metrics(clip, prompt[:1], world)["direction_leak"] is None
  # The confusion counts what each prompted shape was read as, over videos; an object
  # without a track of its colour is unread.
  assert clean["shapes_read"] == [("square", "square"), ("triangle", "triangle")]
  assert bench.shape_confusion([clean, got_shapes]) == {
      "square": {"square": 1, "triangle": 1}, "triangle": {"triangle": 1, "square": 1}}
  missing = bench.video_metrics(clip, [bench.PromptObject("green", "circle", "up")], world)
  assert bench.shape_confusion([missing]) == {"circle": {"unread": 1}}
  table = bench.confusion_table(bench.shape_confusion([clean, got_shapes, missing]))
  assert "| circle | 0 | 0 | 0 | 0 | 1 |" in table and "| square | 0 | 1 | 1 | 0 | 0 |" in table
