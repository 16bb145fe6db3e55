"""Native sizes: packed rows hold whole examples, deterministically and resumably."""

import chex
import numpy as np
import pytest

from sora_jax import configs
from sora_jax.data.packing import make_packed_dataset, padding_fraction
from sora_jax.data.pipeline import normalise_video
from sora_jax.data.world import load_world_source
from sora_jax.models import embeddings
from sora_jax.models.embeddings import num_tokens
from sora_jax.models.tokenizer import train_tokenizer
from sora_jax.data.sources import source_captions


@pytest.fixture(scope="module")
def native(data_dir, tmp_path_factory):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, native=True)
  source = load_world_source(configs.world_config(config), "train", data_dir)
  tokenizer = train_tokenizer(source_captions(source), str(tmp_path_factory.mktemp("t") / "t.model"),
                              64, "word")
  return config, source, tokenizer


def _dataset(native, **kw):
  config, source, tokenizer = native
  d = config.data
  args = dict(tokenizer=tokenizer, text_length=d.text_length, patch=(1, 4, 4),
              tokens_per_row=d.tokens_per_row, text_tokens_per_row=d.text_tokens_per_row,
              max_examples_per_row=d.max_examples_per_row, global_batch_size=d.batch_size,
              seed=0, packing_bins=d.packing_bins, process_index=0, process_count=1)
  return make_packed_dataset(source, **{**args, **kw})


def test_world_has_mixed_sizes_and_images(native):
  _, source, _ = native
  sizes = {source[i]["video"].shape[:3] for i in range(len(source))}
  assert {(4, 16, 16), (2, 16, 24), (4, 24, 8)} <= sizes
  assert any(s[0] == 1 for s in sizes)


def test_packed_rows_hold_whole_examples(native):
  config, source, tokenizer = native
  batch = next(iter(_dataset(native)))
  b, n, s = (config.data.batch_size, config.data.tokens_per_row,
             config.data.text_tokens_per_row)
  chex.assert_shape(batch["patches"], (b, n, 48))
  chex.assert_shape([batch["positions"]], (b, n, 3))
  chex.assert_shape([batch["segment_ids"]], (b, n))
  chex.assert_shape([batch["text_ids"], batch["text_segment_ids"], batch["text_positions"]],
                    (b, s))
  # Every segment is one whole example: the patches of some record of the source, in
  # raster order with its own grid positions, and its caption with positions from 0.
  videos = {normalise_video(source[i]["video"]).tobytes(): i for i in range(len(source))}
  found = 0
  for row in range(b):
    seg = batch["segment_ids"][row]
    for k in range(1, seg.max() + 1):
      pos = batch["positions"][row][seg == k]
      grid = pos.max(0) + 1
      size = tuple(int(g * p) for g, p in zip(grid, (1, 4, 4)))
      np.testing.assert_array_equal(pos, embeddings.grid_positions(grid))
      video = np.asarray(embeddings.unpatchify(batch["patches"][row][seg == k][None], grid,
                                               (1, 4, 4), 3))[0]
      assert video.shape[:3] == size and num_tokens(size, (1, 4, 4)) == (seg == k).sum()
      index = videos[video.astype(np.float32).tobytes()]
      text = batch["text_ids"][row][batch["text_segment_ids"][row] == k]
      np.testing.assert_array_equal(batch["text_positions"][row][
          batch["text_segment_ids"][row] == k], np.arange(len(text)))
      ids, _ = tokenizer.encode([source[index]["caption"].decode()], config.data.text_length)
      np.testing.assert_array_equal(text, ids[0][ids[0] != 0])   # truncated to text_length
      found += 1
  assert found > b   # rows do pack several examples
  assert 0 <= padding_fraction(batch) < 0.5


def test_packing_is_deterministic_and_resumable(native):
  a = iter(_dataset(native))
  batches = [next(a) for _ in range(3)]
  b = iter(_dataset(native))
  for want in batches:
    got = next(b)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  state = a.get_state()
  expected = [next(a) for _ in range(3)]
  resumed = iter(_dataset(native))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  other = next(iter(_dataset(native, seed=1)))
  assert not np.array_equal(other["patches"], batches[0]["patches"])
