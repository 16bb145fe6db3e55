"""Native sizes through bucketing: nearest buckets, equal token budgets, resumable batches."""

import numpy as np
import pytest

from sora_jax import configs
from sora_jax.data.bucketing import BucketSpec
from sora_jax.data.resize import fit_clip
from sora_jax.data.bucketing import make_bucketed_dataset
from sora_jax.data.bucketing import nearest_bucket
from sora_jax.data.world import load_world_source
from sora_jax.models.embeddings import num_tokens

BUCKETS = ((4, 16, 16), (2, 16, 24), (4, 24, 8), (1, 16, 16), (1, 16, 24), (1, 24, 8))


def test_nearest_bucket_by_aspect_ratio_then_length():
  assert nearest_bucket((4, 16, 16), BUCKETS) == 0
  assert nearest_bucket((8, 32, 32), BUCKETS) == 0          # same ratio, longest that fits
  assert nearest_bucket((1, 40, 40), BUCKETS) == 3          # an image goes to the image bucket
  assert nearest_bucket((3, 30, 44), BUCKETS) == 1          # ratio 0.68 -> 2:3 bucket
  assert nearest_bucket((6, 48, 15), BUCKETS) == 2          # ratio 3.2 -> 3:1 bucket


def test_fit_clip_crops_and_resizes():
  rng = np.random.default_rng(0)
  video = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
  assert fit_clip(video, (4, 16, 16)) is video
  # Same scale, narrower bucket: an exact centre crop in space, the first frames in time.
  np.testing.assert_array_equal(fit_clip(video, (2, 16, 8)), video[:2, :, 4:12])
  flat = np.full((3, 20, 30, 3), 77, np.uint8)
  out = fit_clip(flat, (4, 16, 16))
  assert out.shape == (4, 16, 16, 3) and (out == 77).all()   # short clips repeat the last frame


@pytest.mark.parametrize("multiple", [1, 2, 4])
def test_batches_keep_token_counts_within_the_bound(multiple):
  patch = (1, 4, 4)
  spec = BucketSpec.make(BUCKETS, patch, tokens_per_batch=512, multiple_of=multiple)
  for bucket, size in zip(spec.buckets, spec.batch_sizes):
    tokens = size * num_tokens(bucket, patch)
    assert size % multiple == 0
    assert 512 - multiple * num_tokens(bucket, patch) < tokens <= 512
  with pytest.raises(ValueError, match="tokens_per_batch=32 is too small"):
    BucketSpec.make(BUCKETS, patch, tokens_per_batch=32)


@pytest.fixture(scope="module")
def native_source(data_dir):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, native=True)
  return load_world_source(configs.world_config(config), "train", data_dir)


def _dataset(source, tokenizer, **kw):
  spec = BucketSpec.make(BUCKETS, (1, 4, 4), tokens_per_batch=192, multiple_of=2)
  args = dict(tokenizer=tokenizer, text_length=16, spec=spec, seed=0, process_index=0,
              process_count=1)
  return make_bucketed_dataset(source, **{**args, **kw}), spec


def test_batches_come_from_one_bucket_deterministically_and_resumably(native_source, tokenizer):
  ds, spec = _dataset(native_source, tokenizer)
  it = iter(ds)
  batches = [next(it) for _ in range(6)]
  for batch in batches:
    bucket = batch["video"].shape[1:4]
    assert bucket in spec.buckets
    assert len(batch["video"]) == spec.batch_sizes[spec.buckets.index(bucket)]
    assert batch["text_ids"].shape == (len(batch["video"]), 16)
  assert len({b["video"].shape for b in batches}) > 1   # several buckets appear
  again = iter(_dataset(native_source, tokenizer)[0])
  for want in batches:
    np.testing.assert_array_equal(next(again)["video"], want["video"])
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(_dataset(native_source, tokenizer)[0])
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["text_ids"], want["text_ids"])


def test_processes_read_disjoint_shards(native_source, tokenizer):
  seen = []
  for index in range(2):
    ds, _ = _dataset(native_source, tokenizer, process_index=index, process_count=2)
    it = iter(ds)
    seen.append({v.tobytes() for _ in range(6) for v in next(it)["video"]})
  assert seen[0] and seen[1] and not seen[0] & seen[1]
