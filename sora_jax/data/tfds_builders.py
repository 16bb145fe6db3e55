"""What the project's TFDS builders (the world, prepared media, cached latents) share.

Their datasets are generated on this machine, never downloaded: TFDS's look-up of a
builder's pre-computed info on its GCS bucket (`DatasetInfo.initialize_from_bucket`, run
whenever a builder is made before its data exists) can find nothing for them, and it
makes a temporary directory that it leaves behind every time (a `/tmp/tmp*tfds` per new
dataset and per run that checks for one).
"""

from __future__ import annotations

from typing import Any


def made_here(info: Any) -> Any:
  """`info` (the `tfds.core.DatasetInfo` a builder's `_info` returns) without the GCS
  look-up: a dataset this project generates is not on TFDS's bucket."""
  info.initialize_from_bucket = lambda: None
  return info
