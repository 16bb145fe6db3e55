"""End to end: a (tiny, random) Wan 2.1 diffusers directory is imported with
`sora-jax import-wan`, sampled with sora_jax, and gives the video diffusers' WanPipeline
gives for the same prompt, noise and schedule; the run exports back to diffusers."""

import copy
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import cli
from sora_jax.interop import tensors
from sora_jax.sample import Sampler, initial_noise

from helpers import (PIPELINE_LAYERS, add_peft_adapter, compiled, relative_error, run_cli,
                     save_diffusers_lora, save_tiny_wan, tiny_wan_transformer, torch_forward)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs"))
CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs",
                      "wan2_1_t2v.py")

PROMPT = "a red circle moves left"
SIZE = dict(frames=9, height=32, width=32)     # latents [3, 4, 4, 4]: 12 tokens of 1x2x2


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
  """A Wan 2.1 diffusers directory with tiny random components (saved by WanPipeline)."""
  torch.manual_seed(0)
  return save_tiny_wan(tmp_path_factory.mktemp("wan"),
                       transformer=tiny_wan_transformer(num_layers=PIPELINE_LAYERS))


@pytest.fixture(scope="module")
def imported(wan_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("runs") / "wan")
  cli.main(["sora-jax", "import-wan", "--model-dir", wan_dir, "--out", out,
            "--config", CONFIG + ":tiny"])
  return out


def test_import_and_sample_match_wan_pipeline(wan_dir, imported):
  sampler = Sampler.from_workdir(imported)
  ours = sampler.generate([PROMPT], [7], **SIZE, steps=3, cfg_scale=2.0, solver="euler",
                          shift=3.0, batch_size=1)
  pipe = diffusers.WanPipeline.from_pretrained(wan_dir)
  noise = np.asarray(initial_noise(np.array([7], np.int32), (3, 4, 4, 4)))   # [B, T, H, W, C]
  with torch.no_grad():
    theirs = pipe(prompt=PROMPT, negative_prompt="", num_frames=SIZE["frames"],
                  height=SIZE["height"], width=SIZE["width"], num_inference_steps=3,
                  guidance_scale=2.0, max_sequence_length=16, output_type="np",
                  latents=torch.from_numpy(np.moveaxis(noise, -1, 1).copy())).frames
  assert ours.shape == (1, 9, 32, 32, 3) and theirs.shape == ours.shape
  # ours is uint8; theirs is float in [0, 1]: within rounding of one level
  assert np.abs(ours / 255.0 - theirs).max() <= 1 / 255 + 1e-4
  assert ours.std() > 2    # a video, not a flat frame


def test_exports_of_the_imported_run(wan_dir, imported, tmp_path):
  # diffusers: the transformer and text encoder come back tensor for tensor
  out = str(tmp_path / "diffusers")
  cli.main(["sora-jax", "export", "--workdir", imported, "--to", "diffusers", "--out", out])
  for part in ("transformer", "text_encoder"):
    original = tensors.SafetensorsCheckpoint(os.path.join(wan_dir, part))
    again = tensors.SafetensorsCheckpoint(os.path.join(out, part))
    for name in again.names():
      np.testing.assert_array_equal(again.read(name), original.read(name), err_msg=name)
  # ... and the directory is a WanPipeline that generates what the original does
  noise = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
  call = dict(prompt=PROMPT, negative_prompt="", num_frames=9, height=32, width=32,
              num_inference_steps=2, guidance_scale=2.0, max_sequence_length=16,
              output_type="np")
  with torch.no_grad():
    exported = diffusers.WanPipeline.from_pretrained(out)(latents=noise.clone(), **call).frames
    original = diffusers.WanPipeline.from_pretrained(wan_dir)(latents=noise.clone(), **call).frames
  np.testing.assert_allclose(exported, original, atol=1e-6)
  # safetensors and orbax-params: sampling reads them back and draws the same video
  reference = Sampler.from_workdir(imported).generate([PROMPT], [1], **SIZE, steps=2)
  for fmt in ("safetensors", "orbax-params"):
    path = str(tmp_path / fmt)
    cli.main(["sora-jax", "export", "--workdir", imported, "--to", fmt, "--out", path])
    np.testing.assert_array_equal(
        Sampler.from_workdir(path).generate([PROMPT], [1], **SIZE, steps=2), reference)
  with pytest.raises(SystemExit, match="exists"):
    cli.main(["sora-jax", "export", "--workdir", imported, "--to", "safetensors",
              "--out", str(tmp_path / "safetensors")])


def test_import_names_a_missing_component(wan_dir, tmp_path):
  broken = str(tmp_path / "broken")
  shutil.copytree(wan_dir, broken)
  shutil.rmtree(os.path.join(broken, "vae"))
  with pytest.raises(SystemExit, match=r"lacks \['vae'\]"):
    cli.main(["sora-jax", "import-wan", "--model-dir", broken, "--out", str(tmp_path / "o"),
              "--config", CONFIG + ":tiny"])


def test_fine_tune_from_the_import(wan_dir, imported, tmp_path, data_dir):
  """`train.init_from` starts from the imported weights; with `optim.frozen` the UMT5
  encoder stays exactly as imported (stored in bfloat16, `optim.frozen_dtype`) while the
  transformer learns; the EMA covers the transformer alone."""
  import wan2_1_t2v  # pylint: disable=g-import-not-at-top
  from sora_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  from sora_jax.train.restore import restore_params  # pylint: disable=g-import-not-at-top
  config = wan2_1_t2v.get_config("tiny")
  config.world.update(data_dir=data_dir, frames=5, height=16, width=16)
  config.data.update(batch_size=8)
  config.autoencoder.path = os.path.join(wan_dir, "vae")
  config.train.update(init_from=imported, steps=2, checkpoint_every=2)
  config.optim.update(lr=1e-2, warmup_steps=0)
  from sora_jax.interop.wan_import import wan_config  # pylint: disable=g-import-not-at-top
  config = wan_config(wan_dir, config)           # the architecture of the directory
  workdir = str(tmp_path / "ft")
  train(config, workdir, progress=False)
  before = restore_params(imported).params
  after = restore_params(workdir, ema=False).params
  for a, b in zip(jax.tree.leaves(before["text_encoder"]), jax.tree.leaves(after["text_encoder"])):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a.astype(jnp.bfloat16), b)
  ema = restore_params(workdir).params   # the transformer's EMA, the frozen encoder as kept
  for a, b in zip(jax.tree.leaves(ema["text_encoder"]), jax.tree.leaves(after["text_encoder"])):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before["dit"]), jax.tree.leaves(after["dit"]))]
  assert sum(changed) > len(changed) // 2
  # the optimiser keeps moments for the transformer only
  from sora_jax.train import optim  # pylint: disable=g-import-not-at-top
  moments = sum(x.size for x in jax.tree.leaves(optim.make_optimizer(config.optim, 2).init(after)))
  dit_size = sum(x.size for x in jax.tree.leaves(after["dit"]))
  assert 2 * dit_size <= moments < 2 * dit_size + 8
  with pytest.raises(ValueError, match="do not match"):
    bad = wan_config(wan_dir, wan2_1_t2v.get_config("tiny"))
    bad.model.depth = 3
    from sora_jax.train.restore import initial_params  # pylint: disable=g-import-not-at-top
    from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
    initial_params(imported, bad, 50, make_mesh({"data": 1}, jax.devices()[:1]))


@pytest.mark.slow
def test_a_distilled_student_exports_to_a_wan_pipeline(wan_dir, imported, tmp_path, data_dir):
  """A 2-step shortcut student of the imported model (`sora-jax distill`, two steps): its
  diffusers export (the step input folded into the timestep bias; FlowMatchEuler spacing
  the student's uniform steps) is a WanPipeline that samples at guidance 1 and 2 steps
  what sora_jax samples from the student's run."""
  import wan2_1_t2v  # pylint: disable=g-import-not-at-top
  from sora_jax.train.distill import distill  # pylint: disable=g-import-not-at-top
  config = wan2_1_t2v.get_config("tiny")
  config.world.update(data_dir=data_dir, frames=5, height=16, width=16)
  config.data.update(batch_size=8)
  config.train.update(steps=2, checkpoint_every=2)
  config.distill.update(steps=2, base_steps=4)
  student = str(tmp_path / "student")
  distill(config, student, teacher=imported, progress=False)
  ours = Sampler.from_workdir(student).generate([PROMPT], [7], **SIZE, batch_size=1)
  out = str(tmp_path / "diffusers")
  cli.main(["sora-jax", "export", "--workdir", student, "--to", "diffusers", "--out", out])
  pipe = diffusers.WanPipeline.from_pretrained(out)
  noise = np.asarray(initial_noise(np.array([7], np.int32), (3, 4, 4, 4)))
  with torch.no_grad():
    theirs = pipe(prompt=PROMPT, negative_prompt="", num_frames=SIZE["frames"],
                  height=SIZE["height"], width=SIZE["width"], num_inference_steps=2,
                  guidance_scale=1.0, max_sequence_length=16, output_type="np",
                  latents=torch.from_numpy(np.moveaxis(noise, -1, 1).copy())).frames
  assert ours.shape == theirs.shape and ours.std() > 2
  assert np.abs(ours / 255.0 - theirs).max() <= 1 / 255 + 1e-4   # one 8-bit level


def test_cached_latents_and_text_for_fine_tuning(wan_dir, imported, tmp_path, data_dir):
  """encode-dataset with the Wan VAE and the imported (frozen) UMT5: records hold what
  encoding on the fly gives, the loss on cached text equals the loss on the encoder's
  output, and a run trains on the cached dataset."""
  import wan2_1_t2v  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  from sora_jax.data.latents import load_latent_source  # pylint: disable=g-import-not-at-top
  from sora_jax.train.sources import latents_description  # pylint: disable=g-import-not-at-top
  from sora_jax.data.pipeline import DecodeAndTokenize  # pylint: disable=g-import-not-at-top
  from sora_jax.data.world import load_world_source  # pylint: disable=g-import-not-at-top
  from sora_jax.interop.wan_import import wan_config  # pylint: disable=g-import-not-at-top
  from sora_jax.train.autoencoders import make_autoencoder  # pylint: disable=g-import-not-at-top
  from sora_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  from sora_jax.train.restore import restore_params  # pylint: disable=g-import-not-at-top
  from sora_jax.train.step import flow_loss, null_text_states  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "latents")
  overrides = [f"--config.world.data_dir={data_dir}", "--config.world.frames=5",
               "--config.world.height=16", "--config.world.width=16",
               f"--config.autoencoder.path={os.path.join(wan_dir, 'vae')}",
               f"--config.train.init_from={imported}", "--config.data.cache_text=True"]
  cli.main(["sora-jax", "encode-dataset", "--config", CONFIG + ":tiny", "--out", out] + overrides)
  config = wan_config(wan_dir, wan2_1_t2v.get_config("tiny"))
  config.world.update(data_dir=data_dir, frames=5, height=16, width=16)
  config.train.init_from = imported
  config.data.update(cache_text=True, latents_dir=out, batch_size=8)
  cached = load_latent_source(out, latents_description(config), "train")
  pixels = load_world_source(configs.world_config(config), "train", data_dir)
  run = restore_params(imported)
  tokenizer, graphdef, params = run.tokenizer, run.graphdef, run.params
  model = nnx.merge(graphdef, params)
  autoencoder = make_autoencoder(config.autoencoder)
  decode = DecodeAndTokenize(tokenizer, config.data.text_length)
  for k in (0, len(cached) - 1):
    record = decode.map(cached[k])
    fresh = decode.map(pixels[int(cached[k]["index"])])
    np.testing.assert_allclose(record["latent"], autoencoder.encode(fresh["video"][None])[0],
                               atol=1e-5)
    np.testing.assert_array_equal(record["text_mask"], fresh["text_mask"])
    states = model.text_encoder(fresh["text_ids"][None], fresh["text_mask"][None])[0]
    np.testing.assert_allclose(record["text_states"], states, atol=1e-5)
  # The loss on cached states equals the loss computed through the text encoder.
  batch = {k: np.stack([decode.map(cached[i])[k] for i in range(4)])
           for k in ("latent", "text_ids", "text_mask", "text_states")}
  null_ids, null_mask = tokenizer.encode([""], config.data.text_length)
  key = jax.random.PRNGKey(3)
  kwargs = dict(config=config, autoencoder=autoencoder, null_ids=null_ids[0],
                null_mask=null_mask[0])
  loss = jax.jit(lambda p, b, kw=dict(kwargs): flow_loss(p, graphdef, b, key, **kw)[0])
  with_cache = loss(params, batch)
  without = {k: v for k, v in batch.items() if k != "text_states"}
  np.testing.assert_allclose(with_cache, loss(params, without), rtol=1e-5)
  # Every caption dropped: the empty caption's states, computed once for the run
  # (`null_text_states`), give the loss of encoding it in the step.
  dropped = copy.deepcopy(config)
  dropped.flow.caption_dropout = 1.0
  kwargs["config"] = dropped
  null_text = null_text_states(dropped, graphdef, params, null_ids[0], null_mask[0])
  np.testing.assert_allclose(flow_loss(params, graphdef, batch, key, null_text=null_text,
                                       **kwargs)[0],
                             flow_loss(params, graphdef, without, key, **kwargs)[0], rtol=1e-5)
  config.train.update(steps=2, checkpoint_every=2)
  workdir = str(tmp_path / "ft")
  summary = train(config, workdir, progress=False)
  assert summary["step"] == 2 and np.isfinite(summary["loss"])
  # The frozen UMT5, which the step never reads, is kept in host memory: the run resumes
  # from its checkpoint, and its parameters come back on the device for sampling.
  from sora_jax.train.state import host_groups  # pylint: disable=g-import-not-at-top
  assert host_groups(config) == ("text_encoder",)
  config.train.steps = 3
  assert train(config, workdir, progress=False)["step"] == 3
  restored = restore_params(workdir).params
  assert {x.sharding.memory_kind for x in jax.tree.leaves(restored)} == {"device"}


def test_sampling_sharded_over_a_mesh(imported):
  """The imported model restored sharded over a 2x4 (fsdp x tensor) mesh samples the
  video one device samples (a model too large for one device runs the same way)."""
  from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  one = Sampler.from_workdir(imported).generate([PROMPT], [5], **SIZE, steps=2)
  mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  sampler = Sampler.from_workdir(imported, mesh=mesh)
  kernel = sampler.params["dit"]["blocks"][0]["mlp"]["fc1"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  sharded = sampler.generate([PROMPT], [5], **SIZE, steps=2)
  assert np.abs(sharded.astype(int) - one.astype(int)).max() <= 1


def test_sample_sharded_through_the_cli(imported, tmp_path, capsys):
  """`sora-jax sample --sharded` builds the run's mesh (the preset's: data over every
  device) and writes a signed video."""
  out = str(tmp_path / "sharded.mp4")
  cli.main(["sora-jax", "sample", "--workdir", imported, "--prompt", PROMPT, "--out", out,
            "--sharded", "--steps", "2", "--frames", "9", "--height", "32", "--width", "32"])
  assert "C2PA manifest signed" in capsys.readouterr().out
  assert os.path.getsize(out) > 0


def test_lora_files_in_sample_and_export(wan_dir, imported, tmp_path, capsys):
  """A PEFT LoRA saved by diffusers: `Sampler.from_workdir(loras=...)` samples what
  `WanPipeline.load_lora_weights` + `set_adapters` at that strength samples; `sample
  --lora` writes the video and `export --lora` writes the merged weights diffusers' own
  `fuse_lora` makes."""
  source = diffusers.WanTransformer3DModel.from_pretrained(os.path.join(wan_dir, "transformer"))
  add_peft_adapter(source)
  lora_file = save_diffusers_lora(source, tmp_path / "lora")
  strength = 0.8
  ours = Sampler.from_workdir(imported, loras=[(lora_file, strength)]).generate(
      [PROMPT], [7], **SIZE, steps=3, cfg_scale=2.0, solver="euler", shift=3.0, batch_size=1)
  pipe = diffusers.WanPipeline.from_pretrained(wan_dir)
  pipe.load_lora_weights(lora_file, adapter_name="style")
  pipe.set_adapters(["style"], [strength])
  noise = np.asarray(initial_noise(np.array([7], np.int32), (3, 4, 4, 4)))
  call = dict(prompt=PROMPT, negative_prompt="", num_frames=SIZE["frames"],
              height=SIZE["height"], width=SIZE["width"], num_inference_steps=3,
              guidance_scale=2.0, max_sequence_length=16, output_type="np")
  with torch.no_grad():
    theirs = pipe(latents=torch.from_numpy(np.moveaxis(noise, -1, 1).copy()), **call).frames
  assert np.abs(ours / 255.0 - theirs).max() <= 1 / 255 + 1e-4
  base = Sampler.from_workdir(imported).generate([PROMPT], [7], **SIZE, steps=3, cfg_scale=2.0,
                                                 solver="euler", shift=3.0, batch_size=1)
  assert np.abs(base.astype(int) - ours.astype(int)).max() > 3     # the adapter matters

  video = str(tmp_path / "lora.mp4")
  cli.main(["sora-jax", "sample", "--workdir", imported, "--prompt", PROMPT, "--out", video,
            "--steps", "2", "--frames", "9", "--height", "32", "--width", "32",
            "--lora", f"{lora_file}:{strength}"])
  assert "C2PA manifest signed" in capsys.readouterr().out

  out = str(tmp_path / "merged")
  cli.main(["sora-jax", "export", "--workdir", imported, "--to", "diffusers", "--out", out,
            "--lora", f"{lora_file}:{strength}"])
  pipe.fuse_lora(lora_scale=1.0)   # the adapter already weighted `strength` by set_adapters
  pipe.unload_lora_weights()
  fused = {k: v.numpy() for k, v in pipe.transformer.state_dict().items()}
  exported = tensors.SafetensorsCheckpoint(os.path.join(out, "transformer"))
  assert exported.names() == set(fused)
  for name in exported.names():
    np.testing.assert_allclose(exported.read(name), fused[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  with pytest.raises(SystemExit, match=r"no LoRA file at"):
    cli.main(["sora-jax", "sample", "--workdir", imported, "--prompt", PROMPT,
              "--out", str(tmp_path / "x.mp4"), "--lora", str(tmp_path / "absent.safetensors")])


def test_lora_run_exports_adapters_that_diffusers_loads(wan_dir, imported, tmp_path, data_dir):
  """`configs/wan2_1_t2v.py:tiny-lora` trained from the import: `export --to lora` writes
  a file `WanPipeline.load_lora_weights` loads, and the transformer it makes computes what
  the LoRA run's (merged) transformer computes; the file merged into the import
  (`Sampler.from_workdir(loras=...)`) computes the same."""
  import wan2_1_t2v  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.interop.wan_import import wan_config  # pylint: disable=g-import-not-at-top
  from sora_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  config = wan2_1_t2v.get_config("tiny-lora")
  config.world.update(data_dir=data_dir, frames=5, height=16, width=16)
  config.data.update(batch_size=8)
  config.autoencoder.path = os.path.join(wan_dir, "vae")
  config.train.update(init_from=imported, steps=2, checkpoint_every=2)
  # the base in float32 (the preset keeps it in bfloat16) to compare with diffusers' float32
  config.optim.update(lr=3e-2, warmup_steps=0, frozen_dtype="")
  config = wan_config(wan_dir, config)
  workdir = str(tmp_path / "lora_run")
  train(config, workdir, progress=False)
  out = str(tmp_path / "adapters")
  cli.main(["sora-jax", "export", "--workdir", workdir, "--to", "lora", "--out", out])

  pipe = diffusers.WanPipeline.from_pretrained(wan_dir)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((1, 3, 4, 4, 4)).astype(np.float32)
  text = rng.standard_normal((1, 16, 20)).astype(np.float32)
  t = np.array([600.0], np.float32)
  base = torch_forward(pipe.transformer, x, t, text)
  pipe.load_lora_weights(out)
  theirs = torch_forward(pipe.transformer, x, t, text)
  sampler = Sampler.from_workdir(workdir)
  ours = compiled()(nnx.merge(sampler.graphdef, sampler.params).dit,
      jnp.asarray(x), jnp.asarray(t / 1000), jnp.asarray(text), jnp.ones((1, 16), bool))
  assert relative_error(ours, theirs) < 1e-4
  assert relative_error(base, theirs) > 1e-3          # the adapters were trained
  # ... and read back by sora_jax itself, merged into the import: the run's transformer.
  lora_file = os.path.join(out, "pytorch_lora_weights.safetensors")
  again = Sampler.from_workdir(imported, loras=[(lora_file, 1.0)])
  mine = nnx.merge(again.graphdef, again.params).dit(
      jnp.asarray(x), jnp.asarray(t / 1000), jnp.asarray(text), jnp.ones((1, 16), bool))
  np.testing.assert_allclose(mine, ours, rtol=1e-5, atol=1e-5)


def test_camera_control_for_the_import(wan_dir, imported, tmp_path, data_dir):
  """Explicit camera control added to an imported model: its rays folded into the Wan
  VAE's latent grid (`data.camera.camera_input`: 4 frames x 8x8 pixels per latent
  position), through the zero-initialised input, so that a run from the import starts
  out computing the import's velocities; a LoRA run on the camera world trains the input
  whole beside its adapters (the base fixed), and `sample --camera` steers what it
  makes, signed; a full fine-tune starts from the import the same way; diffusers exports
  refuse the input in one line."""
  import wan2_1_t2v  # pylint: disable=g-import-not-at-top
  import world_camera  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  from sora_jax.data import camera  # pylint: disable=g-import-not-at-top
  from sora_jax.interop.wan_import import wan_config  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  from sora_jax.provenance import manifest  # pylint: disable=g-import-not-at-top
  from sora_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  from sora_jax.train.restore import initial_params, restore_adapters  # pylint: disable=g-import-not-at-top
  from sora_jax.train.state import build_model  # pylint: disable=g-import-not-at-top

  def camera_config(preset):
    config = wan2_1_t2v.get_config(preset)
    config.world.update(data_dir=data_dir, camera=world_camera.CAMERA, texture_contrast=3.0)
    config.data.update(batch_size=8)
    config.model.camera_control = True
    config.autoencoder.path = os.path.join(wan_dir, "vae")
    config.train.update(init_from=imported, steps=2, checkpoint_every=2)
    config.optim.update(lr=3e-2, warmup_steps=0)
    return wan_config(wan_dir, config)

  # A full fine-tune's start: the import's weights and a zero camera input, which leaves
  # the import's velocities as they are for any camera.
  full = camera_config("tiny")
  rope = copy.deepcopy(full)
  rope.model.camera_rope = True
  with pytest.raises(ValueError, match="camera_rope places a pixel model's tokens"):
    configs.validate(rope)
  vocab = Sampler.from_workdir(imported).tokenizer.vocab_size
  start = initial_params(imported, full, vocab, make_mesh({"data": 1}, jax.devices()[:1]))
  kernel = start["dit"]["camera_proj"]["kernel"]
  assert kernel.shape == (4 * camera.camera_channels(4, 8), 24) and not np.asarray(kernel).any()
  model = build_model(full, vocab, nnx.Rngs(0))
  nnx.update(model, start)
  dit = model.dit
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((1, 2, 2, 2, 4)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((1, 16, 20)), jnp.float32)
  t, mask = jnp.asarray([0.6]), jnp.ones((1, 16), bool)
  rays = camera.camera_input(camera.named_camera("pan_left:0.07", 5, 16, 16)[None], 16, 16, 4, 8)
  run = compiled()
  np.testing.assert_allclose(run(dit, x, t, text, mask, camera=rays), run(dit, x, t, text, mask),
                             atol=1e-6)

  # A LoRA run: adapters and the camera input train, the imported base stays fixed.
  lora_run = str(tmp_path / "camera_lora")
  train(camera_config("tiny-lora"), lora_run, progress=False)
  _, trained, _ = restore_adapters(lora_run, ema=False)
  assert np.abs(np.asarray(trained["dit"]["camera_proj"]["kernel"])).max() > 0
  assert any("lora_a" in str(p) for p in jax.tree_util.tree_flatten_with_path(trained)[0][0])
  sampler = Sampler.from_workdir(lora_run)
  paths = np.stack([camera.named_camera(s, 5, 16, 16) for s in ("static", "pan_left:0.1")])
  videos = sampler.generate([PROMPT] * 2, [0, 0], camera=paths)
  assert videos.shape == (2, 5, 16, 16, 3)
  assert not np.array_equal(videos[0], videos[1])            # the camera input steers
  out = str(tmp_path / "pan.mp4")
  code, printed = run_cli("sample", "--workdir", lora_run, "--prompt", PROMPT, "--out", out,
                          "--camera", "pan_left:0.07", "--frames", "5", "--height", "16",
                          "--width", "16")
  assert code == 0, printed[-2000:]
  assert manifest.verify(out).generation["camera"] == "pan_left:0.07"
  for to in ("lora", "diffusers"):
    code, printed = run_cli("export", "--workdir", lora_run, "--to", to, "--out",
                            str(tmp_path / to))
    assert code != 0 and "camera" in printed.strip().splitlines()[-1], printed[-500:]
