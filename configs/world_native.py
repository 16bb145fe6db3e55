"""Native sizes: one tiny model on clips of several durations, resolutions and aspect
ratios plus images, packed into fixed-length token rows (NaViT's Patch n' Pack).

  sora-jax train --config configs/world_native.py --workdir runs/native
  python -m experiments.native_sizes --workdir runs/native     # colour score per size

Clips: 4 frames at 32x32 (1:1), 24x40 (3:5), 40x24 (5:3) and 16x48 (1:3), and images
(one frame) of those sizes for a quarter of the examples. Patches are 1x4x4 so an
image is a one-frame video of the same model. Rows hold 512 tokens and up to 8
examples; the timestep shift grows with sqrt(tokens / 256).

Arg (after the colon), comma-separated flags:
  bucket  group by bucketing instead of packing: one batch per (frames, height, width)
          bucket, ~4096 tokens each (`configs/world_native.py:bucket`);
  test    a size for unit tests.

TPU target (`sora-jax plan`, tested at the test size): v6e:2x2.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = world_tiny.base_config()
  c.world.update(sizes=((4, 32, 32), (4, 24, 40), (4, 40, 24), (4, 16, 48)), image_ratio=0.25)
  c.model.variant = "Nano/1x4x4"
  # 128 packing bins: 4.3% of tokens are padding on this mix (32 bins: 5.1%).
  c.data.update(grouping="pack", batch_size=8, tokens_per_row=512, text_tokens_per_row=128,
                max_examples_per_row=8, packing_bins=128)
  c.flow.update(shift=3.0, shift_base_tokens=256)
  # Packed rows have no frame conditioning (sora_jax.diffusion.conditioning) yet.
  c.conditioning.probs = dict(none=1.0)
  c.sample.update(shift=3.0)
  # Evaluation sizes: every trained video size, an image, and an aspect ratio never trained.
  c.eval.sizes = ((4, 32, 32), (4, 24, 40), (4, 40, 24), (4, 16, 48), (1, 32, 32), (4, 24, 32))

  flags = set(filter(None, (arg or "").split(",")))
  unknown = flags - {"test", "bucket"}
  if unknown:
    raise ValueError(f"configs/world_native.py: unknown args {sorted(unknown)}; "
                     "use 'test' and/or 'bucket'.")
  if "bucket" in flags:
    c.data.update(grouping="bucket", tokens_per_batch=4096)

  if "test" in flags:
    c.world.update(sizes=((4, 16, 16), (2, 16, 24), (4, 24, 8)), image_ratio=0.25,
                   num_train=64, num_test=16)
    c.data.update(batch_size=8, text_length=16, tokens_per_row=128, text_tokens_per_row=64,
                  max_examples_per_row=4, packing_bins=8)
    c.text_encoder.update(width=32, depth=1, heads=2, mlp_width=64)
    c.model.update(variant="Pico/1x4x4", depth=1)   # one block, as world_tiny's test
    c.flow.update(shift_base_tokens=16)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=4, log_every=2, checkpoint_every=2)
    c.sample.update(steps=3, batch_size=4)
    c.eval.update(num_samples=4, sizes=((4, 16, 16), (1, 16, 24)))
    c.data.update(tokens_per_batch=512)   # 8 examples of the largest bucket: one per device
  if "bucket" in flags:   # one bucket per size the world draws (videos and images)
    sizes = c.world.sizes
    c.data.buckets = tuple(sizes) + tuple((1, h, w) for _, h, w in sizes)
  return c
