"""The `sora-jax` console script. Thin: every command calls the library.

  sora-jax train  --config configs/<name>.py[:arg] --workdir DIR [--config.KEY=VALUE ...]
  sora-jax sample --workdir DIR --prompt TEXT --out FILE.mp4|FILE.png [--seed N] [--steps N]
                  [--cfg-scale S] [--frames T --height H --width W]
  sora-jax demo   --config configs/world_tiny.py --workdir DIR [--config.KEY=VALUE ...]
  sora-jax train-vae --config configs/vae_world_tiny.py --workdir DIR [--config.KEY=VALUE ...]
  sora-jax encode-dataset --config configs/world_tiny.py:latent --out DIR [--config.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys

USAGE = __doc__


def _parse_config_flags(prog: str, args: list[str], dir_flag: str = "workdir"):
  """Parses `--config FILE[:arg] --<dir_flag> DIR [--config.a.b=v ...]` with ml_collections."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  values = flags.FlagValues()
  # sys_argv: the overrides are read from these arguments, not the process's sys.argv
  # (so `main([...])` works when called from Python).
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/world_tiny.py.",
                                  flag_values=values, lock_config=True,
                                  sys_argv=[prog] + args)
  flags.DEFINE_string(dir_flag, None, "Output directory (a run's checkpoints, logs, samples).",
                      flag_values=values)
  try:
    values([prog] + args)
  except flags.Error as e:
    raise SystemExit(f"{prog}: {e}") from e
  if values.config is None or values[dir_flag].value is None:
    raise SystemExit(f"{prog}: --config and --{dir_flag} are required.")
  return values.config, values[dir_flag].value


def _sample(prog: str, args: list[str]) -> None:
  parser = argparse.ArgumentParser(prog=prog, description="Generate a video from a prompt.")
  parser.add_argument("--workdir", required=True, help="A training workdir.")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--out", required=True,
                      help="Output .mp4, or .png (the frames side by side; an image for --frames 1).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=None, help="Solver steps (config default).")
  parser.add_argument("--cfg-scale", type=float, default=None, help="Guidance scale.")
  parser.add_argument("--frames", type=int, default=None)
  parser.add_argument("--height", type=int, default=None)
  parser.add_argument("--width", type=int, default=None)
  parser.add_argument("--scale", type=int, default=8, help="Nearest-neighbour upscaling.")
  parser.add_argument("--fps", type=int, default=8)
  opts = parser.parse_args(args)
  if not opts.out.endswith((".mp4", ".png")):
    parser.error("--out must name an .mp4 or .png file.")

  from sora_jax import video_io  # pylint: disable=g-import-not-at-top
  from sora_jax.sample import Sampler  # pylint: disable=g-import-not-at-top
  sampler = Sampler.from_workdir(opts.workdir)
  video = sampler.generate([opts.prompt], [opts.seed], frames=opts.frames, height=opts.height,
                           width=opts.width, steps=opts.steps, cfg_scale=opts.cfg_scale,
                           batch_size=1)[0]
  if opts.out.endswith(".png"):
    path = video_io.write_contact_sheet(opts.out, video[None], scale=opts.scale)
  else:
    path = video_io.write_mp4(opts.out, video, fps=opts.fps, scale=opts.scale)
  print(f"Wrote {path} ({video.shape[0]} frames of {video.shape[1]}x{video.shape[2]}).")


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv if argv is None else argv
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return
  command, args, prog = argv[1], argv[2:], f"sora-jax {argv[1]}"
  if command in ("train", "demo", "train-vae"):
    config, workdir = _parse_config_flags(prog, args)
    from sora_jax.parallel.distributed import initialize_from_env  # pylint: disable=g-import-not-at-top
    initialize_from_env()   # multi-host runs: see sora_jax/parallel/distributed.py
    if command == "train-vae":
      from sora_jax.train.vae_loop import train_vae  # pylint: disable=g-import-not-at-top
      summary = train_vae(config, workdir)
      print(f"Trained the VAE to step {summary['step']} (last loss {summary['loss']:.4f}); "
            f"checkpoints in {workdir}/checkpoints.")
      if summary["eval"]:
        e = summary["eval"]
        print(f"Held-out reconstructions ({e['examples']} clips): PSNR {e['psnr']:.2f} dB "
              f"(first frame {e['psnr_first_frame']:.2f}), SSIM {e['ssim']:.4f}; "
              f"details in {workdir}/vae_eval.json, videos in {workdir}/reconstructions/.")
    elif command == "train":
      from sora_jax.train.loop import train  # pylint: disable=g-import-not-at-top
      summary = train(config, workdir)
      print(f"Trained to step {summary['step']} (last loss {summary['loss']:.4f}); "
            f"checkpoints in {workdir}/checkpoints.")
    else:
      from sora_jax.demo import run_demo  # pylint: disable=g-import-not-at-top
      run_demo(config, workdir)
  elif command == "encode-dataset":
    config, out = _parse_config_flags(prog, args, dir_flag="out")
    from sora_jax.data.latents import encode_dataset  # pylint: disable=g-import-not-at-top
    builder = encode_dataset(config, out)
    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    shape = builder.as_data_source(split="train")[0]["latent"].shape
    print(f"Wrote latents {shape} of {counts} clips to "
          f"{builder.data_dir}; train on them with --config.data.latents_dir={out}.")
  elif command == "sample":
    _sample(prog, args)
  else:
    raise SystemExit(f"sora-jax: unknown command {command!r}.\n{USAGE}")


if __name__ == "__main__":
  main()
