"""The camera world (sora_jax/data/camera.py): the demo's model on clips whose camera stays
still, pans or zooms, the caption naming the camera's motion first.

  sora-jax train --config configs/world_camera.py --workdir runs/camera
  python -m experiments.camera_bench --workdir runs/camera

The demo's recipe (configs/world_tiny.py: Nano/8x8x8 predicting the clean video with
self-conditioning at training time shift 6, 5,000 steps of 16 clips; 8 frames of 32x32,
one or two objects) on the camera world: a quarter of the clips with a still camera, half
panning (each direction alike), a quarter zooming in or out, each slowly or quickly
(`world.camera_speeds`), over the plane of `world.texture_contrast` 3 (the best of the
recipes docs/results/camera.md compares on it; until `d6e9faa` this config trained
Nano/2x8x8 at shift 3 for 2,700 steps on the faint plane of contrast 1). Arg "test": the
test config's size (seconds). TPU target (`sora-jax plan`, tested at the test size): v5e:2x2.
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
  c.world.camera = CAMERA
  c.world.texture_contrast = 3.0   # greys over [22, 232]: a plane models draw (1 they did not)
  c.data.text_length = 32          # the camera phrase comes first
  return c
