"""The `sora-jax` commands: each parses its options (`sora_jax.cli.args`) and calls the
library, imported inside the command so that `--help` and usage errors answer at once."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable

from sora_jax.cli.args import (CONFIG_EPILOG, config_parser, make_parser, parse_lora_argument,
                               parse_with_config)

# Training-like commands --------------------------------------------------------------

def _training_command(prog: str, args: list[str], description: str,
                      parser: argparse.ArgumentParser | None = None):
  """`(options, config)` of a command that trains (`--config`, `--workdir`, overrides;
  `parser`: `config_parser`'s with the command's own options), with the multi-host
  runtime started (sora_jax/parallel/distributed.py)."""
  parser = parser or config_parser(prog, description)
  opts, config = parse_with_config(parser, args)
  from sora_jax.parallel.distributed import initialize_from_env  # pylint: disable=g-import-not-at-top
  initialize_from_env()
  return opts, config


def _preempted(summary: dict, workdir: str) -> bool:
  if summary.get("preempted"):
    print(f"Preempted: saved step {summary['step']} to {workdir}/checkpoints; run the same "
          "command again to resume.")
  return bool(summary.get("preempted"))


def train(prog: str, args: list[str]) -> None:
  """`train`: the text-to-video model (a second call on the same workdir resumes)."""
  opts, config = _training_command(
      prog, args, "Train the text-to-video model; the same command on the same workdir "
      "resumes from its last checkpoint.")
  from sora_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  summary = train(config, opts.workdir)
  if not _preempted(summary, opts.workdir):
    print(f"Trained to step {summary['step']} (last loss {summary['loss']:.4f}); "
          f"checkpoints in {opts.workdir}/checkpoints. Data: {summary['data']}.")


def distill(prog: str, args: list[str]) -> None:
  """`distill`: a faster student of a trained run (few-step, or CFG-distilled)."""
  description = ("Distil a trained run or export (--teacher) into a student that samples in "
                 "a few steps with guidance folded in (distill.method=shortcut or "
                 "trajectory; causal: a block-causal teacher's few-step chunks for --stream) "
                 "or in one pass per step (distill.method=guidance); resumes "
                 "like train.")
  parser = config_parser(prog, description)
  parser.add_argument("--teacher", required=True, metavar="DIR",
                      help="The teacher: a training workdir or an export.")
  opts, config = _training_command(prog, args, description, parser)
  from sora_jax.train.distill import distill as run_distill  # pylint: disable=g-import-not-at-top
  summary = run_distill(config, opts.workdir, teacher=opts.teacher)
  if not _preempted(summary, opts.workdir):
    print(f"Distilled ({summary['method']}) to step {summary['step']} (last loss "
          f"{summary['loss']:.4f}); checkpoints in {opts.workdir}/checkpoints. Sample with "
          f"`sora-jax sample --workdir {opts.workdir}`.")


def train_vae(prog: str, args: list[str]) -> None:
  """`train-vae`: the causal video VAE, then its held-out evaluation."""
  opts, config = _training_command(
      prog, args, "Train the causal video VAE (resumes like train), then write its latent "
      "statistics and held-out reconstructions.")
  from sora_jax.train.vae_loop import train_vae  # pylint: disable=g-import-not-at-top
  summary = train_vae(config, opts.workdir)
  if _preempted(summary, opts.workdir):
    return
  workdir = opts.workdir
  print(f"Trained the VAE to step {summary['step']} (last loss {summary['loss']:.4f}); "
        f"checkpoints in {workdir}/checkpoints.")
  if summary["eval"]:
    e = summary["eval"]
    print(f"Held-out reconstructions ({e['examples']} clips): PSNR {e['psnr']:.2f} dB "
          f"(first frame {e['psnr_first_frame']:.2f}), SSIM {e['ssim']:.4f}; "
          f"details in {workdir}/vae_eval.json, videos in {workdir}/reconstructions/.")


def demo(prog: str, args: list[str]) -> None:
  """`demo`: what `make demo` runs."""
  opts, config = _training_command(
      prog, args, "Train the tiny model on the procedural world, sample prompts, score "
      "colour adherence and write signed, watermarked videos.")
  from sora_jax.demo import run_demo  # pylint: disable=g-import-not-at-top
  run_demo(config, opts.workdir)


def encode_dataset(prog: str, args: list[str]) -> None:
  """`encode-dataset`: a latent dataset of the config's source."""
  opts, config = parse_with_config(config_parser(
      prog, "Encode the config's data source with its VAE into a latent dataset "
      "(train on it with --config.data.latents_dir=DIR).", dir_flag="out",
      dir_help="Output directory of the latent dataset."), args)
  from sora_jax.train.sources import encode_dataset  # pylint: disable=g-import-not-at-top
  builder = encode_dataset(config, opts.out)
  counts = {name: split.num_examples for name, split in builder.info.splits.items()}
  shape = builder.as_data_source(split="train")[0]["latent"].shape
  print(f"Wrote latents {shape} of {counts} clips to "
        f"{builder.data_dir}; train on them with --config.data.latents_dir={opts.out}.")


def prepare_data(prog: str, args: list[str]) -> None:
  """`prepare-data`: a folder of media -> a TFDS dataset (sora_jax.data.folder)."""
  parser = config_parser(prog, "Decode a folder of videos and images, cut clips, resize and "
                          "write them as a TFDS ArrayRecord dataset. Rerunning skips files "
                          "already done.", dir_flag="out",
                          dir_help="Output directory of the dataset.", config_required=False)
  parser.add_argument("--media", required=True, metavar="DIR", help="Folder of videos and images.")
  parser.add_argument("--captions", metavar="FILE", help="CSV or JSONL of path -> caption.")
  parser.add_argument("--workers", type=int, default=None,
                      help="Decoding processes (default: media.workers, 0 = one per CPU).")
  opts, config = parse_with_config(parser, args)
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  from sora_jax.data import folder  # pylint: disable=g-import-not-at-top
  if config is not None:
    settings, workers = configs.media_settings(config), configs.typed(config).media.workers
  else:
    defaults = folder.media_config()
    settings, workers = folder.MediaSettings.from_dict(defaults), defaults["workers"]
  workers = opts.workers if opts.workers is not None else workers
  report = folder.prepare_media(opts.media, opts.out, settings, opts.captions, workers=workers)
  counts = ", ".join(f"{n} {split}" for split, n in report.clips.items())
  print(f"Prepared {counts} clips from {report.videos} videos and {report.images} images "
        f"({report.uncaptioned} without a caption; {report.staged_before} files staged by an "
        f"earlier run); skipped {len(report.skipped)} of {report.files} files:")
  for item in report.skipped:
    print(f"  {item['path']}: {item['reason']}")
  print(f"Report: {opts.out}/report.json. Train on it with --config.data.media_dir={opts.out}.")


def import_wan(prog: str, args: list[str]) -> None:
  """`import-wan`: a diffusers Wan 2.1 directory -> a params-only run directory."""
  parser = config_parser(prog, "Import a diffusers Wan 2.1 directory (transformer, UMT5, "
                          "tokenizer; the CLIP image encoder of an image-to-video one) into a "
                          "params-only run that sample, train.init_from and export read.",
                          dir_flag="out", dir_help="A new directory.")
  parser.add_argument("--model-dir", required=True, metavar="DIR",
                      help="A diffusers Wan 2.1 T2V, I2V or FLF2V directory (e.g. "
                      "Wan2.1-T2V-1.3B-Diffusers, Wan2.1-I2V-14B-480P-Diffusers).")
  opts, config = parse_with_config(parser, args)
  from sora_jax.interop.wan_import import import_wan  # pylint: disable=g-import-not-at-top
  import_wan(opts.model_dir, opts.out, config)
  print(f"Imported {opts.model_dir} into {opts.out}; sample with "
        f"`sora-jax sample --workdir {opts.out}`.")


def sample_parser(prog: str) -> argparse.ArgumentParser:
  """`sample`'s options: one `add_argument` per flag, so it is as long as the flag list."""
  parser = make_parser(prog, "Generate a video from a prompt, optionally from an image or videos "
                   "(sora_jax.prompting); the output is watermarked and signed.")
  parser.add_argument("--workdir", required=True, help="A training workdir.")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--out", required=True,
                      help="Output .mp4, or .png (the frames side by side; an image for --frames 1).")
  parser.add_argument("--seed", type=int, default=0)
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--image", metavar="PATH", help="Animate this image (image-to-video).")
  parser.add_argument("--last-image", metavar="PATH",
                      help="With --image: the video's last frame too (first-last-frame).")
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
  add_schedule_arguments(parser)
  parser.add_argument("--image-cfg-scale", type=float, default=None,
                      help="Guidance scale of given frames (1: off).")
  parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                      default=None, help="Flow times where guidance applies.")
  parser.add_argument("--cfg-scale-low", type=float, default=None,
                      help="Two-expert models (Wan 2.2 A14B): the low-noise expert's guidance "
                           "(config default; 0: --cfg-scale).")
  parser.add_argument("--eta", type=float, default=None,
                      help="Stochastic Euler steps: the share of fresh noise in each step "
                           "(0: the ODE; 1: diffusers' stochastic sampling; config default).")
  parser.add_argument("--given-guidance", type=float, default=None,
                      help="Reconstruction guidance weight towards decoding given frames as "
                           "given (latent models; 0: off; config default).")
  parser.add_argument("--cache-threshold", type=float, default=None,
                      help="Step caching: reuse the transformer blocks' last residual while "
                           "the calibrated error stays under this (0: off; config default; "
                           "needs `sora-jax calibrate-cache` for the solver, steps and "
                           "schedule).")
  camera = parser.add_mutually_exclusive_group()
  camera.add_argument("--camera", metavar="MOTION[:SPEED]",
                      help="A camera path for a model trained with camera control "
                           "(model.camera_control): static, pan_left|right|up|down:SPEED "
                           "(a fraction of the frame per frame), zoom_in|out:RATE (per frame); "
                           "text to video only.")
  camera.add_argument("--camera-path", metavar="FILE.json",
                      help="Per-frame cameras: {\"intrinsics\": [T][3][3], \"extrinsics\": "
                           "[T][3][4]} (sora_jax.data.camera.camera_matrices' form).")
  parser.add_argument("--stream", action="store_true",
                      help="Generate autoregressively, a chunk of latent frames at a time after "
                           "a rolling KV cache of the past (block-causal models: "
                           "model.causal_frames), writing frames as they come: OUT.partial.mp4 "
                           "grows while sampling and is signed into --out at the end. Any "
                           "--frames (whole chunks).")
  parser.add_argument("--chunk", type=int, default=None,
                      help="--stream: latent frames per chunk (default: one causal block).")
  parser.add_argument("--window", type=int, default=None,
                      help="--stream: chunks of past the KV cache keeps (default: "
                           "sample.stream_window).")
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
  add_lora_argument(parser, "merged into the transformer before sampling")
  return parser


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of what is sampled and how (`sample`, `calibrate-cache`): the solver, its
  steps, schedule, shift and guidance, and the clip size; None keeps the run's config."""
  parser.add_argument("--steps", type=int, default=None, help="Solver steps (config default).")
  parser.add_argument("--solver", default=None, help="euler | heun | dpmpp_2m (config default).")
  parser.add_argument("--schedule", default=None,
                      help="uniform | flow_sigmas | flow_match_euler (config default).")
  parser.add_argument("--shift", type=float, default=None,
                      help="Timestep shift of the schedule (config default).")
  parser.add_argument("--cfg-scale", type=float, default=None, help="Text guidance scale.")
  parser.add_argument("--frames", type=int, default=None)
  parser.add_argument("--height", type=int, default=None)
  parser.add_argument("--width", type=int, default=None)


def add_lora_argument(parser: argparse.ArgumentParser, what: str) -> None:
  parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                      type=parse_lora_argument,
                      help=f"A LoRA .safetensors file (diffusers/PEFT or original-Wan/ComfyUI "
                           f"naming) {what}, at STRENGTH (default 1); repeat to stack several.")
  parser.add_argument("--lora-low", action="append", default=[], metavar="FILE[:STRENGTH]",
                      type=parse_lora_argument,
                      help="As --lora, into the low-noise expert of a two-expert model (Wan "
                           "2.2 A14B's transformer_2; --lora goes into the high-noise one).")


def sample(prog: str, args: list[str]) -> None:
  """`sample`: one video (or sheet) from a run, in any prompting mode."""
  parser = sample_parser(prog)
  opts = parser.parse_args(args)
  if not opts.out.endswith((".mp4", ".png")):
    parser.error("--out must name an .mp4 or .png file.")
  if opts.stream and (_mode(opts) != "text" or not opts.out.endswith(".mp4")):
    parser.error("--stream generates text to video into an .mp4 (no --image, --extend, "
                 "--loop, --connect or --edit).")
  if not opts.stream and (opts.chunk is not None or opts.window is not None):
    parser.error("--chunk and --window go with --stream.")
  if (opts.camera or opts.camera_path) and (_mode(opts) != "text" or opts.stream):
    parser.error("--camera and --camera-path go with text to video (not with --image, "
                 "--extend, --loop, --connect, --edit or --stream).")
  from sora_jax.provenance import credentials  # pylint: disable=g-import-not-at-top
  from sora_jax.provenance.outputs import write_generated  # pylint: disable=g-import-not-at-top
  from sora_jax.sample import Sampler, SamplingOptions  # pylint: disable=g-import-not-at-top
  # Credentials first: bad ones fail before any sampling work.
  try:
    signing = None if opts.no_sign else credentials.default_credentials()
  except credentials.CredentialError as e:
    raise SystemExit(f"{prog}: C2PA signing credentials: {e}") from e
  mesh = None
  if opts.sharded:
    from sora_jax import configs  # pylint: disable=g-import-not-at-top
    from sora_jax.parallel.sharding import make_mesh  # pylint: disable=g-import-not-at-top
    from sora_jax.train import workdir as wd  # pylint: disable=g-import-not-at-top
    mesh = make_mesh(configs.mesh_shape(wd.load_config(opts.workdir)))
  sampler = Sampler.from_workdir(opts.workdir, mesh=mesh, loras=opts.lora,
                                 loras_low=opts.lora_low)
  c = sampler.config
  height, width = opts.height or c.world.height, opts.width or c.world.width
  # The sampling flags are SamplingOptions' fields by name (strength is --edit's own).
  options = {f.name: getattr(opts, f.name) for f in dataclasses.fields(SamplingOptions)
             if f.name != "strength"}
  if opts.stream:
    _stream(opts, sampler, options, height, width, signing)
    return
  inputs_of_generation = dict(options)
  if opts.camera or opts.camera_path:
    inputs_of_generation["camera"] = _camera(opts, opts.frames or c.world.frames, height, width)
  video = _generate(opts, sampler, inputs_of_generation, height, width)
  generation = {"seed": opts.seed, "sampler": dataclasses.asdict(sampler.options(**options)),
                "mode": _mode(opts)}
  if opts.camera or opts.camera_path:
    generation["camera"] = opts.camera or os.path.basename(opts.camera_path)
  if opts.record_prompt:
    generation["prompt"] = opts.prompt
  inputs = tuple(p for p in (opts.image, opts.last_image, opts.extend, opts.loop or None,
                             opts.edit,
                             *(opts.connect or ())) if p)
  record, message = write_generated(opts.out, video[:1], config=c, step=sampler.step,
                                    generation=generation, signing=signing, ingredients=inputs,
                                    mark=not opts.no_watermark, fps=opts.fps, scale=opts.scale)
  video = video[0]
  print(f"Wrote {opts.out} ({video.shape[0]} frames of {video.shape[1]}x{video.shape[2]}).")
  print(message)
  print("NOT watermarked (--no-watermark)." if opts.no_watermark else
        f"Watermarked: payload {record['watermark']['payload']} "
        f"({record['watermark']['key']} key); check with `sora-jax detect {opts.out}`.")


def _camera(opts: argparse.Namespace, frames: int, height: int, width: int):
  """`[1, T, 21]` packed cameras of `--camera` or `--camera-path` (one clear line if bad)."""
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sora_jax.data import camera  # pylint: disable=g-import-not-at-top
  if opts.camera:
    return camera.named_camera(opts.camera, frames, height, width)[None]
  try:
    with open(opts.camera_path, encoding="utf-8") as f:
      path = json.load(f)
    intrinsics = np.asarray(path["intrinsics"], np.float32)
    extrinsics = np.asarray(path["extrinsics"], np.float32)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"--camera-path {opts.camera_path}: not a JSON file of per-frame "
                     f"\"intrinsics\" and \"extrinsics\" ({type(e).__name__}: {e}).") from e
  if intrinsics.shape != (frames, 3, 3) or extrinsics.shape != (frames, 3, 4):
    raise ValueError(f"--camera-path {opts.camera_path}: expected intrinsics [{frames}, 3, 3] "
                     f"and extrinsics [{frames}, 3, 4], got {intrinsics.shape} and "
                     f"{extrinsics.shape}.")
  return camera.pack_camera(intrinsics, extrinsics)[None]


def _stream(opts: argparse.Namespace, sampler, options: dict, height: int, width: int,
            signing) -> None:
  """`sample --stream`: chunks written as they are made, then signed (see `--stream`)."""
  from sora_jax import autoregressive  # pylint: disable=g-import-not-at-top
  from sora_jax.provenance.outputs import GeneratedStream  # pylint: disable=g-import-not-at-top
  frames = opts.frames or sampler.config.world.frames
  chunks, chunk, window = autoregressive.stream_plan(sampler, frames, height, width,
                                                     opts.chunk, opts.window)
  generation = {"seed": opts.seed, "sampler": dataclasses.asdict(sampler.options(**options)),
                "mode": "stream", "chunk_latents": chunk, "window": window}
  if opts.record_prompt:
    generation["prompt"] = opts.prompt
  stats = autoregressive.StreamStats()
  out, complete = None, False
  try:
    for video in autoregressive.stream(sampler, opts.prompt, opts.seed, frames=frames,
                                       height=height, width=width, chunk_latents=chunk,
                                       window=window, stats=stats, **options):
      if out is None:
        out = GeneratedStream(opts.out, config=sampler.config, step=sampler.step,
                              generation=generation, signing=signing,
                              mark=not opts.no_watermark, fps=opts.fps, scale=opts.scale)
        print(f"Streaming into {out.partial} ({chunks} chunks); first frames after "
              f"{stats.first_frames_s:.1f} s.", flush=True)
      out.write(video)
      print(f"  {out.frames}/{frames} frames", flush=True)
    complete = True
  finally:
    if out is not None:
      record, message = out.finish(complete, stream=autoregressive.stream_summary(stats, chunks))
      print(f"Wrote {opts.out} ({out.frames} frames{'' if complete else ', STOPPED EARLY'}); "
            f"{stats.frames_per_s or 0:.2f} frames/s after the first chunk.")
      print(message)
      if not opts.no_watermark:
        print(f"Watermarked: payload {record['watermark']['payload']}; check with "
              f"`sora-jax detect {opts.out}`.")


def calibrate_cache(prog: str, args: list[str]) -> None:
  """`calibrate-cache`: step caching's calibration of a run, stored beside its weights."""
  parser = make_parser(prog, "Calibrate step caching (sora_jax/diffusion/step_cache.py) for a "
                       "run and a solver/steps/schedule: sample prompts uncached, record the "
                       "transformer blocks' residual norms, store the mean magnitude ratios "
                       "in WORKDIR/step_cache.json (then `sample --cache-threshold`).")
  parser.add_argument("--workdir", required=True, help="A training workdir (or an export).")
  parser.add_argument("--prompts", type=int, default=8,
                      help="Calibration videos: prompts of one object of the run's world, "
                           "cycling through colours, shapes, directions and speeds.")
  parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                      help="A calibration prompt instead (repeat for several).")
  add_schedule_arguments(parser)
  opts = parser.parse_args(args)
  if opts.prompts < 1:
    parser.error("--prompts must be positive.")
  from sora_jax import configs  # pylint: disable=g-import-not-at-top
  from sora_jax.evaluation import colour  # pylint: disable=g-import-not-at-top
  from sora_jax.sample import Sampler  # pylint: disable=g-import-not-at-top
  sampler = Sampler.from_workdir(opts.workdir)
  prompts = opts.prompt or [p.text for p in colour.single_object_prompts(
      configs.world_config(sampler.config), opts.prompts)]
  options = {k: getattr(opts, k) for k in ("steps", "solver", "schedule", "cfg_scale", "shift")}
  ratios = sampler.calibrate_cache(prompts, list(range(len(prompts))), frames=opts.frames,
                                   height=opts.height, width=opts.width, **options)
  path = sampler.save_cache_calibration(opts.workdir)
  key = sampler.options(**options).cache_key
  print(f"Calibrated step caching for {key} on {len(prompts)} prompts: magnitude ratios "
        f"{' '.join(f'{r:.3f}' for r in ratios)}; wrote {path}.")


def _mode(opts: argparse.Namespace) -> str:
  """The prompting mode (`prompting.MODES`) the `sample` options choose."""
  return next((m for m in ("image", "extend", "loop", "connect", "edit")
               if getattr(opts, m) not in (None, False)), "text")


def _generate(opts: argparse.Namespace, sampler, options: dict, height: int, width: int):
  """`[1, T, H, W, 3]` uint8: the video the `sample` options ask for (one prompting mode)."""
  from sora_jax import prompting, video_io  # pylint: disable=g-import-not-at-top
  if opts.last_image and not opts.image:
    raise ValueError("--last-image goes with --image (the first frame).")
  mode = _mode(opts)
  files = {"image": [opts.image, opts.last_image], "extend": [opts.extend],
           "loop": [opts.loop], "connect": list(opts.connect or ()), "edit": [opts.edit],
           "text": []}[mode]
  inputs = [video_io.read_media(path, height, width) for path in files if path]
  return prompting.generate(sampler, mode, opts.prompt, opts.seed, inputs,
                            direction=opts.direction, times=opts.times, context=opts.context,
                            handover=not opts.verbatim, strength=opts.strength,
                            frames=opts.frames, height=opts.height, width=opts.width,
                            **options)


def verify(prog: str, args: list[str]) -> None:
  parser = make_parser(prog, "Validate a file's C2PA manifest. Exit 0: valid and chained to a "
                   "trust anchor; 2: no manifest; 3: tampered; 4: untrusted signer; 5: not a "
                   "media file it can read.")
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


def export(prog: str, args: list[str]) -> None:
  parser = make_parser(prog, "Export a run's parameters (sora_jax/interop/export.py).")
  parser.add_argument("--workdir", required=True,
                      help="A training workdir (or an export); a train-vae workdir exports "
                           "with --to orbax-params (its parameters and latent statistics).")
  parser.add_argument("--to", required=True,
                      choices=("diffusers", "safetensors", "orbax-params", "lora"),
                      help="lora: a LoRA run's adapters as diffusers' LoRA file (a LoRA run's "
                           "other exports hold its merged weights).")
  parser.add_argument("--out", required=True, help="A new directory.")
  parser.add_argument("--raw", action="store_true",
                      help="The raw parameters instead of their EMA (the default, --ema).")
  parser.add_argument("--ema", action="store_true", help="The EMA weights (default).")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint step (latest).")
  add_lora_argument(parser, "merged into the exported weights")
  opts = parser.parse_args(args)
  from sora_jax.interop.export import export_run  # pylint: disable=g-import-not-at-top
  files = export_run(opts.workdir, opts.to, opts.out, ema=not opts.raw, step=opts.step,
                     loras=opts.lora, loras_low=opts.lora_low)
  print(f"Wrote {len(files)} files to {opts.out} ({opts.to}).")


def detect(prog: str, args: list[str]) -> None:
  parser = make_parser(prog, "Look for sora_jax's invisible watermark (key: SORA_JAX_WATERMARK_KEY "
                   "or the public default). Exit 0: found in every file; 1: missing in one or "
                   "more.")
  parser.add_argument("files", nargs="+")
  parser.add_argument("--json", action="store_true", help="One JSON object per file.")
  opts = parser.parse_args(args)
  import json  # pylint: disable=g-import-not-at-top
  from sora_jax.provenance import watermark  # pylint: disable=g-import-not-at-top
  found = True
  for path in opts.files:
    result = watermark.detect_file(path)
    found &= result.detected
    if opts.json:
      print(json.dumps({"file": path, "detected": result.detected, "score": result.score,
                        "sync_score": result.sync_score, "payload_score": result.payload_score,
                        "payload": f"0x{result.payload:08x}", "model_id": result.model_id,
                        "run_id": result.run_id}))
    else:
      print(f"{path}: {result.summary()}")
  raise SystemExit(0 if found else 1)


def studio(prog: str, args: list[str]) -> None:
  """`studio`: the web studio over a run (sora_jax/studio/)."""
  parser = make_parser(prog, "Serve the web studio (Gradio) for a run: text-to-video and "
                       "images, image-to-video, extend, loop, connect and edit in the browser, "
                       "with a gallery and the C2PA and watermark verdicts of every result "
                       "and upload. Results are written watermarked and signed, as `sample` "
                       "writes them.")
  parser.add_argument("--workdir", required=True,
                      help="A run to sample from: trained, imported (import-wan), distilled "
                           "or exported.")
  parser.add_argument("--host", default="127.0.0.1",
                      help="Address to bind (default localhost only; 0.0.0.0 serves the "
                           "network).")
  parser.add_argument("--port", type=int, default=7860)
  parser.add_argument("--out", default=None, help="Where results go (default WORKDIR/studio).")
  parser.add_argument("--queue-size", type=int, default=8,
                      help="Requests that may wait while one generates; more are refused "
                           "with a message.")
  parser.add_argument("--trust-anchors", metavar="PEM", default=None,
                      help="CA certificates the verdicts trust (default: the local "
                           "development CA, when results are signed with it).")
  add_lora_argument(parser, "merged into the transformer")
  opts = parser.parse_args(args)
  if opts.queue_size < 1:
    parser.error("--queue-size must be positive.")
  if not 0 < opts.port < 65536:
    parser.error(f"--port {opts.port}: expected 1 to 65535.")
  try:
    from sora_jax.studio import app  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f"{prog}: the studio needs Gradio ({e}); "
                     "pip install 'sora_jax[studio]'.") from e
  from sora_jax.studio import engine  # pylint: disable=g-import-not-at-top
  anchors = None
  if opts.trust_anchors:
    with open(opts.trust_anchors, encoding="utf-8") as f:
      anchors = f.read()
  server = engine.Studio.from_workdir(opts.workdir, opts.out, loras=opts.lora,
                                      loras_low=opts.lora_low,
                                      trust_anchors_pem=anchors)
  print(f"Serving the studio for {opts.workdir} at http://{opts.host}:{opts.port} "
        f"(results in {server.out_dir}); Ctrl-C stops it.")
  app.serve(server, host=opts.host, port=opts.port, queue_size=opts.queue_size)


# Planning ------------------------------------------------------------------------------

def _boolean(value: str) -> bool:
  """`true` / `false` (any case) -> bool; ValueError otherwise."""
  if value.lower() not in ("true", "false"):
    raise ValueError(value)
  return value.lower() == "true"


# `sora-jax plan --search`'s optional dimensions: (flag, config key, value type, example,
# what). Attention backends apply to meshes that do not split the sequence.
_SEARCH_OPTIONS = (
    ("--search-attention", "model.attention", str, "splash,xla",
     "Attention backends on meshes that do not split the sequence"),
    ("--search-splash-blocks", "model.splash_block", int, "512,1024",
     "Splash attention blocks"),
    ("--search-scan", "model.scan_layers", _boolean, "true,false", "Scanned layers or not"),
    ("--search-token-chunks", "model.token_chunks", int, "1,4",
     "Chunks of tokens of the blocks' per-token work"),
)


def _search_values(text: str, flag: str, kind: Callable[[str], Any], example: str) -> list:
  """A search flag's comma-separated values of `kind`; one line naming the flag if not."""
  try:
    return [kind(v) for v in text.split(",")]
  except ValueError:
    raise SystemExit(f"sora-jax plan: {flag}={text!r}: expected values such as "
                     f"{example}.") from None


def plan(prog: str, args: list[str]) -> None:
  """`plan`: compile a config for a TPU slice on this machine; does it fit?"""
  parser = make_parser(
      prog, "Compile the config's train step (and/or the sampler's model call) for a TPU "
      "slice with libtpu's compiler, on this machine (no TPU, no device memory): per-chip "
      "memory against HBM, collectives, model FLOPs, compile time. Exits 3 when it does "
      "not fit.", epilog=CONFIG_EPILOG)
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]", help="Config file.")
  parser.add_argument("--topology", required=True, metavar="NAME",
                      help="TPU slice, e.g. v5p:2x2x2 (v5p-8), v6e:2x4, v5e:4x4, v4:2x2x1.")
  parser.add_argument("--what", default="train", choices=("train", "sample", "both", "stream"),
                      help="Programs to compile (default: train; stream: a block-causal "
                      "model's streamed chunk after a full KV cache of sample.stream_window "
                      "chunks).")
  parser.add_argument("--json", metavar="FILE", help="Also write the plan as JSON.")
  parser.add_argument("--bound", action="store_true",
                      help="Also a lower bound on the train step's time from the compiler's "
                      "cost model (two more compiles, of 1 and 2 unrolled layers) and the MFU "
                      "upper bound it implies.")
  parser.add_argument("--search", action="store_true",
                      help="Plan the train step for every mesh over the slice's chips (over "
                      "--search-axes), remat policy (--search-remat) and microbatch count "
                      "(--search-microbatches); rank those that fit "
                      "by bytes moved off each chip (collectives, activations offloaded to "
                      "host and back), then memory, and print the best as overrides.")
  parser.add_argument("--search-axes", default="data,fsdp,tensor,sequence", metavar="AXES",
                      help="Mesh axes the search may use (default: all four).")
  parser.add_argument("--search-remat", default="none,dots,dots_offload,full",
                      metavar="POLICIES", help="Remat policies the search tries (default: "
                      "none,dots,dots_offload,full).")
  parser.add_argument("--search-microbatches", default="1", metavar="COUNTS",
                      help="Microbatch counts the search tries (train.microbatches: "
                      "gradients accumulated over them; default: 1, e.g. 1,2,4).")
  for flag, key, _, example, what in _SEARCH_OPTIONS:
    parser.add_argument(flag, metavar="VALUES", help=f"{what} ({key}) the search tries, e.g. "
                        f"{example} (default: the config's).")
  opts, config = parse_with_config(parser, args)
  import json  # pylint: disable=g-import-not-at-top
  from sora_jax.plan import bound, planner, report, search  # pylint: disable=g-import-not-at-top
  if opts.search:
    counts = _search_values(opts.search_microbatches, "--search-microbatches", int, "1,2,4")
    options = {}
    for flag, key, kind, example, _ in _SEARCH_OPTIONS:
      value = getattr(opts, flag[2:].replace("-", "_"))
      if value:
        options[key] = _search_values(value, flag, kind, example)
    rows = search.search(config, opts.topology, axes=opts.search_axes.split(","),
                         remats=opts.search_remat.split(","), microbatches=counts,
                         options=options)
    print(search.format_search(rows, planner.chip_of(opts.topology).hbm_bytes))
    result = {"topology": opts.topology, "search": rows,
              "fits": any(r["fits"] for r in rows)}
  else:
    result = planner.plan(config, opts.topology, opts.what)
    if opts.bound and result["fits"]:
      bound.add_step_time_bound(result, config)
    print(report.format_plan(result))
  if opts.json:
    with open(opts.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  if not result["fits"]:
    raise SystemExit(3)
