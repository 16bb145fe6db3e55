"""Minute-long video of the procedural world: two models from the same data and budget.

  sora-jax train --config configs/world_long.py:causal --workdir runs/long_causal
  sora-jax train --config configs/world_long.py:bidirectional --workdir runs/long_bidi
  python -m experiments.long_video --causal runs/long_causal --bidirectional runs/long_bidi

Both are the earlier demo's model (configs/world_tiny.py with Nano/2x8x8 predicting the
clean video, guidance 2, one or two objects) trained on 16-frame clips (2 seconds at 8 fps)
for the same steps and batch:

  "causal"         block-causal attention over blocks of one temporal patch (2 frames,
                   `model.causal_frames=1`), trained with per-frame flow times (Diffusion
                   Forcing: a clean prefix and a noisy rest, independent times, or one
                   shared time), no frame conditioning; samples any length autoregressively
                   after a rolling KV cache (`sample --stream`, `sora_jax.autoregressive`).
  "bidirectional"  full attention with frame conditioning (given first or last frames);
                   samples any length by sliding windows (`sample --extend`: each window of
                   16 frames keeps the last 8 generated ones and makes 8 more).

Arg "test-causal" / "test-bidirectional": the same at the test config's size (seconds).
TPU target (`sora-jax plan`, tested at the test size, causal): v5e:2x2.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "causal"
  test = arg.startswith("test-")
  kind = arg.removeprefix("test-")
  if kind not in ("causal", "bidirectional"):
    raise ValueError(f"configs/world_long.py: unknown arg {arg!r}; expected causal, "
                     "bidirectional, test-causal or test-bidirectional.")
  c = world_tiny.get_config("test" if test else "")
  frames = 8 if test else 16
  c.world.update(frames=frames)
  c.media.update(frames=frames, min_frames=frames, stride=frames)
  if not test:   # 2x8x8: blocks of 2 frames stream (docs/results/long-video.md)
    c.model.variant = "Nano/2x8x8"
    c.flow.shift = 3.0             # the demo's time shift when its results were measured
    c.model.self_condition = False  # the demo's recipe before self-conditioning
    c.train.update(steps=1500, checkpoint_every=500)
  c.sample.update(context_frames=frames // 2)
  if kind == "causal":
    c.model.causal_frames = 1
    c.flow.frame_times = {"clean_prefix": 0.5, "independent": 0.25, "shared": 0.25}
    c.conditioning.probs = {"none": 1.0}
    c.sample.stream_window = frames // 4     # chunks of 2 frames: half a clip of context
  return c
