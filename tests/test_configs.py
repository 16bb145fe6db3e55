"""Bad config values fail before compilation with a message naming the key; the schema
(sora_jax/configs/schema.py) gives every key its type and default."""

import dataclasses
import importlib
import json
import os

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
    ({"flow.second_shift_share": 1.5}, r"flow.second_shift_share=1.5 must be in \[0, 1\]"),
    ({"flow.second_shift_share": 0.5, "flow.second_shift": 0.0}, r"flow.second_shift=0.0 must"),
    ({"flow.self_condition_rate": 2.0}, r"flow.self_condition_rate=2.0 must be in"),
    ({"flow.gradient_loss_weight": -1.0}, r"flow.gradient_loss_weight=-1.0 must be >= 0"),
    ({"flow.gradient_loss_max_time": 0.0}, r"flow.gradient_loss_max_time=0.0 must be in"),
    ({"flow.gradient_loss_min_time": 0.5, "flow.gradient_loss_max_time": 0.5},
     r"flow.gradient_loss_min_time=0.5 must be in \[0, flow.gradient_loss_max_time=0.5\)"),
    ({"flow.gradient_loss_weight": 1.0, "data.grouping": "pack",
      "conditioning.probs": {"none": 1.0}}, r"flow.gradient_loss_weight .* not with data.grouping=pack"),
    ({"model.self_condition": True, "flow.frame_times": {"independent": 1.0}},
     r"model.self_condition trains clips of one flow time each"),
    ({"optim.lr": 0.0}, r"optim.lr=0.0 must be positive"),
    ({"sample.eta": 0.5, "sample.solver": "heun"}, r"sample.eta=0.5: the share of fresh noise"),
    ({"world.colours": ("red", "mauve")}, r"world.colours: unknown colour 'mauve'"),
    ({"model.causal_frames": -1}, r"model.causal_frames=-1 must be >= 0"),
    ({"model.output_head": "conv"}, r"model.output_head='conv': expected one of"),
    ({"model.output_head": "mlp", "model.head_hidden": 0}, r"model.head_hidden=0 must be"),
    ({"model.output_head": "field", "model.field_hidden": 0}, r"model.field_hidden=0 must be"),
    ({"model.head_overlap": 3}, r"model.head_overlap=3: needs output_head linear or mlp, twice"),
    ({"model.head_overlap": 1, "model.output_head": "field"}, r"model.head_overlap=1: needs"),
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


def test_hosts_may_share_a_sample_split_over_the_sequence(config):
  """A batch of one sample over 4 hosts (sequence 8): each host loads it whole. The batch
  still divides by the batch shards, and packed rows (each process packs its own) still
  divide by the processes."""
  config.data.batch_size = 1
  config.mesh.update(data=1, fsdp=1, sequence=8)
  configs.validate(config, num_devices=8, num_processes=4)
  config.mesh.update(data=2, sequence=4)
  with pytest.raises(ValueError, match="data.batch_size=1 must divide by mesh.data x "
                                       "mesh.fsdp = 2"):
    configs.validate(config, num_devices=8, num_processes=4)
  config.data.batch_size = 6
  config.mesh.update(data=3, sequence=1, fsdp=1)
  with pytest.raises(ValueError, match="the 2 processes must divide those shards"):
    configs.validate(config, num_devices=3, num_processes=2)


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
    ({"model.causal_frames": 1, "model.attention": "splash"},
     r"model.causal_frames with packed rows .* splash"),
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


# The schema (sora_jax/configs/schema.py) -------------------------------------------------

CONFIG_ARGS = {"world_tiny": ("", "test", "latent"),
               "world_native": ("", "test", "bucket", "test,bucket"),
               "world_long": ("causal", "bidirectional", "test-causal", "test-bidirectional"),
               "world_camera": ("", "test"),
               "vae_world_tiny": ("", "test", "gan"),
               "wan2_1_t2v": ("1.3B", "14B", "tiny"),
               "wan2_2": ("ti2v-5B", "ti2v-5B-lora", "t2v-A14B", "i2v-A14B")}


def _all_configs():
  for name, args in CONFIG_ARGS.items():
    for arg in args:
      yield f"{name}:{arg}", importlib.import_module(name).get_config(arg)


def test_every_config_builds_a_typed_config_with_every_key():
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  assert sorted(CONFIG_ARGS) == sorted(f[:-3] for f in os.listdir(root) if f.endswith(".py"))
  for name, config in _all_configs():
    typed = configs.typed(config)
    assert isinstance(typed, configs.Config), name
    assert (typed.vae is not None) == name.startswith("vae_"), name
    # Every key of each of its sections exists in the ConfigDict: `--config.S.K=V` works.
    full = configs.as_dict(typed)
    for section in config:
      if section != "seed":
        assert set(full[section]) == set(config[section]), (name, section)


def test_missing_keys_take_the_schema_defaults(config):
  for section, key in (("model", "attention"), ("train", "max_nonfinite_steps"),
                       ("data", "max_side"), ("sample", "schedule"), ("optim", "frozen")):
    with config.unlocked():
      del config[section][key]
  typed = configs.typed(config)
  assert typed.model.attention == "xla" == configs.schema.Model.attention
  assert typed.train.max_nonfinite_steps == 5
  assert typed.data.max_side == 4096 and typed.data.max_skipped_fraction == 0.05
  assert typed.sample.schedule == "uniform" and typed.optim.frozen == ()
  filled = configs.filled(config)
  assert filled.model.attention == "xla" and filled.train.max_nonfinite_steps == 5
  assert configs.defaults("train")["max_nonfinite_steps"] == 5
  assert configs.defaults("train", steps=3)["steps"] == 3


def test_unknown_keys_and_wrong_types_are_refused_naming_them(config):
  with config.unlocked():
    config.train.stpes = 3
  with pytest.raises(ValueError, match=r"train\.stpes: unknown config key"):
    configs.typed(config)
  with pytest.raises(ValueError, match=r"train\.stpes"):
    configs.validate(config)
  with pytest.raises(ValueError, match=r"sample\.shfit: unknown config key"):
    configs.defaults("sample", shfit=2.0)
  with pytest.raises(ValueError, match=r"sampel: unknown config section"):
    configs.typed({"sampel": {}})
  for key, value, message in (("train.steps", "many", r"train\.steps='many': expected an int"),
                              ("model.scan_layers", 1, r"model\.scan_layers=1: expected a bool"),
                              ("flow.shift", "3", r"flow\.shift='3': expected a float"),
                              ("sample.guidance_interval", (0.0,),
                               r"sample\.guidance_interval=.*expected 2 values")):
    section, name = key.split(".")
    values = configs.as_dict(configs.typed({section: {}}))[section] | {name: value}
    with pytest.raises(ValueError, match=message):
      configs.typed({section: values})
  typed = configs.typed({"flow": {"shift": 2}, "data": {"buckets": [[4, 16, 16]]}})
  assert typed.flow.shift == 2.0 and isinstance(typed.flow.shift, float)
  assert typed.data.buckets == ((4, 16, 16),)


def test_an_older_run_config_missing_newer_keys_loads(tmp_path, config):
  """A config.json written before keys existed resumes: typed, validated, same experiment."""
  from sora_jax.train import workdir as wd  # pylint: disable=g-import-not-at-top
  old = config.to_dict()
  for section, keys in (("model", ("attention", "scan_layers", "remat", "mlp_hidden",
                                   "text_padding", "freq_dim", "eps")),
                        ("text_encoder", ("vocab_size", "eps")),
                        ("train", ("max_nonfinite_steps", "init_from")),
                        ("data", ("max_side", "max_skipped_fraction", "num_workers", "tfds",
                                  "media_dir", "cache_text", "latents_dir")),
                        ("sample", ("schedule", "image_cfg_scale", "guidance_interval",
                                    "given_guidance")),
                        ("world", ("holdout", "sizes", "image_ratio")),
                        ("flow", ("shift_base_tokens",)), ("optim", ("frozen",))):
    for key in keys:
      old[section].pop(key, None)
  del old["conditioning"], old["autoencoder"]["path"]
  (tmp_path / "config.json").write_text(configs.to_json(configs.from_json(
      json.dumps(old))))
  stored = wd.load_config(str(tmp_path))
  configs.validate(stored)
  typed = configs.typed(stored)
  assert typed.sample.given_guidance == 0.0 and typed.train.init_from == ""
  assert not configs.dit_config(typed, 32).cond_channels   # no conditioning section: none
  filled = configs.filled(stored)
  assert "conditioning" not in filled and filled.model.remat == "none"
  # The same experiment as the current config, whose keys are at those defaults.
  wd.save_config(str(tmp_path), config)


def test_the_config_key_reference_is_generated_from_the_schema():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                      "reference", "config-keys.md")
  with open(path, encoding="utf-8") as f:
    committed = f.read()
  assert committed == configs.schema.reference_markdown(), (
      "docs/reference/config-keys.md is stale: run "
      "`python -m sora_jax.configs.reference > docs/reference/config-keys.md`.")
  for name, cls in configs.schema.SECTIONS.items():
    for field in dataclasses.fields(cls):
      if not dataclasses.is_dataclass(field.default):
        assert field.metadata.get("doc"), f"{name}.{field.name} has no doc"
        assert f"`{name}.{field.name}`" in committed
