"""Helpers shared by tests (importable because tests/ is on sys.path via conftest)."""

import contextlib
import importlib
import io
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models import embeddings

# Packed-row fixture: two videos and an image of different sizes, [T, H, W], patch 1x4x4.
SIZES = [(4, 8, 8), (2, 8, 16), (1, 16, 8)]
PATCH = (1, 4, 4)


def compiled(method: str = "__call__", static: tuple[int, ...] = ()):
  """`fn(module, *args, **kwargs)`: the module's `method` compiled as one program
  (`nnx.jit`; keyword arguments are arrays, `static` the positions in `args` of Python
  values such as a chunk size). Tests call models through it: run eagerly, every operation
  traces, lowers and compiles a program of its own, which costs more than the one program
  (the suite's largest share of small compiles came from such calls)."""
  return nnx.jit(lambda module, *args, **kwargs: getattr(module, method)(*args, **kwargs),
                 static_argnums=tuple(1 + i for i in static))


def random_params(params, seed: int = 1, scale: float = 0.2):
  """Replaces every leaf of a parameter tree by noise, so zero-initialised gates and
  output layers do not hide what the model computes. Drawn by NumPy: `jax.random` would
  lower and compile a sampling and a scaling program per distinct leaf shape (~150 ms a
  shape here; 43 shapes, 6.7 s, in the model and train-step tests alone), and placed by
  `jax.device_put` (`jnp.asarray` of a NumPy array compiles a copy program per shape)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [
      jax.device_put((scale * rng.standard_normal(x.shape)).astype(np.float32)) for x in leaves])


def random_model(config, vocab_size: int, seed: int = 1, scale: float = 0.2):
  """`(graphdef, params)`: the config's model with `random_params` weights, from its
  abstract shapes (`train.state.abstract_model`): no initialisation runs (eagerly, a
  model's initialisers compile a program per operation and parameter shape)."""
  from sora_jax.train.state import abstract_model  # pylint: disable=g-import-not-at-top
  graphdef, abstract = abstract_model(config, vocab_size)
  return graphdef, random_params(nnx.to_pure_dict(abstract), seed, scale)


def stack_blocks(params):
  """Loop-layout parameters (`blocks: {0: ..., 1: ...}`) -> scan layout (stacked leaves)."""
  blocks = params["blocks"]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in sorted(blocks)])
  return {**params, "blocks": stacked}


def packing_examples():
  """Videos `[1, T, H, W, 3]` of `SIZES`, their caption ids (EOS-terminated) and times."""
  rng = np.random.default_rng(0)
  videos = [rng.normal(size=(1, *s, 3)).astype(np.float32) for s in SIZES]
  captions = [[5, 6, 7, 1], [8, 9, 1], [10, 11, 12, 13, 1]]
  times = [0.2, 0.5, 0.9]
  return videos, captions, times


def pack(videos, captions, length: int = 96, text_length: int = 16):
  """Packs examples into one row: (patches, positions, segment_ids, text_ids,
  text_segment_ids, text_positions), each with a leading batch dimension of 1."""
  patches, positions, segments, ids, text_seg, text_pos = [], [], [], [], [], []
  for k, (video, caption) in enumerate(zip(videos, captions)):
    grid = [s // p for s, p in zip(video.shape[1:4], PATCH)]
    patches.append(np.asarray(embeddings.patchify(video, PATCH))[0])
    positions.append(embeddings.grid_positions(grid))
    segments.append(np.full(len(patches[-1]), k + 1))
    ids.append(caption)
    text_seg.append(np.full(len(caption), k + 1))
    text_pos.append(np.arange(len(caption)))

  def pad(parts, size):
    out = np.concatenate(parts)
    return np.pad(out, [(0, size - len(out))] + [(0, 0)] * (out.ndim - 1))

  return (pad(patches, length)[None], pad(positions, length)[None],
          pad(segments, length)[None].astype(np.int32), pad(ids, text_length)[None],
          pad(text_seg, text_length)[None].astype(np.int32), pad(text_pos, text_length)[None])


def edit_model_config(model_dir: str, **changes) -> None:
  """Rewrites `model_dir/config.json` (a diffusers/transformers directory) with `changes`."""
  path = os.path.join(model_dir, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({**config, **changes}, f)


def subprocess_env(**extra: str) -> dict[str, str]:
  """The environment of a process a test starts: one CPU device (no simulated mesh) unless
  `extra` says otherwise, the tests' compile settings (conftest.TEST_XLA_FLAGS)."""
  from conftest import TEST_XLA_FLAGS  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {extra.pop('XLA_FLAGS', '')}".strip()
  return {**env, **extra}


def write_export(directory: str, config, tokenizer, params) -> str:
  """A model written as a safetensors export (what `sora-jax export --to safetensors`
  writes: config, tokenizer, weights, export.json), loadable by `Sampler.from_workdir`."""
  import shutil  # pylint: disable=g-import-not-at-top
  from sora_jax.interop import tensors  # pylint: disable=g-import-not-at-top
  from sora_jax.train import workdir as wd  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  wd.save_config(directory, config)
  shutil.copyfile(tokenizer.path, wd.tokenizer_path(directory))
  tensors.save_safetensors(tensors.flat_params(params), directory, "model")
  with open(os.path.join(directory, "export.json"), "w", encoding="utf-8") as f:
    json.dump({"step": 0}, f)
  return directory


def run_cli(*argv: str) -> tuple[int, str]:
  """`(exit code, stdout + stderr)` of the console script `sora-jax *argv` run in this
  process (the process boundary is tested once, in `test_cli.test_the_console_script_runs`)."""
  from sora_jax import cli  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
      cli.main(["sora-jax", *argv])
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (print(e.code, file=out) or 1)
  return code, out.getvalue()


def run_experiment(module: str, *argv: str) -> str:
  """What an experiment prints, run in this process through its `main(argv)`."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    importlib.import_module(module).main(list(argv))
  return out.getvalue()


# Wan transformers and LoRA adapters on the torch side (torch, diffusers and peft are
# imported when called: the test extra has them, the modules using them skip without).

WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                in_channels=4, out_channels=4, text_dim=20, freq_dim=32, ffn_dim=40,
                num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=64)
# The saved pipelines' transformers and UMT5 have one layer (configs/wan2_1_t2v.py:tiny):
# their tests follow a model through import, training, sampling and export, where a second
# layer adds compile time and no check; the transformer's and UMT5's own parity tests
# (test_wan_transformer.py, test_umt5.py) keep two layers, where their stacking is tested.
PIPELINE_LAYERS = 1


def make_torch_model(tmp_path, **overrides):
  """A tiny random diffusers `WanTransformer3DModel`, saved under `tmp_path/transformer`:
  `(model, path)`."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = tiny_wan_transformer(**overrides)
  path = str(tmp_path / "transformer")
  model.save_pretrained(path)
  return model, path


def torch_forward(model, x, timesteps, text):
  """x: [B, T, H, W, C] numpy; returns [B, T, H, W, C]."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(torch.from_numpy(np.moveaxis(x, -1, 1).copy()),
                torch.from_numpy(timesteps), torch.from_numpy(text), return_dict=False)[0]
  return np.moveaxis(out.numpy(), 1, -1)


def relative_error(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# Every kind of linear layer a Wan LoRA adapts (PEFT matches names by suffix).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out",
                "time_proj", "linear_1", "linear_2"]
LORA_RANK, LORA_ALPHA = 4, 6.0


def add_peft_adapter(model, seed=1, name="default"):
  """A random (B != 0) rank-4 PEFT LoRA with alpha 6 on every linear layer of `model`."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model.add_adapter(peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA,
                                    target_modules=LORA_TARGETS, init_lora_weights=False),
                    adapter_name=name)
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "lora_" in n:
        p.mul_(0.3)


def save_diffusers_lora(model, directory, name="default"):
  """The adapter as `WanPipeline.save_lora_weights` writes it (with its metadata)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import peft  # pylint: disable=g-import-not-at-top
  layers = peft.utils.get_peft_model_state_dict(model, adapter_name=name)
  metadata = model.peft_config[name].to_dict()
  diffusers.WanPipeline.save_lora_weights(str(directory), transformer_lora_layers=layers,
                                          transformer_lora_adapter_metadata=metadata)
  return str(directory / "pytorch_lora_weights.safetensors")


def save_tiny_wan(root, pipeline: str = "WanPipeline", vae=None, **components) -> str:
  """A Wan 2.1 diffusers directory `root/Wan-tiny` saved by `diffusers.<pipeline>`, with a
  tiny random UMT5, tokenizer, VAE (4 latent channels, 4x temporal, 8x spatial; or `vae`)
  and scheduler, and `components` (the transformer, and an I2V pipeline's image encoder
  and processor, or pipeline options). Returns its path."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from sora_jax.interop import export  # pylint: disable=g-import-not-at-top
  from sora_jax.models.tokenizer import train_tokenizer  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  captions = [f"a {c} {s} moves {d}" for c in ("red", "green", "blue")
              for s in ("circle", "square") for d in ("left", "right")]
  spiece = str(root / "spiece.model")
  train_tokenizer(captions * 3, spiece, vocab_size=50)
  export.save_t5_tokenizer(spiece, str(root / "tok"), max_length=16)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tok"))
  text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=97, d_model=20, d_kv=5, d_ff=40, num_layers=PIPELINE_LAYERS, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=20,
      feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
  vae = vae or diffusers.AutoencoderKLWan(
      base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
      temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
      latents_std=[1.5, 0.5, 2.0, 1.0]).eval()
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  pipe = getattr(diffusers, pipeline)(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                      scheduler=scheduler, **components)
  path = root / "Wan-tiny"
  pipe.save_pretrained(str(path))
  # transformers 5 saves tokenizer.json only; the Wan repositories also ship spiece.model
  shutil.copyfile(spiece, str(path / "tokenizer" / "spiece.model"))
  return str(path)


def tiny_wan_transformer(**overrides):
  """A tiny random diffusers `WanTransformer3DModel` for the tiny VAE's 4 latent channels
  (`WAN_TINY` with `overrides`), every tensor perturbed so that none is inert."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  model = diffusers.WanTransformer3DModel(**{**WAN_TINY, **overrides}).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model
