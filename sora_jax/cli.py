"""The `sora-jax` console script. Thin: every command calls the library.

  sora-jax train  --config configs/<name>.py[:arg] --workdir DIR [--config.KEY=VALUE ...]
  sora-jax sample --workdir DIR --prompt TEXT --out FILE.mp4|FILE.png [--seed N] [--steps N]
                  [--solver euler|heun|dpmpp_2m] [--cfg-scale S] [--frames T --height H --width W]
                  [--image PATH | --extend VIDEO [--direction D] [--times N] | --loop [VIDEO]
                   | --connect A B | --edit VIDEO --strength S] [--times N] [--context N]
                  [--verbatim] [--given-guidance W]
                  [--sharded]
                  [--no-sign] [--no-watermark] [--record-prompt]
  sora-jax verify FILE [--trust-anchors PEM]
  sora-jax detect FILE [FILE ...] [--json]
  sora-jax demo   --config configs/world_tiny.py --workdir DIR [--config.KEY=VALUE ...]
  sora-jax train-vae --config configs/vae_world_tiny.py --workdir DIR [--config.KEY=VALUE ...]
  sora-jax encode-dataset --config configs/world_tiny.py:latent --out DIR [--config.KEY=VALUE ...]
  sora-jax prepare-data --media DIR --out DIR [--captions FILE.csv|FILE.jsonl] [--workers N]
                  [--config configs/<name>.py[:arg] [--config.media.KEY=VALUE ...]]
  sora-jax import-wan --model-dir DIFFUSERS_DIR --out DIR --config configs/wan2_1_t2v.py:1.3B
  sora-jax export --workdir DIR --to diffusers|safetensors|orbax-params --out DIR [--raw]
                  [--step N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
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


def _prepare_data(prog: str, args: list[str]) -> None:
  """`prepare-data`: a folder of media -> a TFDS dataset (sora_jax.data.folder)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config whose `media` section sets the clip "
                                  "size, fps and resize policy (default: the defaults of "
                                  "sora_jax.data.folder.media_config).", flag_values=values,
                                  lock_config=True, sys_argv=[prog] + args)
  flags.DEFINE_string("media", None, "Folder of videos and images.", flag_values=values)
  flags.DEFINE_string("out", None, "Output directory of the dataset.", flag_values=values)
  flags.DEFINE_string("captions", None, "CSV or JSONL of path -> caption.", flag_values=values)
  flags.DEFINE_integer("workers", None, "Decoding processes (default: media.workers, 0 = "
                       "one per CPU).", flag_values=values)
  try:
    values([prog] + args)
  except flags.Error as e:
    raise SystemExit(f"{prog}: {e}") from e
  if values.media is None or values.out is None:
    raise SystemExit(f"{prog}: --media and --out are required.")
  from sora_jax.data import folder  # pylint: disable=g-import-not-at-top
  if values.config is not None:
    from sora_jax import configs  # pylint: disable=g-import-not-at-top
    settings, workers = configs.media_settings(values.config), values.config.media.workers
  else:
    defaults = folder.media_config()
    settings, workers = folder.MediaSettings.from_dict(defaults), defaults["workers"]
  workers = values.workers if values.workers is not None else workers
  try:
    report = folder.prepare_media(values.media, values.out, settings, values.captions,
                                  workers=workers)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"{prog}: {e}") from e
  counts = ", ".join(f"{n} {split}" for split, n in report.clips.items())
  print(f"Prepared {counts} clips from {report.videos} videos and {report.images} images "
        f"({report.uncaptioned} without a caption; {report.staged_before} files staged by an "
        f"earlier run); skipped {len(report.skipped)} of {report.files} files:")
  for item in report.skipped:
    print(f"  {item['path']}: {item['reason']}")
  print(f"Report: {values.out}/report.json. Train on it with "
        f"--config.data.media_dir={values.out}.")


def _sample(prog: str, args: list[str]) -> None:
  parser = argparse.ArgumentParser(prog=prog, description="Generate a video from a prompt, "
                                   "optionally from an image or videos (sora_jax.prompting).")
  parser.add_argument("--workdir", required=True, help="A training workdir.")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--out", required=True,
                      help="Output .mp4, or .png (the frames side by side; an image for --frames 1).")
  parser.add_argument("--seed", type=int, default=0)
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--image", metavar="PATH", help="Animate this image (image-to-video).")
  mode.add_argument("--extend", metavar="VIDEO", help="Extend this video (see --direction, --times).")
  mode.add_argument("--loop", metavar="VIDEO", nargs="?", const="",
                    help="Append a transition from the end of VIDEO (default: a video generated "
                         "from the prompt) back to its start: a seamless loop.")
  mode.add_argument("--connect", metavar=("A", "B"), nargs=2,
                    help="Generate frames leading from the end of A into the start of B.")
  mode.add_argument("--edit", metavar="VIDEO", help="SDEdit this video under --prompt.")
  parser.add_argument("--direction", choices=("forward", "backward"), default="forward")
  parser.add_argument("--times", type=int, default=1,
                      help="--extend: windows to extend by; --loop/--connect: windows the "
                           "transition spans (see prompting.transition).")
  parser.add_argument("--context", type=int, nargs="+", default=None,
                      help="Given frames per window (default: sample.context_frames); for "
                           "--loop/--connect one number or START END (default: "
                           "prompting.transition_context).")
  parser.add_argument("--verbatim", action="store_true",
                      help="--loop/--connect: keep the input videos' frames as they are where "
                           "the transition meets them, instead of the model's decoding of "
                           "them (see prompting.connect's handover).")
  parser.add_argument("--strength", type=float, default=0.6,
                      help="--edit: share of the schedule re-run (0 keeps the video, 1 ignores it).")
  parser.add_argument("--steps", type=int, default=None, help="Solver steps (config default).")
  parser.add_argument("--solver", default=None, help="euler | heun | dpmpp_2m (config default).")
  parser.add_argument("--cfg-scale", type=float, default=None, help="Text guidance scale.")
  parser.add_argument("--image-cfg-scale", type=float, default=None,
                      help="Guidance scale of given frames (1: off).")
  parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                      default=None, help="Flow times where guidance applies.")
  parser.add_argument("--given-guidance", type=float, default=None,
                      help="Reconstruction guidance weight towards decoding given frames as "
                           "given (latent models; 0: off; config default).")
  parser.add_argument("--frames", type=int, default=None)
  parser.add_argument("--height", type=int, default=None)
  parser.add_argument("--width", type=int, default=None)
  parser.add_argument("--scale", type=int, default=8, help="Nearest-neighbour upscaling.")
  parser.add_argument("--fps", type=int, default=8)
  parser.add_argument("--no-sign", action="store_true",
                      help="Write the output WITHOUT a signed C2PA manifest (the default signs "
                           "with SORA_JAX_C2PA_CERT/KEY or a local development identity).")
  parser.add_argument("--no-watermark", action="store_true",
                      help="Write the output WITHOUT the invisible watermark (embedded by "
                           "default; key: SORA_JAX_WATERMARK_KEY or the public default).")
  parser.add_argument("--record-prompt", action="store_true",
                      help="Put the prompt into the C2PA manifest (off by default).")
  parser.add_argument("--sharded", action="store_true",
                      help="Shard the model over the run's mesh (config mesh and sharding.rules): "
                           "for models larger than one device, e.g. Wan 14B.")
  opts = parser.parse_args(args)
  if not opts.out.endswith((".mp4", ".png")):
    parser.error("--out must name an .mp4 or .png file.")

  import numpy as np  # pylint: disable=g-import-not-at-top
  from sora_jax import prompting, video_io  # pylint: disable=g-import-not-at-top
  from sora_jax.sample import Sampler  # pylint: disable=g-import-not-at-top
  # Credentials first: bad ones fail before any sampling work.
  from sora_jax.provenance import credentials as c2pa_credentials  # pylint: disable=g-import-not-at-top
  try:
    signing = None if opts.no_sign else c2pa_credentials.default_credentials()
  except c2pa_credentials.CredentialError as e:
    raise SystemExit(f"{prog}: C2PA signing credentials: {e}") from e
  mesh = None
  if opts.sharded:
    from sora_jax import configs  # pylint: disable=g-import-not-at-top
    from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
    from sora_jax.train import workdir as wd  # pylint: disable=g-import-not-at-top
    mesh = make_mesh(configs.mesh_shape(wd.load_config(opts.workdir)))
  sampler = Sampler.from_workdir(opts.workdir, mesh=mesh)
  c = sampler.config
  height, width = opts.height or c.world.height, opts.width or c.world.width
  options = dict(steps=opts.steps, cfg_scale=opts.cfg_scale, solver=opts.solver,
                 image_cfg_scale=opts.image_cfg_scale, guidance_interval=opts.guidance_interval,
                 given_guidance=opts.given_guidance)
  prompts, seeds = [opts.prompt], [opts.seed]

  def load(path: str) -> np.ndarray:   # [1, T, H, W, 3] at the model's size
    return video_io.read_media(path, height, width)[None]

  try:
    if opts.image:
      video = prompting.image_to_video(sampler, prompts, load(opts.image)[:, 0], seeds, **options)
    elif opts.extend:
      video = prompting.extend(sampler, prompts, load(opts.extend), seeds,
                               direction=opts.direction, times=opts.times,
                               context=opts.context[0] if opts.context else None,
                               **options)
    elif opts.loop is not None:
      base = (load(opts.loop) if opts.loop else
              sampler.generate(prompts, seeds, height=height, width=width, batch_size=1, **options))
      video = prompting.loop(sampler, prompts, base, seeds, context=opts.context,
                             windows=opts.times, handover=not opts.verbatim, **options)
    elif opts.connect:
      video = prompting.connect(sampler, prompts, load(opts.connect[0]), load(opts.connect[1]),
                                seeds, context=opts.context, windows=opts.times,
                                handover=not opts.verbatim, **options)
    elif opts.edit:
      video = prompting.edit(sampler, prompts, load(opts.edit), seeds, strength=opts.strength,
                             **options)
    else:
      video = sampler.generate(prompts, seeds, frames=opts.frames, height=opts.height,
                               width=opts.width, batch_size=1, **options)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"{prog}: {e}") from e
  video = video[0]
  from sora_jax.provenance import manifest  # pylint: disable=g-import-not-at-top
  from sora_jax.provenance import watermark  # pylint: disable=g-import-not-at-top
  config_sha256 = manifest.config_hash(c)
  mark = None if opts.no_watermark else watermark.marker(config_sha256, sampler.step)
  base, ext = os.path.splitext(opts.out)
  unsigned = f"{base}.unsigned{ext}"     # the output path only ever holds a signed file
  if opts.out.endswith(".png"):
    path = video_io.write_contact_sheet(unsigned, video[None], scale=opts.scale, mark=mark)
  else:
    path = video_io.write_mp4(unsigned, video, fps=opts.fps, scale=opts.scale, mark=mark)
  inputs = tuple(p for p in (opts.image, opts.extend, opts.loop or None, opts.edit,
                             *(opts.connect or ())) if p)
  generation = {"config_sha256": config_sha256, "step": sampler.step,
                "seed": opts.seed, "sampler": dataclasses.asdict(sampler.options(**options)),
                "mode": next((m for m in ("image", "extend", "loop", "connect", "edit")
                              if getattr(opts, m) not in (None, False)), "text"),
                "watermark": ("none" if opts.no_watermark
                              else watermark.describe(config_sha256, sampler.step))}
  if opts.record_prompt:
    generation["prompt"] = opts.prompt
  try:
    message = manifest.sign_output(path, signing, generation=generation, ingredients=inputs,
                                   dest=opts.out)
  finally:
    if os.path.exists(path):
      os.remove(path)
  print(f"Wrote {opts.out} ({video.shape[0]} frames of {video.shape[1]}x{video.shape[2]}).")
  print(message)
  print("NOT watermarked (--no-watermark)." if opts.no_watermark else
        f"Watermarked: payload {generation['watermark']['payload']} "
        f"({generation['watermark']['key']} key); check with `sora-jax detect {opts.out}`.")


def _verify(prog: str, args: list[str]) -> None:
  parser = argparse.ArgumentParser(prog=prog, description="Validate a file's C2PA manifest. "
                                   "Exit 0: valid and chained to a trust anchor; 2: no "
                                   "manifest; 3: tampered; 4: untrusted signer.")
  parser.add_argument("file")
  parser.add_argument("--trust-anchors", metavar="PEM", default=None,
                      help="CA certificates to trust (e.g. ~/.config/sora_jax/c2pa/ca.pem).")
  opts = parser.parse_args(args)
  from sora_jax.provenance import manifest  # pylint: disable=g-import-not-at-top
  anchors = None
  if opts.trust_anchors:
    with open(opts.trust_anchors, encoding="utf-8") as f:
      anchors = f.read()
  result = manifest.verify(opts.file, anchors)
  print(result.summary())
  raise SystemExit(manifest.EXIT_CODES[result.status])


def _export(prog: str, args: list[str]) -> None:
  parser = argparse.ArgumentParser(prog=prog, description="Export a run's parameters "
                                   "(sora_jax/interop/export.py).")
  parser.add_argument("--workdir", required=True, help="A training workdir (or an export).")
  parser.add_argument("--to", required=True, choices=("diffusers", "safetensors", "orbax-params"))
  parser.add_argument("--out", required=True, help="A new directory.")
  parser.add_argument("--raw", action="store_true",
                      help="The raw parameters instead of their EMA (the default, --ema).")
  parser.add_argument("--ema", action="store_true", help="The EMA weights (default).")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint step (latest).")
  opts = parser.parse_args(args)
  from sora_jax.interop.export import export_run  # pylint: disable=g-import-not-at-top
  try:
    files = export_run(opts.workdir, opts.to, opts.out, ema=not opts.raw, step=opts.step)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    raise SystemExit(f"{prog}: {e}") from e
  print(f"Wrote {len(files)} files to {opts.out} ({opts.to}).")


def _import_wan(prog: str, args: list[str]) -> None:
  model_dir = _pop_flag(args, "--model-dir", prog)
  config, out = _parse_config_flags(prog, args, dir_flag="out")
  from sora_jax.interop.wan_import import import_wan  # pylint: disable=g-import-not-at-top
  try:
    import_wan(model_dir, out, config)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    raise SystemExit(f"{prog}: {e}") from e
  print(f"Imported {model_dir} into {out}; sample with `sora-jax sample --workdir {out}`.")


def _pop_flag(args: list[str], flag: str, prog: str) -> str:
  """Removes `flag VALUE` (or `flag=VALUE`) from `args` and returns VALUE."""
  for i, arg in enumerate(args):
    if arg == flag and i + 1 < len(args):
      value = args[i + 1]
      del args[i:i + 2]
      return value
    if arg.startswith(flag + "="):
      del args[i]
      return arg.split("=", 1)[1]
  raise SystemExit(f"{prog}: {flag} is required.")


def _preempted(summary: dict, workdir: str) -> bool:
  if summary.get("preempted"):
    print(f"Preempted: saved step {summary['step']} to {workdir}/checkpoints; run the same "
          "command again to resume.")
  return bool(summary.get("preempted"))


def _train_command(command: str, config, workdir: str) -> None:
  if command == "train-vae":
    from sora_jax.train.vae_loop import train_vae  # pylint: disable=g-import-not-at-top
    summary = train_vae(config, workdir)
    if _preempted(summary, workdir):
      return
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
    if _preempted(summary, workdir):
      return
    print(f"Trained to step {summary['step']} (last loss {summary['loss']:.4f}); "
          f"checkpoints in {workdir}/checkpoints. Data: {summary['data']}.")
  else:
    from sora_jax.demo import run_demo  # pylint: disable=g-import-not-at-top
    run_demo(config, workdir)


def _detect(prog: str, args: list[str]) -> None:
  parser = argparse.ArgumentParser(prog=prog, description="Look for sora_jax's invisible "
                                   "watermark (key: SORA_JAX_WATERMARK_KEY or the public "
                                   "default). Exit 0: found in every file; 1: missing in one "
                                   "or more.")
  parser.add_argument("files", nargs="+")
  parser.add_argument("--json", action="store_true", help="One JSON object per file.")
  opts = parser.parse_args(args)
  import json  # pylint: disable=g-import-not-at-top
  from sora_jax.provenance import watermark  # pylint: disable=g-import-not-at-top
  found = True
  for path in opts.files:
    try:
      result = watermark.detect_file(path)
    except (ValueError, FileNotFoundError) as e:
      raise SystemExit(f"{prog}: {e}") from e
    found &= result.detected
    if opts.json:
      print(json.dumps({"file": path, "detected": result.detected, "score": result.score,
                        "sync_score": result.sync_score, "payload_score": result.payload_score,
                        "payload": f"0x{result.payload:08x}", "model_id": result.model_id,
                        "run_id": result.run_id}))
    else:
      print(f"{path}: {result.summary()}")
  raise SystemExit(0 if found else 1)


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
    from sora_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
    from sora_jax.train.faults import NumericFault  # pylint: disable=g-import-not-at-top
    from sora_jax.data.sources import DataError  # pylint: disable=g-import-not-at-top
    try:
      _train_command(command, config, workdir)
    except (NumericFault, CheckpointError, DataError) as e:
      raise SystemExit(f"{prog}: {e}") from e
  elif command == "encode-dataset":
    config, out = _parse_config_flags(prog, args, dir_flag="out")
    from sora_jax.train.sources import encode_dataset  # pylint: disable=g-import-not-at-top
    builder = encode_dataset(config, out)
    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    shape = builder.as_data_source(split="train")[0]["latent"].shape
    print(f"Wrote latents {shape} of {counts} clips to "
          f"{builder.data_dir}; train on them with --config.data.latents_dir={out}.")
  elif command == "prepare-data":
    _prepare_data(prog, args)
  elif command == "sample":
    _sample(prog, args)
  elif command == "export":
    _export(prog, args)
  elif command == "verify":
    _verify(prog, args)
  elif command == "detect":
    _detect(prog, args)
  elif command == "import-wan":
    _import_wan(prog, list(args))
  else:
    raise SystemExit(f"sora-jax: unknown command {command!r}.\n{USAGE}")


if __name__ == "__main__":
  main()
