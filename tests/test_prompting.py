"""Prompting with images and videos: given frames come back unchanged, windows have the
right lengths, SDEdit at full strength is text-to-video, and guidance combines as stated."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_model
from sora_jax import configs, prompting
from sora_jax.models.dit import DiTConfig
from sora_jax.sample import Sampler, guided_velocity

PROMPT = "a red circle moves left"


@pytest.fixture(scope="module")
def sampler(data_dir, tokenizer):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir)   # trains with frame conditioning: 4 frames of 16x16
  return Sampler(config, tokenizer, *random_model(config, tokenizer.vocab_size, seed=3,
                                                   scale=0.1))


def _videos(n, frames, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, frames, 16, 16, 3), dtype=np.uint8)


def test_image_to_video_keeps_the_image(sampler):
  images = _videos(2, 1)[:, 0]
  out = prompting.image_to_video(sampler, [PROMPT] * 2, images, [0, 1])
  chex.assert_shape(out, (2, 4, 16, 16, 3))
  np.testing.assert_array_equal(out[:, 0], images)
  assert np.abs(out[:, 1:].astype(int) - images[:, None]).mean() > 1   # the rest is generated


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_extend_keeps_the_video_and_adds_windows(sampler, direction):
  video = _videos(1, 4)
  out = prompting.extend(sampler, [PROMPT], video, [5], direction=direction, times=3, context=2)
  chex.assert_shape(out, (1, 4 + 3 * 2, 16, 16, 3))
  kept = out[:, :4] if direction == "forward" else out[:, -4:]
  np.testing.assert_array_equal(kept, video)


def test_connect_and_loop(sampler):
  a, b = _videos(1, 4, seed=1), _videos(1, 4, seed=2)
  out = prompting.connect(sampler, [PROMPT], a, b, [0], context=1)
  chex.assert_shape(out, (1, 4 + 2 + 4, 16, 16, 3))
  np.testing.assert_array_equal(out[:, :4], a)
  np.testing.assert_array_equal(out[:, -4:], b)
  looped = prompting.loop(sampler, [PROMPT], a, [0], context=1)
  chex.assert_shape(looped, (1, 6, 16, 16, 3))
  with pytest.raises(ValueError, match="context=2"):
    prompting.connect(sampler, [PROMPT], a, b, [0], context=2)   # no frame left to generate


class Reconstructing:
  """The test sampler, but given frames come back changed (inverted), as a causal latent
  model's decoder returns its own reconstruction of them."""

  def __init__(self, inner):
    self.inner = inner

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def generate(self, prompts, seeds, *, given_video, given_frames, **options):
    out = self.inner.generate(prompts, seeds, given_video=given_video,
                              given_frames=given_frames, **options)
    return np.where(given_frames[:, :, None, None, None], 255 - given_video, out)


def test_handover_shows_the_windows_decoding_of_the_frames_it_leads_into(sampler):
  a, b = _videos(1, 4, seed=1), _videos(1, 4, seed=2)
  model = Reconstructing(sampler)
  plain = prompting.connect(model, [PROMPT], a, b, [0], context=1, handover=False)
  joined = prompting.connect(model, [PROMPT], a, b, [0], context=1)
  chex.assert_equal_shape([plain, joined])
  np.testing.assert_array_equal(plain[:, -4:], b)                     # verbatim
  np.testing.assert_array_equal(joined[:, :6], plain[:, :6])          # A and the gap
  np.testing.assert_array_equal(joined[:, 6], 255 - b[:, 0])          # B's given frame, decoded
  np.testing.assert_array_equal(joined[:, 7:], b[:, 1:])
  looped = prompting.loop(model, [PROMPT], a, [0], context=1)
  np.testing.assert_array_equal(looped[:, 0], 255 - a[:, 0])
  np.testing.assert_array_equal(looped[:, 1:4], a[:, 1:])
  np.testing.assert_array_equal(
      looped[:, 4:], prompting.transition(model, [PROMPT], a, a, [0], context=1))
  # Over three windows the frames generated before B come from B's backward extension,
  # whose 3 given frames of B are handed over; the connecting window's last given frame
  # (a generated one) is too.
  long = prompting.connect(model, [PROMPT], a, b, [7], context=1, windows=3)
  backward = prompting.extend(model, [PROMPT], b, [9], direction="backward", times=1,
                              context=3, handover=True)
  np.testing.assert_array_equal(backward[:, 1:4], 255 - b[:, :3])
  np.testing.assert_array_equal(long[:, -4:-1], 255 - b[:, :3])
  np.testing.assert_array_equal(long[:, -1], b[:, 3])
  np.testing.assert_array_equal(long[:, -5], 255 - backward[:, 0])


def test_transition_over_several_windows(sampler):
  """Three windows: A extended forwards by one, B backwards by one, a window joining them."""
  a, b = _videos(1, 4, seed=1), _videos(1, 4, seed=2)
  context = prompting.extension_context(sampler, at_end=False)
  assert context == 3                             # sample.context_frames=4, window of 4
  out = prompting.connect(sampler, [PROMPT], a, b, [7], context=1, windows=3)
  chex.assert_shape(out, (1, 4 + 1 + 2 + 1 + 4, 16, 16, 3))
  assert prompting.transition_frames(sampler, context=1, windows=3) == 1 + 2 + 1
  assert prompting.transition_frames(sampler, context=1) == 2
  np.testing.assert_array_equal(out[:, :4], a)
  np.testing.assert_array_equal(out[:, -4:], b)
  forward = prompting.extend(sampler, [PROMPT], a, [8], times=1, context=3)
  backward = prompting.extend(sampler, [PROMPT], b, [9], direction="backward", times=1,
                              context=3)
  np.testing.assert_array_equal(out[:, 4], forward[:, 4])      # A's own continuation
  np.testing.assert_array_equal(out[:, 7], backward[:, 0])     # what leads into B
  with pytest.raises(ValueError, match="windows=0"):
    prompting.connect(sampler, [PROMPT], a, b, [0], windows=0)


def test_edit_at_full_strength_is_text_to_video(sampler):
  video = _videos(2, 4)
  edited = prompting.edit(sampler, [PROMPT] * 2, video, [3, 4], strength=1.0)
  np.testing.assert_array_equal(edited, sampler.generate([PROMPT] * 2, [3, 4]))
  light = prompting.edit(sampler, [PROMPT] * 2, video, [3, 4], strength=0.1)
  assert not np.array_equal(light, edited)
  compiled = sampler.compiled_shapes    # where an edit starts is the sampler's input
  half = prompting.edit(sampler, [PROMPT] * 2, video, [3, 4], strength=0.5)
  assert sampler.compiled_shapes == compiled and not np.array_equal(half, light)
  # Progress counts the evaluations the edit runs: 2 of the 3 steps' schedule at 0.5.
  ticks = []
  prompting.edit(sampler, [PROMPT] * 2, video, [3, 4], strength=0.5,
                 progress=lambda done, total: ticks.append((done, total)))
  assert sampler.config.sample.steps == 3 and ticks == [(1, 2), (2, 2)]


def test_every_solver_samples_with_given_frames(sampler):
  images = _videos(1, 1)[:, 0]
  for solver in ("euler", "heun", "dpmpp_2m"):
    out = prompting.image_to_video(sampler, [PROMPT], images, [0], solver=solver, steps=4,
                                   image_cfg_scale=2.0, guidance_interval=(0.1, 0.9))
    np.testing.assert_array_equal(out[:, 0], images)


def test_bad_requests_fail_clearly(sampler):
  with pytest.raises(ValueError, match="solver"):
    sampler.generate([PROMPT], [0], solver="rk45")
  with pytest.raises(ValueError, match="given_frames"):
    sampler.generate([PROMPT], [0], given_video=_videos(1, 4), given_frames=np.zeros((1, 4)))
  with pytest.raises(ValueError, match="strength"):
    prompting.edit(sampler, [PROMPT], _videos(1, 4), [0], strength=0.0)
  with pytest.raises(ValueError, match="given_guidance=-1"):
    prompting.image_to_video(sampler, [PROMPT], _videos(1, 1)[:, 0], [0], given_guidance=-1.0)


class _LinearDiT:
  """A stand-in transformer whose velocity is text + 10 * given-frame mean (per example),
  without a distilled student's inputs."""
  cfg = DiTConfig(width=4, depth=1, heads=1, patch=(1, 1, 1), in_channels=3, text_width=3)

  def __call__(self, x, t, text, mask, conditioning=None):
    del mask
    extra = 0.0 if conditioning is None else 10 * conditioning.mean(axis=(1, 2, 3, 4))
    value = text.mean(axis=(1, 2)) + extra + 0 * t
    return jnp.broadcast_to(value[:, None, None, None, None], x.shape)


class _LinearModel:
  dit = _LinearDiT()


def test_guidance_combines_text_and_image_scales():
  text, null = jnp.full((1, 2, 3), 1.0), jnp.zeros((1, 2, 3))
  mask = jnp.ones((1, 2), bool)
  cond = jnp.full((1, 2, 4, 4, 4), 0.5)
  x, t = jnp.zeros((1, 2, 4, 4, 3)), jnp.full((1,), 0.5)
  v_full, v_image, v_none = 1.0 + 5.0, 0.0 + 5.0, 0.0
  for s_text, s_image in [(1.0, 1.0), (3.0, 1.0), (3.0, 2.0), (1.0, 2.0)]:
    v = guided_velocity(_LinearModel(), text, mask, null, mask, cond, cfg_scale=s_text,
                        image_scale=s_image, interval=(0.0, 1.0))(x, t)
    expected = v_none + s_image * (v_image - v_none) + s_text * (v_full - v_image)
    np.testing.assert_allclose(v, expected, rtol=1e-6, err_msg=f"{s_text}, {s_image}")
  outside = guided_velocity(_LinearModel(), text, mask, null, mask, cond, cfg_scale=3.0,
                            image_scale=2.0, interval=(0.6, 1.0))(x, t)
  np.testing.assert_allclose(outside, v_full)


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_every_mode_through_the_cli(reference_run, tmp_path):
  """Each `sora-jax sample` mode in-process, on the reference run (the test model)."""
  from sora_jax import cli, video_io  # pylint: disable=g-import-not-at-top
  workdir = reference_run[1]
  common = ["sora-jax", "sample", "--workdir", workdir, "--prompt", PROMPT, "--steps", "2", "--scale", "2"]

  base = str(tmp_path / "base.mp4")
  cli.main(common + ["--out", base])                      # upscaled 2x: read back at 16x16
  image = str(tmp_path / "frame.png")
  video_io.write_contact_sheet(image, video_io.read_media(base, 16, 16)[None, :1])
  outputs = {
      "image": (["--image", image], 4),
      "extend": (["--extend", base, "--times", "2", "--context", "2"], 8),
      "loop": (["--loop", base], 6),
      "connect": (["--connect", base, base, "--solver", "dpmpp_2m", "--times", "2"], 11),
      "connect_verbatim": (["--connect", base, base, "--verbatim", "--given-guidance", "100"],
                           10),
      "edit": (["--edit", base, "--strength", "0.5", "--solver", "heun"], 4),
  }
  for name, (flags, frames) in outputs.items():
    path = str(tmp_path / f"{name}.mp4")
    cli.main(common + flags + ["--out", path])
    assert video_io.read_video(path).shape == (frames, 32, 32, 3), name
  with pytest.raises(SystemExit, match="no such file"):
    cli.main(common + ["--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.mp4")])

  # The prompting experiment on the same run: every row, and what a pixel model guarantees.
  from experiments import prompting as experiment  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "prompting.json")
  experiment.main(["--workdir", workdir, "--clips", "3", "--extend-clips", "2", "--steps", "2",
                   "--out", out])
  with open(out, encoding="utf-8") as f:
    result = json.load(f)
  rows = {(r["mode"].split(" (")[0], r["metric"]): r for r in result["rows"]}
  assert len(rows) == len(result["rows"]) == 22, sorted(rows)
  assert all(np.isfinite(r["value"]) for r in result["rows"])
  given = rows[("image-to-video", "given frame in the output: mean / max abs change (0-255)")]
  assert given["value"] == given["reference"] == 0.0        # a pixel model keeps it exactly
  b_as_output = "output's B vs the input's: mean abs diff, first frame (ref.: all frames)"
  for mode in ("connect A -> B, 1 window(s)",
               "connect a clip to its own continuation, 3 window(s)"):
    handed_over = rows[(mode, b_as_output)]
    assert handed_over["value"] == handed_over["reference"] == 0.0   # ... and B's frames
  for metric in ("direction accuracy (caption)", "direction accuracy (reversed caption)"):
    assert 0.0 <= rows[("image-to-video", metric)]["value"] <= 1.0
  clips = experiment.held_out(configs.world_config(reference_run[0]), 3)
  videos = np.stack([c["video"] for c in clips])
  cut = rows[("connect A -> B", "mean abs diff: A's last frame vs B's first (no transition)")]
  np.testing.assert_allclose(cut["value"], experiment.mean_abs(videos[0, -1], videos[1, 0]) / 2
                             + experiment.mean_abs(videos[1, -1], videos[0, 0]) / 2, rtol=1e-5)
  np.testing.assert_allclose(cut["reference"], experiment.mean_abs(videos[:, 1:], videos[:, :-1]),
                             rtol=1e-5)
  assert result["clips"] == 3 and result["extend_clips"] == 2
