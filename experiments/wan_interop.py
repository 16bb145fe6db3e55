"""Wan 2.1 interop, measured: sora_jax against diffusers/transformers on the same
randomly initialised weights — relative error of every component, and the forward
time of each side by side (jitted JAX vs. eager PyTorch, same machine, same run).

  python -m experiments.wan_interop [--size small] [--repeats 5] [--out wan_interop.json]

Sizes: "tiny" (the tests' models) and "small" (a 4-block, 256-wide transformer on
[1, 5, 16, 24, 16] latents = 480 tokens, a 4x8x8 VAE of base width 16 on 9x64x64
videos, a 4-layer UMT5 of width 128). With an accelerator the transformer row also
reports MFU (analytic FLOPs, `sora_jax.models.flops`, over the device's peak).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.report import report
from experiments.step_timing import peak_flops_per_device
from sora_jax.interop.load import load_umt5_encoder, load_wan_transformer, load_wan_vae
from sora_jax.models.flops import dit_forward_flops


SIZES = {
    "tiny": dict(
        transformer=dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=40,
                         num_layers=2, text_dim=20, freq_dim=32),
        latents=(1, 3, 4, 6, 16), text_len=8,
        vae=dict(base_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1), video=(1, 9, 32, 32),
        umt5=dict(d_model=20, d_kv=5, d_ff=40, num_layers=2, num_heads=4), umt5_len=12),
    "small": dict(
        transformer=dict(num_attention_heads=4, attention_head_dim=64, ffn_dim=1024,
                         num_layers=4, text_dim=128, freq_dim=256),
        latents=(1, 5, 16, 24, 16), text_len=32,
        vae=dict(base_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2), video=(1, 9, 64, 64),
        umt5=dict(d_model=128, d_kv=32, d_ff=256, num_layers=4, num_heads=4), umt5_len=64),
}


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  fn()                                   # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def relative_error(ours, theirs) -> float:
  theirs = np.asarray(theirs, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="small", help="Model size.")
  parser.add_argument("--repeats", type=int, default=5, help="Timed calls per side (median reported).")
  parser.add_argument("--out", type=str, default='wan_interop.json', help="JSON output.")
  args = parser.parse_args(argv)
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  size, repeats = SIZES[args.size], args.repeats
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory(prefix="wan_interop_") as tmp:   # the random models, saved
    rows = []
    peak, peak_source = peak_flops_per_device()
    accelerator = jax.default_backend() != "cpu"

    # Transformer.
    model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16,
                                            **size["transformer"]).eval()
    model.save_pretrained(f"{tmp}/transformer")
    start = time.perf_counter()
    dit = load_wan_transformer(f"{tmp}/transformer")
    load_s = time.perf_counter() - start
    x = rng.standard_normal(size["latents"]).astype(np.float32)
    text = rng.standard_normal((1, size["text_len"], size["transformer"]["text_dim"]))
    text = text.astype(np.float32)
    mask = np.ones(text.shape[:2], bool)
    x_t = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    errors = []
    forward = jax.jit(lambda x, t, text, mask: dit(x, t, text, mask))
    for timestep in (0.0, 500.0, 999.0):
      with torch.no_grad():
        theirs = model(x_t, torch.tensor([timestep]), torch.from_numpy(text), return_dict=False)[0]
      ours = forward(x, jnp.array([timestep / 1000]), text, mask)
      errors.append(relative_error(ours, np.moveaxis(theirs.numpy(), 1, -1)))
    with torch.no_grad():
      t_torch = median_seconds(lambda: model(x_t, torch.tensor([500.0]), torch.from_numpy(text),
                                             return_dict=False), repeats)
    t_jax = median_seconds(lambda: forward(x, jnp.array([0.5]), text, mask).block_until_ready(),
                           repeats)
    tokens = int(np.prod([s // p for s, p in zip(size["latents"][1:4], (1, 2, 2))]))
    flops = dit_forward_flops(dit.cfg, tokens, size["text_len"])
    rows.append(dict(component="WanTransformer3DModel forward", shape=str(size["latents"]),
                     rel_error=max(errors), diffusers_ms=1e3 * t_torch, sora_jax_ms=1e3 * t_jax,
                     speedup=t_torch / t_jax, load_s=load_s,
                     mfu=flops / t_jax / peak if accelerator else None))

    # VAE.
    vae_model = diffusers.AutoencoderKLWan(z_dim=16, temperal_downsample=[False, True, True],
                                           **size["vae"]).eval()
    vae_model.save_pretrained(f"{tmp}/vae")
    vae = load_wan_vae(f"{tmp}/vae")
    b, t, h, w = size["video"]
    video = rng.uniform(-1, 1, (b, t, h, w, 3)).astype(np.float32)
    video_t = torch.from_numpy(np.moveaxis(video, -1, 1).copy())
    encode = jax.jit(lambda v: vae.encode(v)[0])
    decode = jax.jit(vae.decode)
    with torch.no_grad():
      mean_t = vae_model.encode(video_t).latent_dist.mean
      decoded_t = vae_model.decode(mean_t).sample
      t_enc = median_seconds(lambda: vae_model.encode(video_t), repeats)
      t_dec = median_seconds(lambda: vae_model.decode(mean_t), repeats)
    latent = np.moveaxis(mean_t.numpy(), 1, -1)
    rows.append(dict(component="AutoencoderKLWan encode", shape=str(video.shape),
                     rel_error=relative_error(encode(video), latent), diffusers_ms=1e3 * t_enc,
                     sora_jax_ms=1e3 * median_seconds(
                         lambda: encode(video).block_until_ready(), repeats)))
    rows[-1]["speedup"] = rows[-1]["diffusers_ms"] / rows[-1]["sora_jax_ms"]
    rows.append(dict(component="AutoencoderKLWan decode", shape=str(latent.shape),
                     rel_error=relative_error(decode(latent),
                                              np.moveaxis(decoded_t.numpy(), 1, -1)),
                     diffusers_ms=1e3 * t_dec, sora_jax_ms=1e3 * median_seconds(
                         lambda: decode(latent).block_until_ready(), repeats)))
    rows[-1]["speedup"] = rows[-1]["diffusers_ms"] / rows[-1]["sora_jax_ms"]

    # UMT5.
    umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=1000, feed_forward_proj="gated-gelu", dropout_rate=0.0, **size["umt5"])).eval()
    umt5.save_pretrained(f"{tmp}/text_encoder")
    encoder = load_umt5_encoder(f"{tmp}/text_encoder")
    ids = rng.integers(3, 1000, (2, size["umt5_len"]))
    ids_mask = np.ones_like(ids, bool)
    ids_mask[1, size["umt5_len"] // 3:] = False
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(ids_mask.astype(np.int64))
    encode_text = jax.jit(encoder)
    with torch.no_grad():
      expected = umt5(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.numpy()
      t_umt5 = median_seconds(lambda: umt5(input_ids=ids_t, attention_mask=mask_t), repeats)
    rows.append(dict(component="UMT5EncoderModel", shape=str(ids.shape),
                     rel_error=relative_error(encode_text(ids, ids_mask), expected),
                     diffusers_ms=1e3 * t_umt5, sora_jax_ms=1e3 * median_seconds(
                         lambda: encode_text(ids, ids_mask).block_until_ready(), repeats)))
    rows[-1]["speedup"] = rows[-1]["diffusers_ms"] / rows[-1]["sora_jax_ms"]

    columns = [("component", lambda r: r["component"]), ("input", lambda r: r["shape"]),
               ("max rel. error", lambda r: f"{r['rel_error']:.1e}"),
               ("PyTorch ms", lambda r: f"{r['diffusers_ms']:.1f}"),
               ("sora_jax ms", lambda r: f"{r['sora_jax_ms']:.1f}"),
               ("PyTorch / sora_jax", lambda r: f"{r['speedup']:.2f}x"),
               ("MFU", lambda r: "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%")]
    report(rows, columns, args.out, size=args.size, device=str(jax.devices()[0]),
           peak_flops=peak, peak_source=peak_source, repeats=repeats,
           torch_threads=torch.get_num_threads())


if __name__ == "__main__":
  main()
