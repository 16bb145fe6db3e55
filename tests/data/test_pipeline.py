"""The Grain pipeline: deterministic per seed, sharded per process, resumable."""

import chex
import numpy as np

from sora_jax.data.pipeline import make_train_dataset


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _dataset(source, tokenizer, **kw):
  args = dict(tokenizer=tokenizer, text_length=16, global_batch_size=8, seed=0,
              process_index=0, process_count=1)
  return make_train_dataset(source, **{**args, **kw})


def test_batches_have_the_documented_layout(train_source, tokenizer):
  batch = _take(_dataset(train_source, tokenizer), 1)[0]
  chex.assert_shape(batch["video"], (8, 4, 16, 16, 3))
  chex.assert_type(batch["video"], np.float32)
  assert batch["video"].min() >= -1 and batch["video"].max() <= 1
  chex.assert_shape([batch["text_ids"], batch["text_mask"]], (8, 16))
  np.testing.assert_array_equal(batch["text_mask"], batch["text_ids"] != 0)
  assert batch["text_mask"][:, 0].all()


def test_same_seed_same_batches_other_seed_or_process_differs(train_source, tokenizer):
  a = _take(_dataset(train_source, tokenizer), 3)
  b = _take(_dataset(train_source, tokenizer), 3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  other_seed = _take(_dataset(train_source, tokenizer, seed=1), 1)[0]
  assert not np.array_equal(other_seed["video"], a[0]["video"])
  p0 = _take(_dataset(train_source, tokenizer, global_batch_size=8, process_count=2), 8)
  p1 = _take(_dataset(train_source, tokenizer, global_batch_size=8, process_index=1,
                      process_count=2), 8)
  chex.assert_shape(p0[0]["video"], (4, 4, 16, 16, 3))
  seen0 = {v.tobytes() for batch in p0 for v in batch["video"]}
  seen1 = {v.tobytes() for batch in p1 for v in batch["video"]}
  assert len(seen0) == len(seen1) == 32   # one epoch of the 64 examples, split in two
  assert not seen0 & seen1                # the processes read disjoint rows
  # Together the processes' rows are the single-process global batches.
  whole = _take(_dataset(train_source, tokenizer), 8)
  for one, zero, first in zip(whole, p0, p1):
    np.testing.assert_array_equal(one["video"], np.concatenate([zero["video"], first["video"]]))


def test_iterator_state_resumes_the_stream(train_source, tokenizer):
  it = iter(_dataset(train_source, tokenizer))
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]   # crosses into the second epoch
  fresh = iter(_dataset(train_source, tokenizer))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["video"], want["video"])
    np.testing.assert_array_equal(got["text_ids"], want["text_ids"])


def test_processes_load_the_rows_their_devices_hold(train_source, tokenizer, devices):
  """Simulated hosts of 2 devices each (8 CPU devices): each loads the rows of the batch
  its devices hold; hosts that split one sample over the sequence axis load it alike."""
  from sora_jax.parallel.sharding import make_mesh, process_batch_rows  # pylint: disable=g-import-not-at-top
  rules = (("batch", ("data", "fsdp")),)
  host = lambda d: devices.index(d) // 2   # noqa: E731

  def rows(mesh_shape, batch):
    mesh = make_mesh(mesh_shape, devices=devices)
    return [process_batch_rows(mesh, rules, batch, p, process_of=host) for p in range(4)]

  assert rows({"data": 8}, 8) == [(0, 2), (2, 2), (4, 2), (6, 2)]
  assert rows({"data": 2, "sequence": 4}, 2) == [(0, 1), (0, 1), (1, 1), (1, 1)]
  assert rows({"sequence": 8}, 1) == [(0, 1)] * 4          # one sample on every host
  whole = _take(_dataset(train_source, tokenizer, global_batch_size=2), 2)
  for start, count in rows({"data": 2, "sequence": 4}, 2)[1:3]:
    got = _take(_dataset(train_source, tokenizer, global_batch_size=2,
                         rows=(start, count)), 2)
    for one, mine in zip(whole, got):
      np.testing.assert_array_equal(mine["video"], one["video"][start:start + count])
