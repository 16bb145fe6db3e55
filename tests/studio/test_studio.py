"""The web studio (`sora-jax studio`, sora_jax/studio/): every mode through the engine,
refused requests and uploads, a real headless browser against the served command, and a
bounded load test.

The model is `tests/fixtures/workdir_0_1` (the test config after 2 steps): what it draws
is noise, which is all a test of the studio needs. The browser test drives Debian's
Chromium (`/usr/bin/chromium`, package `chromium`) with Playwright; it is skipped where
no Chromium is installed, unless SORA_JAX_REQUIRE_BROWSER is set (CI sets it, .ci/run).
SORA_JAX_SCREENSHOTS=DIR keeps its screenshots there (docs/images/ holds the committed
ones).
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import imageio.v2 as imageio
import numpy as np
import pytest

from experiments.studio_load import free_port
from helpers import subprocess_env
from sora_jax.provenance import manifest, watermark
from sora_jax.studio.engine import Limits, Request, Studio, StudioError, check_upload

pytestmark = pytest.mark.xdist_group("studio")
FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "workdir_0_1")
PROMPT = "a red circle moves left slowly"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


def wait_for(url: str, process: subprocess.Popen | None = None, seconds: float = 180) -> None:
  deadline = time.time() + seconds
  while time.time() < deadline:
    if process is not None and process.poll() is not None:
      raise AssertionError(f"the studio exited ({process.returncode}): "
                           f"{process.stdout.read()[-2000:]}")
    try:
      with urllib.request.urlopen(url, timeout=5) as response:
        if response.status == 200:
          return
    except OSError:
      time.sleep(0.5)
  raise AssertionError(f"{url} did not answer in {seconds} s")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("studio") / "run")
  shutil.copytree(FIXTURE, path)
  return path


@pytest.fixture(scope="module")
def studio(workdir):
  return Studio.from_workdir(workdir)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  """An image and two videos at the model's size (16x16), and a corrupt .mp4."""
  root = tmp_path_factory.mktemp("uploads")
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
  paths = {"image": str(root / "frame.png"), "video_a": str(root / "a.mp4"),
           "video_b": str(root / "b.gif"), "corrupt": str(root / "corrupt.mp4"),
           "text": str(root / "notes.txt")}
  imageio.imwrite(paths["image"], frames[0])
  imageio.mimwrite(paths["video_a"], list(np.repeat(np.repeat(frames[:4], 4, 1), 4, 2)),
                   fps=8, macro_block_size=1)
  imageio.mimwrite(paths["video_b"], list(frames[2:]), duration=125)
  with open(paths["corrupt"], "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
  with open(paths["text"], "w", encoding="utf-8") as f:
    f.write("not media")
  return paths


def assert_signed_and_marked(studio: Studio, path: str) -> None:
  assert manifest.verify(path, studio.trust_anchors_pem).status == "trusted", path
  assert watermark.detect_file(path).detected, path


def test_limits_are_the_model_sizes(studio):
  # Pixel model, patches 2x4x4, run size 4x16x16: frames in steps of 2, sides of 4.
  lim = studio.limits
  assert lim.frames == tuple(range(2, 17, 2))
  assert lim.heights == lim.widths == tuple(range(8, 33, 4))
  assert not lim.image_frames
  d = studio.defaults()
  assert (d.frames, d.height, d.width) == (4, 16, 16)


def test_every_mode_writes_signed_watermarked_results(studio, media):
  ticks = []
  first = studio.run(Request(prompt=PROMPT, steps=3, seed=1), lambda d, t: ticks.append((d, t)))
  assert ticks == [(1, 3), (2, 3), (3, 3)]
  shapes = studio.sampler.compiled_shapes
  again = studio.run(Request(prompt=PROMPT, steps=3, seed=2), lambda d, t: None)
  assert studio.sampler.compiled_shapes == shapes      # same shape: no new compilation
  requests = {
      "image": Request(prompt=PROMPT, mode="image", steps=2, inputs=[media["image"]]),
      "image_last": Request(prompt=PROMPT, mode="image", steps=2,
                            inputs=[media["image"], media["image"]]),
      "extend": Request(prompt=PROMPT, mode="extend", steps=2, direction="backward",
                        inputs=[media["video_a"]]),
      "loop": Request(prompt=PROMPT, mode="loop", steps=2),
      "connect": Request(prompt=PROMPT, mode="connect", steps=2,
                         inputs=[media["video_a"], media["video_b"]]),
      "edit": Request(prompt=PROMPT, mode="edit", steps=2, strength=0.5,
                      inputs=[media["video_b"]]),
      "picture": Request(prompt=PROMPT, steps=2, output="image"),
  }
  results = {name: studio.run(r) for name, r in requests.items()}
  for result in [first, again, *results.values()]:
    assert os.path.dirname(result.path) == studio.out_dir
    assert result.verdict["c2pa"]["status"] == "trusted"
    assert result.verdict["watermark"]["detected"]
    assert_signed_and_marked(studio, result.path)
    generation = result.verdict["c2pa"]["assertions"]["org.sora_jax.generation"]
    assert (generation["mode"], generation["prompt"]) == (result.request.mode, PROMPT)
  assert results["picture"].path.endswith(".png")
  assert imageio.imread(results["picture"].path).shape == (16 * 8, 16 * 8, 3)
  # Extending a 4-frame clip backwards by one window of 4 (context 2 by default) adds 2.
  assert len(imageio.mimread(results["extend"].path)) > 4
  ingredients = results["connect"].verdict["c2pa"]["ingredients"]
  assert ingredients == ["a.mp4", "b.gif"]
  assert [r.index for r in studio.gallery][-len(requests):] == [
      r.index for r in results.values()]


@pytest.mark.parametrize("values, message", [
    (dict(prompt="  "), "the prompt is empty"),
    (dict(steps=0), "steps 0: must be between 1 and 100"),
    (dict(cfg_scale=40.0), "guidance 40: must be between 1 and 15"),
    (dict(frames=5), "frames 5: this model makes frames in 2, 4, ..., 16"),
    (dict(height=18), "height 18"),
    (dict(mode="dance"), "mode='dance': expected one of"),
    (dict(solver="rk4"), "solver 'rk4'"),
    (dict(mode="connect"), "mode 'connect' takes 2 input files, got 0"),
    (dict(mode="image", inputs=["a", "b", "c"]), "mode 'image' takes 1 to 2 input files, got 3"),
])
def test_requests_out_of_range_are_refused(studio, values, message):
  request = Request(**{"prompt": PROMPT, **values})
  with pytest.raises(StudioError, match=message.replace("(", r"\(").replace(")", r"\)")
                     .replace(".", r"\.")):
    studio.check(request)


def test_bad_uploads_are_refused_in_one_line(studio, media):
  lim = studio.limits
  cases = [
      (media["corrupt"], lim, "corrupt.mp4: cannot read it as an image or video"),
      (media["text"], lim, "notes.txt: unsupported file type"),
      (os.path.join(os.path.dirname(media["text"]), "gone.mp4"), lim, "no file was uploaded"),
      (media["video_a"], Limits(**{**lim.__dict__, "upload_megabytes": 1e-4}), "MB, more than"),
      (media["video_b"], Limits(**{**lim.__dict__, "upload_frames": 2}), "4 frames, more than the 2"),
      (media["video_a"], Limits(**{**lim.__dict__, "upload_side": 32}), "64x64 pixels, larger"),
  ]
  for path, limits, message in cases:
    with pytest.raises(StudioError, match=message) as info:
      check_upload(path, limits)
    assert "\n" not in str(info.value)
  before = len(studio.gallery)
  with pytest.raises(StudioError, match="cannot read"):
    studio.run(Request(prompt=PROMPT, mode="edit", inputs=[media["corrupt"]]))
  assert len(studio.gallery) == before


@pytest.mark.usefixtures("system_tmp")   # gradio_client leaves an empty directory per download
def test_bounded_queue_under_load(studio, tmp_path):
  """20 concurrent requests from 4 clients against a queue of 4 (experiments/studio_load.py):
  each completes or is refused with a message (none lost), the sampler compiles nothing
  for their one shape, and the server's memory does not grow with the requests."""
  from experiments.studio_load import load  # pylint: disable=g-import-not-at-top
  result = load(studio, requests=20, clients=4, queue_size=4, steps=2,
                download_dir=str(tmp_path / "downloads"))
  assert result["lost"] == 0
  assert result["completed"] + result["refused"] == 20
  assert result["completed"] >= 5                  # the running request and the 4 waiting
  assert result["refusal_messages"] in ([], ["Queue is full! Please try again."])
  assert all(os.path.isfile(path) and path.startswith(str(tmp_path / "downloads"))
             for path in result["files"])
  assert result["compiled_during_load"] == 0
  assert result["rss_after_mib"] - result["rss_before_mib"] < 256


def chromium() -> str | None:
  found = shutil.which("chromium") or shutil.which("chromium-browser")
  if found is None and os.environ.get("SORA_JAX_REQUIRE_BROWSER"):
    pytest.fail("SORA_JAX_REQUIRE_BROWSER is set but no Chromium is installed "
                "(apt-get install chromium).")
  return found


@pytest.mark.slow
def test_browser_end_to_end_against_the_served_command(workdir, studio, media, tmp_path):
  """`sora-jax studio` in its own process; headless Chromium types a prompt, generates,
  plays the video, downloads the file (signed and watermarked), inspects it, and sees the
  error of a corrupt upload."""
  executable = chromium()
  if executable is None:
    pytest.skip("no Chromium installed (apt-get install chromium)")
  sync_api = pytest.importorskip("playwright.sync_api")
  shots = os.environ.get("SORA_JAX_SCREENSHOTS") or str(tmp_path)
  port = free_port()
  server = subprocess.Popen(
      [sys.executable, "-m", "sora_jax.cli", "studio", "--workdir", workdir, "--port",
       str(port), "--out", str(tmp_path / "results")],
      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}/"
  try:
    wait_for(url, server)
    with sync_api.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=executable, headless=True,
                                  args=CHROMIUM_FLAGS)
      page = browser.new_page(accept_downloads=True, viewport={"width": 1400, "height": 1000})
      page.goto(url)
      page.locator("#prompt textarea").fill(PROMPT)
      page.locator("#generate").click()
      video = "document.querySelector('#result-video video')"
      page.wait_for_function(f"() => {video} && {video}.readyState >= 2", timeout=180_000)
      page.evaluate(f"() => {{ {video}.currentTime = 0; return {video}.play(); }}")
      page.wait_for_function(f"() => {video}.currentTime > 0", timeout=30_000)
      sync_api.expect(page.locator("#verdict")).to_contain_text("trusted")
      sync_api.expect(page.locator("#verdict")).to_contain_text("Watermark: found")
      page.screenshot(path=os.path.join(shots, "studio-generate.png"), full_page=True)

      with page.expect_download() as download:
        page.locator("#download a").first.click()
      saved = str(tmp_path / download.value.suggested_filename)
      download.value.save_as(saved)
      assert saved.endswith(".mp4")
      assert manifest.verify(saved, studio.trust_anchors_pem).status == "trusted"
      assert watermark.detect_file(saved).detected

      page.get_by_role("tab", name="Inspect a file").click()
      page.locator("#inspect-file input[type=file]").set_input_files(saved)
      sync_api.expect(page.locator("#inspect-report")).to_contain_text("trusted",
                                                                       timeout=60_000)
      sync_api.expect(page.locator("#inspect-report")).to_contain_text("Watermark: found")
      page.screenshot(path=os.path.join(shots, "studio-inspect.png"), full_page=True)

      page.get_by_role("tab", name="Gallery").click()
      sync_api.expect(page.locator("#gallery")).to_contain_text(PROMPT)
      page.locator("#gallery-show").click()                 # result #1: the one above
      sync_api.expect(page.locator("#gallery-verdict")).to_contain_text("0001_text.mp4")
      page.wait_for_function("() => document.querySelector('#gallery-video video')"
                             " && document.querySelector('#gallery-video video').readyState >= 2",
                             timeout=30_000)
      page.screenshot(path=os.path.join(shots, "studio-gallery.png"), full_page=True)

      page.get_by_role("tab", name="Generate").click()
      page.get_by_label("Edit (SDEdit)").check()
      page.locator("#input-a input[type=file]").set_input_files(media["corrupt"])
      page.locator("#generate").click()
      sync_api.expect(page.get_by_text("cannot read it as an image or video").first
                      ).to_be_visible(timeout=60_000)
      page.screenshot(path=os.path.join(shots, "studio-error.png"), full_page=True)
      browser.close()
  finally:
    server.terminate()
    server.wait(timeout=30)


def test_cli_studio_refuses_bad_arguments_in_one_line(capsys):
  from sora_jax.cli import main  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as info:
    main(["sora-jax", "studio", "--workdir", "/nonexistent/run"])
  assert "sora-jax studio:" in str(info.value) and "\n" not in str(info.value)
  with pytest.raises(SystemExit) as info:
    main(["sora-jax", "studio", "--workdir", "x", "--queue-size", "0"])
  assert info.value.code == 2
  assert "--queue-size must be positive" in capsys.readouterr().err
