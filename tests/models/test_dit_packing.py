"""Several examples packed in one row give what each gives alone, and never see each other."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import PATCH, compiled, pack, packing_examples, random_model
from sora_jax.models import embeddings


@pytest.fixture(scope="module")
def model(data_dir):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  # Packed rows carry no frame-conditioning input; each example's pooled caption is its own.
  config = make_test_config(data_dir, **{"model.variant": "Pico/1x4x4", "model.pooled_text": True,
                                         "conditioning.probs": {"none": 1.0}})
  return nnx.merge(*random_model(config, 20, seed=3))


_call, _forward_packed = compiled(), compiled("forward_packed")


def _alone(model, video, caption, t):
  ids = np.zeros((1, 8), np.int32)
  ids[0, :len(caption)] = caption
  out = _call(model, jnp.asarray(video), jnp.asarray([t]), jnp.asarray(ids),
              jnp.asarray(ids != 0))
  return np.asarray(embeddings.patchify(out, PATCH))[0]


def _packed(model, videos, captions, times):
  patches, positions, seg, ids, text_seg, text_pos = pack(videos, captions)
  out = _forward_packed(model, jnp.asarray(patches), jnp.asarray(positions), jnp.asarray(seg),
                        jnp.asarray([times]), jnp.asarray(ids), jnp.asarray(text_seg),
                        jnp.asarray(text_pos))
  return np.asarray(out)[0], seg[0]


def test_packed_row_matches_each_example_alone(model):
  videos, captions, times = packing_examples()
  out, seg = _packed(model, videos, captions, times)
  assert (seg == 0).any()   # the row has padding too
  for k, (video, caption, t) in enumerate(zip(videos, captions, times)):
    np.testing.assert_allclose(out[seg == k + 1], _alone(model, video, caption, t),
                               rtol=1e-5, atol=1e-5)


def test_no_attention_crosses_segments(model):
  videos, captions, times = packing_examples()
  out, seg = _packed(model, videos, captions, times)
  changed_videos = [videos[0], videos[1] + 1.0, videos[2]]
  changed_captions = [captions[0], [14, 15, 1], captions[2]]
  changed_times = [times[0], 0.1, times[2]]
  out2, _ = _packed(model, changed_videos, changed_captions, changed_times)
  for k in (1, 3):
    np.testing.assert_array_equal(out2[seg == k], out[seg == k])
  assert not np.allclose(out2[seg == 2], out[seg == 2], atol=1e-3)
