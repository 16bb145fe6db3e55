"""The studio's web page (Gradio): generate, extend, connect and edit in the browser.

`build(studio)` lays out three tabs over a `Studio` (`sora_jax.studio.engine`):
Generate (every prompting mode, the sampling controls within the model's valid ranges,
progress per transformer evaluation, the result playing in the page, its signed file to
download and its verdicts), Gallery (what this server made, with prompts, settings and
verdicts) and Inspect (the C2PA and watermark verdicts of any uploaded file). Requests go
through Gradio's queue: one runs at a time on the sampler, at most `queue_size` wait, and
the rest are refused with a message. `serve` launches it on localhost by default.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no calls home, before import

import gradio as gr  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from sora_jax.diffusion.solvers import SOLVERS  # noqa: E402  pylint: disable=g-import-not-at-top
from sora_jax.studio.engine import Request, Result, Studio, StudioError  # noqa: E402
from sora_jax.studio.engine import UPLOAD_TYPES  # noqa: E402

MODES = [("Text to video", "text"), ("Image to video", "image"), ("Extend", "extend"),
         ("Loop", "loop"), ("Connect two videos", "connect"), ("Edit (SDEdit)", "edit")]
GALLERY_COLUMNS = ["#", "file", "mode", "prompt", "seed", "sampler", "seconds", "C2PA",
                   "watermark"]
# System fonts only: the page must not fetch anything from the internet.
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"],
                   font_mono=["ui-monospace", "monospace"])


def verdict_markdown(verdict: dict[str, Any]) -> str:
  """The verdicts of `Studio.inspect` as a few lines for the page."""
  c2pa, mark = verdict["c2pa"], verdict["watermark"]
  words = {"trusted": f"trusted (chains to {c2pa.get('trusted_against') or 'a trust anchor'})",
           "untrusted": "valid signature, untrusted signer", "tampered": "TAMPERED",
           "no_manifest": "no manifest", "unreadable": "not readable media"}
  lines = [f"**{verdict['file']}**",
           f"- C2PA: **{words.get(c2pa['status'], c2pa['status'])}**"
           + (f", signed by {c2pa['signer']}" if c2pa.get("signer") else "")
           + (f"; failures: {', '.join(c2pa['failures'])}" if c2pa["failures"] else "")]
  if mark.get("error"):
    lines.append(f"- Watermark: not checked ({mark['error']})")
  else:
    lines.append(f"- Watermark: **{'found' if mark['detected'] else 'not found'}** "
                 f"(score {mark['score']:.2f}"
                 + (f", payload {mark['payload']})" if mark["detected"] else ")"))
  return "\n".join(lines)


def gallery_rows(studio: Studio) -> list[list[Any]]:
  """One row per result, newest first (`GALLERY_COLUMNS`)."""
  rows = []
  for r in reversed(studio.gallery):
    q, v = r.request, r.verdict
    rows.append([r.index, os.path.basename(r.path), q.mode, q.prompt, q.seed,
                 f"{q.solver} {q.steps} steps, guidance {q.cfg_scale:g}", round(r.seconds, 2),
                 v["c2pa"]["status"],
                 f"{'found' if v['watermark']['detected'] else 'not found'} "
                 f"({v['watermark']['score']})"])
  return rows


def _outputs(result: Result) -> tuple[Any, Any, str, str, dict]:
  """(video, image, download, verdict text, manifest assertions) of a result."""
  video = result.path if result.path.endswith(".mp4") else None
  image = result.path if result.path.endswith(".png") else None
  return (gr.update(value=video, visible=video is not None),
          gr.update(value=image, visible=image is not None), result.path,
          verdict_markdown(result.verdict), result.verdict["c2pa"]["assertions"])


def build(studio: Studio, *, title: str = "sora_jax studio") -> gr.Blocks:
  """The page over `studio` (queue it and launch it with `serve`, or mount it yourself)."""
  lim, d = studio.limits, studio.defaults()
  accepted = list(UPLOAD_TYPES)
  with gr.Blocks(title=title) as page:
    gr.Markdown(f"# {title}\nModel: `{studio.sampler.config.model.variant}` at step "
                f"{studio.sampler.step}; clips of {d.frames} frames at {d.height}x{d.width} by "
                "default. Every result is watermarked and carries a signed C2PA manifest.")
    with gr.Tab("Generate"):
      with gr.Row():
        with gr.Column():
          prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                              placeholder="a red circle moves left slowly")
          mode = gr.Radio(MODES, value="text", label="Mode", elem_id="mode")
          output = gr.Radio([("Video", "video"), ("Image", "image")], value="video",
                            label="Output", elem_id="output",
                            info=None if lim.image_frames else
                            "Image: the first frame of a generated clip (this model's "
                            "patches span several frames).")
          first = gr.File(label="Input: image or video (image to video, extend, loop, edit; "
                          "connect: the first video)", file_types=accepted, elem_id="input-a")
          second = gr.File(label="Second input (image to video: the last frame; connect: "
                           "the second video)", file_types=accepted, elem_id="input-b")
          with gr.Accordion("Sampling", open=True):
            solver = gr.Dropdown(list(SOLVERS), value=d.solver, label="Sampler")
            steps = gr.Slider(*lim.steps, value=d.steps, step=1, label="Steps")
            cfg_scale = gr.Slider(*lim.cfg_scale, value=d.cfg_scale, step=0.5,
                                  label="Guidance")
            seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
            with gr.Row():
              frames = gr.Dropdown(list(lim.frames), value=d.frames, label="Frames")
              height = gr.Dropdown(list(lim.heights), value=d.height, label="Height")
              width = gr.Dropdown(list(lim.widths), value=d.width, label="Width")
          with gr.Accordion("Extend, loop, connect, edit", open=False):
            direction = gr.Radio(["forward", "backward"], value="forward",
                                 label="Extend: direction")
            times = gr.Slider(*lim.times, value=1, step=1,
                              label="Windows (extend: added; loop, connect: spanned)")
            strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05,
                                 label="Edit strength (0 keeps the video, 1 ignores it)")
          run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column():
          video = gr.Video(label="Result", autoplay=True, loop=True, interactive=False,
                           elem_id="result-video")
          image = gr.Image(label="Result", type="filepath", interactive=False, visible=False,
                           elem_id="result-image")
          download = gr.File(label="Signed, watermarked file", interactive=False,
                             elem_id="download")
          verdict = gr.Markdown(elem_id="verdict")
          assertions = gr.JSON(label="C2PA assertions", elem_id="assertions")
    with gr.Tab("Gallery"):
      table = gr.Dataframe(headers=GALLERY_COLUMNS, value=gallery_rows(studio),
                           interactive=False, elem_id="gallery")
      with gr.Row():
        pick = gr.Number(value=1, precision=0, minimum=1, label="Show result #",
                         elem_id="gallery-pick")
        show = gr.Button("Show", elem_id="gallery-show")
      g_video = gr.Video(label="Result", interactive=False, autoplay=True, loop=True,
                         elem_id="gallery-video")
      g_image = gr.Image(label="Result", type="filepath", interactive=False, visible=False)
      g_file = gr.File(label="Signed file", interactive=False)
      g_verdict = gr.Markdown(elem_id="gallery-verdict")
      g_assertions = gr.JSON(label="C2PA assertions")
    with gr.Tab("Inspect a file"):
      gr.Markdown("Upload any image or video: its C2PA verdict and the watermark "
                  "detector's score.")
      inspected = gr.File(label="File", elem_id="inspect-file")
      report = gr.Markdown(elem_id="inspect-report")
      report_json = gr.JSON(label="Manifest assertions")

    def generate(prompt_, mode_, output_, first_, second_, solver_, steps_, cfg_, seed_,
                 frames_, height_, width_, direction_, times_, strength_,
                 progress=gr.Progress()):
      request = Request(prompt=prompt_ or "", mode=mode_, seed=int(seed_ or 0), solver=solver_,
                        steps=int(steps_), cfg_scale=float(cfg_), frames=int(frames_),
                        height=int(height_), width=int(width_), direction=direction_,
                        times=int(times_), strength=float(strength_),
                        inputs=[p for p in (first_, second_) if p], output=output_)
      progress((0, request.steps), desc="compiling or queued", unit="evaluations")

      def tick(done: int, total: int) -> None:
        progress((done, total), desc="denoising", unit="evaluations")

      try:
        result = studio.run(request, tick)
      except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from e
      return (*_outputs(result), gallery_rows(studio))

    run.click(generate, [prompt, mode, output, first, second, solver, steps, cfg_scale, seed,
                         frames, height, width, direction, times, strength],
              [video, image, download, verdict, assertions, table], api_name="generate")

    def show_result(index):
      found = [r for r in studio.gallery if index is not None and r.index == int(index)]
      if not found:
        raise gr.Error(f"no result #{index} yet (results: 1 to {len(studio.gallery)}).",
                       print_exception=False)
      return _outputs(found[0])

    show.click(show_result, [pick], [g_video, g_image, g_file, g_verdict, g_assertions],
               api_name="show", concurrency_id="light")

    def inspect_file(path):
      if not path:
        return "", None
      verdict_ = studio.inspect(path)
      return verdict_markdown(verdict_), verdict_["c2pa"]["assertions"]

    inspected.upload(inspect_file, [inspected], [report, report_json], api_name="inspect",
                     concurrency_id="light")
    page.load(lambda: gallery_rows(studio), None, [table], concurrency_id="light")
  return page


def serve(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, queue_size: int = 8,
          block: bool = True, quiet: bool = False) -> gr.Blocks:
  """Queues and launches the page: one generation at a time, at most `queue_size` waiting
  (more are refused with a message). Binds to `host` (localhost unless told otherwise).
  With `block` False it returns once the server is up (tests, notebooks); `page.close()`
  stops it."""
  page = build(studio)
  page.queue(max_size=queue_size, default_concurrency_limit=1)
  page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet,
              show_error=True, allowed_paths=[os.path.abspath(studio.out_dir)],
              ssr_mode=False, theme=gr.themes.Default(**THEME_FONTS),
              footer_links=[])
  return page

