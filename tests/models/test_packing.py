"""Several examples packed in one row give what each gives alone, and never see each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import embeddings
from sora_jax.models.model import build_model

SIZES = [(4, 8, 8), (2, 8, 16), (1, 16, 8)]   # two videos and an image, [T, H, W]
PATCH = (1, 4, 4)


@pytest.fixture(scope="module")
def model(data_dir):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, **{"model.variant": "Pico/1x4x4"})
  model = build_model(config, 20, nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape)
                                              for k, x in zip(keys, leaves)]))
  return model


def _examples():
  rng = np.random.default_rng(0)
  videos = [rng.normal(size=(1, *s, 3)).astype(np.float32) for s in SIZES]
  captions = [[5, 6, 7, 1], [8, 9, 1], [10, 11, 12, 13, 1]]
  times = [0.2, 0.5, 0.9]
  return videos, captions, times


def _pack(videos, captions, length=96, text_length=16):
  patches, positions, segments, ids, text_seg, text_pos = [], [], [], [], [], []
  for k, (video, caption) in enumerate(zip(videos, captions)):
    grid = [s // p for s, p in zip(video.shape[1:4], PATCH)]
    patches.append(np.asarray(embeddings.patchify(video, PATCH))[0])
    positions.append(embeddings.grid_positions(grid))
    segments.append(np.full(len(patches[-1]), k + 1))
    ids.append(caption)
    text_seg.append(np.full(len(caption), k + 1))
    text_pos.append(np.arange(len(caption)))

  def pad(parts, size, fill=0):
    out = np.concatenate(parts)
    return np.pad(out, [(0, size - len(out))] + [(0, 0)] * (out.ndim - 1), constant_values=fill)

  return (pad(patches, length)[None], pad(positions, length)[None],
          pad(segments, length)[None].astype(np.int32), pad(ids, text_length)[None],
          pad(text_seg, text_length)[None].astype(np.int32), pad(text_pos, text_length)[None])


def _alone(model, video, caption, t):
  ids = np.zeros((1, 8), np.int32)
  ids[0, :len(caption)] = caption
  out = model(jnp.asarray(video), jnp.asarray([t]), jnp.asarray(ids), jnp.asarray(ids != 0))
  return np.asarray(embeddings.patchify(out, PATCH))[0]


def _packed(model, videos, captions, times):
  patches, positions, seg, ids, text_seg, text_pos = _pack(videos, captions)
  out = model.forward_packed(jnp.asarray(patches), jnp.asarray(positions), jnp.asarray(seg),
                             jnp.asarray([times]), jnp.asarray(ids), jnp.asarray(text_seg),
                             jnp.asarray(text_pos))
  return np.asarray(out)[0], seg[0]


def test_packed_row_matches_each_example_alone(model):
  videos, captions, times = _examples()
  out, seg = _packed(model, videos, captions, times)
  assert (seg == 0).any()   # the row has padding too
  for k, (video, caption, t) in enumerate(zip(videos, captions, times)):
    np.testing.assert_allclose(out[seg == k + 1], _alone(model, video, caption, t),
                               rtol=1e-5, atol=1e-5)


def test_no_attention_crosses_segments(model):
  videos, captions, times = _examples()
  out, seg = _packed(model, videos, captions, times)
  changed_videos = [videos[0], videos[1] + 1.0, videos[2]]
  changed_captions = [captions[0], [14, 15, 1], captions[2]]
  changed_times = [times[0], 0.1, times[2]]
  out2, _ = _packed(model, changed_videos, changed_captions, changed_times)
  for k in (1, 3):
    np.testing.assert_array_equal(out2[seg == k], out[seg == k])
  assert not np.allclose(out2[seg == 2], out[seg == 2], atol=1e-3)
