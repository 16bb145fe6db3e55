"""How far spatially tiled VAE encoding/decoding is from whole-frame encoding/decoding.

  python -m experiments.vae_tiling --vae runs/vae [--tiles 32:16,48:16] [--out vae_tiling.json]

Held-out clips of the world are laid out 2x2 into larger frames ([2, T, 2H, 2W, 3]) and
encoded whole and in overlapping tiles (`tiled_encode`: tile and overlap in pixels),
then decoded whole and in tiles (`tiled_decode`, the same tiles in latent pixels).
Reported: the latent difference relative to the latents' std (max and mean), the PSNR
of the tiled decode against the whole decode, and the reconstruction PSNR of the fully
tiled round trip next to the whole one.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import jax.numpy as jnp
from flax import nnx
import numpy as np

from experiments.report import report
from sora_jax.evaluation.reconstruction import psnr_ssim
from sora_jax.models.vae import tiled_decode, tiled_encode
from sora_jax.train.vae_loop import held_out_videos, load_vae


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vae", required=True, help="A train-vae workdir.")
  parser.add_argument("--tiles", default="32:16,48:16", help="tile:overlap pairs, in pixels.")
  parser.add_argument("--out", default="vae_tiling.json")
  args = parser.parse_args(argv)

  vae, config = load_vae(args.vae)
  fs = vae.config.compression[1]
  v = held_out_videos(config, 8)
  big = np.concatenate([np.concatenate([v[0:2], v[2:4]], 2),
                        np.concatenate([v[4:6], v[6:8]], 2)], 3)       # [2, T, 2H, 2W, 3]
  whole = nnx.jit(lambda model, x: model.encode(x)[0])(vae, big)
  whole_video = nnx.jit(lambda model, z: model.decode(z))(vae, whole)
  whole_psnr = float(psnr_ssim(big, whole_video)[0].mean())
  rows = []
  for pair in args.tiles.split(","):
    tile, overlap = (int(x) for x in pair.split(":"))
    tiled = tiled_encode(vae, big, tile=tile, overlap=overlap)
    diff = jnp.abs(tiled - whole) / whole.std()
    decode = lambda z, t=tile, o=overlap: tiled_decode(vae, z, tile=t // fs, overlap=o // fs)
    rows.append({
        "tile": tile, "overlap": overlap, "frame": list(big.shape[2:4]),
        "latent_max_rel": float(diff.max()), "latent_mean_rel": float(diff.mean()),
        "decode_psnr_vs_whole": float(psnr_ssim(whole_video, decode(whole))[0].mean()),
        "round_trip_psnr": float(psnr_ssim(big, decode(tiled))[0].mean()),
        "whole_round_trip_psnr": whole_psnr})
  report(rows, [
      ("tile / overlap (px)", lambda r: f"{r['tile']} / {r['overlap']} of {r['frame'][0]}x{r['frame'][1]}"),
      ("latent max / mean abs diff (x std)", lambda r: f"{r['latent_max_rel']:.3f} / {r['latent_mean_rel']:.4f}"),
      ("tiled decode vs whole (PSNR dB)", lambda r: f"{r['decode_psnr_vs_whole']:.1f}"),
      ("round trip PSNR, tiled vs whole (dB)", lambda r: f"{r['round_trip_psnr']:.2f} vs {r['whole_round_trip_psnr']:.2f}"),
  ], args.out, vae=args.vae)


if __name__ == "__main__":
  main()
