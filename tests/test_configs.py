"""Bad config values fail before compilation with a message naming the key."""

import pytest

from sora_jax import configs
from sora_jax.train.loop import train


@pytest.mark.parametrize("overrides,message", [
    ({"model.variant": "Pico/2x3x4"}, r"model.variant=.*patch size 3 does not divide world.height"),
    ({"model.variant": "Pico/3x4x4"}, r"patch size 3 does not divide world.frames=4"),
    ({"model.heads": 3}, r"model.heads=3 does not divide model.width=32"),
    ({"text_encoder.heads": 5}, r"text_encoder.heads=5"),
    ({"mesh.data": 16}, r"mesh \(mesh.data=16\) needs 16 devices but 8"),
    ({"mesh.tensor": 3}, r"mesh.data=-1: the other axes multiply to 3"),
    ({"mesh.data": 2, "mesh.fsdp": 4, "data.batch_size": 4}, r"data.batch_size=4 must divide"),
    ({"model.variant": "Huge/1x2x2"}, r"model.variant='Huge/1x2x2'"),
    ({"model.modulation": "film"}, r"model.modulation='film'"),
    ({"train.compute_dtype": "float16"}, r"train.compute_dtype"),
    ({"flow.caption_dropout": 1.5}, r"flow.caption_dropout"),
    ({"optim.lr": 0.0}, r"optim.lr=0.0 must be positive"),
    ({"world.colours": ("red", "mauve")}, r"world.colours: unknown colour 'mauve'"),
])
def test_bad_values_fail_naming_the_key(data_dir, tmp_path, overrides, message):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, **overrides)
  with pytest.raises(ValueError, match=message):
    configs.validate(config)
  # The training entry point refuses it before touching the workdir or compiling.
  with pytest.raises(ValueError, match=message):
    train(config, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


def test_variant_strings_decode():
  assert configs.decode_variant("B/1x2x2") == {"width": 768, "depth": 12, "heads": 12,
                                               "patch": (1, 2, 2)}
  assert configs.decode_variant("Nano/2x4x4")["patch"] == (2, 4, 4)


def test_valid_config_passes(config):
  configs.validate(config)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  configs.validate(config)


@pytest.mark.parametrize("overrides,message", [
    ({"data.grouping": "none"}, r"set data.grouping='pack' or 'bucket'"),
    ({"data.grouping": "stack"}, r"data.grouping='stack'"),
    ({"data.tokens_per_row": 32}, r"data.tokens_per_row=32 is smaller than the largest clip"),
    ({"data.text_tokens_per_row": 8}, r"data.text_tokens_per_row=8 must be at least"),
    ({"model.variant": "Pico/2x4x4"}, r"patch size 2 does not divide world.sizes entry"),
    ({"data.grouping": "bucket"}, r"data.buckets: bucketing needs"),
    ({"data.grouping": "bucket", "data.buckets": ((4, 16, 10),)}, r"data.buckets entry"),
    ({"data.grouping": "bucket", "data.buckets": ((4, 16, 16),), "data.tokens_per_batch": 16},
     r"data.tokens_per_batch=16 is too small"),
])
def test_bad_native_size_values_fail_naming_the_key(data_dir, overrides, message):
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir, native=True, **overrides)
  with pytest.raises(ValueError, match=message):
    configs.validate(config)


def test_native_configs_validate(data_dir):
  import world_native  # pylint: disable=g-import-not-at-top
  for arg in ("", "bucket", "test", "test,bucket"):
    config = world_native.get_config(arg)
    configs.validate(config)
  with pytest.raises(ValueError, match="unknown args"):
    world_native.get_config("tset")
