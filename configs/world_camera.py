"""The camera world (sora_jax/data/camera.py): the demo's model on clips whose camera stays
still, pans or zooms, the caption naming the camera's motion first.

  sora-jax train --config configs/world_camera.py --workdir runs/camera
  python -m experiments.camera_bench --workdir runs/camera

The earlier demo's recipe (configs/world_tiny.py with Nano/2x8x8 predicting the clean
video, 2,700 steps; 8 frames of 32x32, one or two objects) on the camera world: a quarter
of the clips with a still camera, half panning (each direction alike), a quarter zooming in
or out, each slowly or quickly (`world.camera_speeds`). Arg "test": the test config's size
(seconds). TPU target (`sora-jax plan`, tested at the test size): v5e:2x2.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402

CAMERA = (("static", 2.0), ("pan_left", 1.0), ("pan_right", 1.0), ("pan_up", 1.0),
          ("pan_down", 1.0), ("zoom_in", 1.0), ("zoom_out", 1.0))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "test"):
    raise ValueError(f"configs/world_camera.py: unknown arg {arg!r}; expected '' or test.")
  c = world_tiny.get_config(arg or "")
  if not arg:   # the recipe camera_bench measured (docs/results/camera.md)
    c.model.variant = "Nano/2x8x8"
    c.flow.shift = 3.0             # the demo's time shift when these rows were measured
    c.model.self_condition = False  # the demo's recipe before self-conditioning
    c.train.update(steps=2700, checkpoint_every=900)
  c.world.camera = CAMERA
  c.data.text_length = 32          # the camera phrase comes first
  return c
