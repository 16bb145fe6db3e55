"""Training two experts (`model.boundary`, Wan 2.2): a low-noise expert started from a
one-transformer run trains alone, the rest fixed, and the run samples with both."""

import numpy as np
import pytest

from conftest import make_test_config
from sora_jax import configs
from sora_jax.interop.tensors import path_leaves
from sora_jax.sample import Sampler
from sora_jax.train.loop import train
from sora_jax.train.restore import restore_params


@pytest.mark.xdist_group("reference")
def test_a_low_noise_expert_trains_from_a_one_transformer_run(reference_run, data_dir, tmp_path):
  _, source, _ = reference_run
  config = make_test_config(data_dir, **{"model.boundary": 0.4, "train.expert": "low",
                                         "train.init_from": source, "train.steps": 2,
                                         "train.checkpoint_every": 2})
  result = train(config, str(tmp_path), progress=False)
  assert result["step"] == 2 and np.isfinite(result["loss"])
  before = restore_params(source).params        # a run starts from its source's EMA
  after = restore_params(str(tmp_path), ema=False)
  assert after.config.model.boundary == 0.4
  got = path_leaves(after.params)
  # The high-noise expert and the text encoder are the source's; the low-noise expert
  # started as the source's transformer and moved.
  for path, value in path_leaves(before).items():
    if path[0] in ("dit", "text_encoder"):
      np.testing.assert_array_equal(got[path], value, err_msg=str(path))
  moved = [not np.array_equal(got[("low_noise_dit",) + p[1:]], v)
           for p, v in path_leaves(before).items() if p[0] == "dit"]
  assert any(moved)
  sampler = Sampler.from_workdir(str(tmp_path))
  assert "low_noise_dit" in sampler.params
  video = sampler.generate(["a red circle moves left"], [0], steps=3)
  assert video.shape[0] == 1 and video.dtype == np.uint8


@pytest.mark.parametrize("overrides,message", [
    ({"train.expert": "low"}, "set model.boundary"),
    ({"train.expert": "middle", "model.boundary": 0.5}, "train.expert='middle'"),
    ({"model.boundary": 0.5, "flow.frame_times": {"independent": 1.0}}, "one flow time each"),
])
def test_bad_expert_settings_are_refused(data_dir, overrides, message):
  with pytest.raises(ValueError, match=message):
    configs.validate(make_test_config(data_dir, **overrides))
