"""Prompting with images and videos: image-to-video, extension, loops, connections, editing.

Every mode is one or more calls of the jitted `Sampler` with given frames (a model
trained with `conditioning`, see `sora_jax.diffusion.conditioning`) or a source video
(SDEdit, any model). Windows have the model's training length T (`world.frames`):

  image_to_video  frame 0 given, T - 1 generated.
  extend          forward: the last `context` frames start a window whose T - context new
                  frames are appended; backward: the first `context` frames end a window
                  whose new frames are prepended; repeated `times` times (sliding windows,
                  so a video grows to any length at the cost of one window per step).
  connect         A's last frames start a window, B's first frames end it
                  (`transition_context`); the frames between lead from A into B. Returns A,
                  the transition, then B.
  loop            `connect(video, video)`: the transition leads from the video's end back to
                  its start, so the video followed by the transition plays as a seamless loop.
  edit            SDEdit: the video noised to the flow time where the schedule's last
                  `strength` share starts, then denoised under the new prompt.

`generate` runs any of them (or plain text-to-video) by name, for one prompt: what the
command line (`sora-jax sample`) and the studio (`sora_jax.studio`) call.

Videos are uint8 `[N, T, H, W, 3]`, a batch of N (one prompt and seed each).
For latent models, `context` must cover whole latent frames (see `check_context`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sora_jax.sample import Sampler


def window_frames(sampler: Sampler) -> int:
  """The length of a generated window: the model's training length."""
  return int(sampler.config.world.frames)


def check_context(sampler: Sampler, context: int, *, at_end: bool, generated: int) -> None:
  """Raises ValueError unless `context` given frames (at the start of a window, or at its
  end) leave `generated >= 1` new frames and, for a latent model, fill whole latent frames."""
  window = window_frames(sampler)
  if context < 1 or generated < 1:
    raise ValueError(f"context={context}: need at least one given and one new frame in a "
                     f"window of {window} frames.")
  f = sampler.autoencoder.temporal_factor
  whole = (context % f == 0) if at_end else ((context - 1) % f == 0)
  if f > 1 and not whole:
    form = f"a multiple of {f}" if at_end else f"1 + a multiple of {f}"
    raise ValueError(f"context={context}: with a temporal factor of {f}, given frames at the "
                     f"{'end' if at_end else 'start'} of a window must number {form}.")


def _batch(videos: np.ndarray, name: str, min_frames: int = 1) -> np.ndarray:
  videos = np.asarray(videos)
  if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
    raise ValueError(f"{name}: expected uint8 [N, T, H, W, 3], got {videos.dtype} "
                     f"{videos.shape}.")
  if videos.shape[1] < min_frames:
    raise ValueError(f"{name}: {videos.shape[1]} frames, need at least {min_frames}.")
  return videos


def _window(n: int, frames: int, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  return (np.zeros((n, frames) + tuple(shape), np.uint8), np.zeros((n, frames), bool))


def image_to_video(sampler: Sampler, prompts: Sequence[str], images: np.ndarray,
                   seeds: Sequence[int], *, last_images: np.ndarray | None = None,
                   **options) -> np.ndarray:
  """Animates `images` uint8 `[N, H, W, 3]`: videos `[N, T, H, W, 3]` whose frame 0 is the
  image (and whose last frame is `last_images [N, H, W, 3]`, when given)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images: expected uint8 [N, H, W, 3], got {images.shape}.")
  frames = window_frames(sampler)
  given, mask = _window(len(images), frames, images.shape[1:])
  given[:, 0], mask[:, 0] = images, True
  if last_images is not None:
    last_images = np.asarray(last_images)
    if last_images.shape != images.shape:
      raise ValueError(f"last_images: expected {images.shape} like images, got "
                       f"{last_images.shape}.")
    given[:, -1], mask[:, -1] = last_images, True
  return sampler.generate(prompts, seeds, given_video=given, given_frames=mask, **options)


def extend(sampler: Sampler, prompts: Sequence[str], videos: np.ndarray, seeds: Sequence[int],
           *, direction: str = "forward", times: int = 1, context: int | None = None,
           handover: bool = False, **options) -> np.ndarray:
  """Extends `videos [N, T, H, W, 3]` by `times` windows forwards or backwards in time.

  Each window gives the model `context` frames (default `extension_context`: the config's
  `sample.context_frames` fitted to the window) of the current video and keeps its
  `window - context` new frames; window i uses seed `seeds[n] + i`. With `handover`, the
  window's own decoding of the given frames replaces them in the output (see `connect`).
  Returns `[N, T + times * (window - context), H, W, 3]`.
  """
  if direction not in ("forward", "backward"):
    raise ValueError(f"direction={direction!r}: expected 'forward' or 'backward'.")
  if times < 1:
    raise ValueError(f"times={times} must be positive.")
  frames = window_frames(sampler)
  context = context or extension_context(sampler, at_end=direction == "backward")
  check_context(sampler, context, at_end=direction == "backward", generated=frames - context)
  out = _batch(videos, "videos", min_frames=context)
  for i in range(times):
    given, mask = _window(len(out), frames, out.shape[2:])
    if direction == "forward":
      given[:, :context], mask[:, :context] = out[:, -context:], True
    else:
      given[:, -context:], mask[:, -context:] = out[:, :context], True
    window = sampler.generate(prompts, [s + i for s in seeds], given_video=given,
                              given_frames=mask, **options)
    if direction == "forward":
      out = np.concatenate([out[:, :-context], window] if handover
                           else [out, window[:, context:]], axis=1)
    else:
      out = np.concatenate([window, out[:, context:]] if handover
                           else [window[:, :-context], out], axis=1)
  return out


def transition_context(sampler: Sampler, context: int | Sequence[int] | None = None
                       ) -> tuple[int, int]:
  """Given frames `(at the start, at the end)` of a connecting window. Default: a quarter
  window at each end for a pixel model; for a causal latent model (temporal factor f),
  the first frame at the start (latent 0) and f frames (one latent frame) at the end."""
  if context is None:
    f = sampler.autoencoder.temporal_factor
    return (max(1, window_frames(sampler) // 4),) * 2 if f == 1 else (1, f)
  values = (context,) * 2 if isinstance(context, int) else tuple(int(c) for c in context)
  if len(values) != 2:
    raise ValueError(f"context={context}: give one number or (start, end).")
  return values


def extension_context(sampler: Sampler, *, at_end: bool) -> int:
  """Given frames per extension window: `sample.context_frames` (at most the window less
  one frame), or for a latent model, if that does not fill whole latent frames at that end
  of the window, the most that do."""
  context = min(int(sampler.config.sample.context_frames), window_frames(sampler) - 1)
  f = sampler.autoencoder.temporal_factor
  if f > 1:
    context = (context // f) * f if at_end else 1 + ((context - 1) // f) * f
  return max(context, 1)


def transition_frames(sampler: Sampler, *, context: int | Sequence[int] | None = None,
                      windows: int = 1) -> int:
  """How many frames `transition(..., context=context, windows=windows)` generates."""
  frames = window_frames(sampler)
  head, tail = transition_context(sampler, context)
  ahead = (windows - 1) // 2
  extended = (ahead * (frames - extension_context(sampler, at_end=False))
              + (windows - 1 - ahead) * (frames - extension_context(sampler, at_end=True)))
  return frames - head - tail + extended


def transition(sampler: Sampler, prompts: Sequence[str], first: np.ndarray,
               second: np.ndarray, seeds: Sequence[int], *,
               context: int | Sequence[int] | None = None, windows: int = 1,
               **options) -> np.ndarray:
  """Generated frames that lead from the end of `first` into the start of `second` (both
  uint8 `[N, T, H, W, 3]`).

  One window (`windows=1`): `head` given frames of the end of `first` start it, `tail`
  given frames of the start of `second` end it (`context`, see `transition_context`) and
  the `window - head - tail` frames between are returned. With `windows > 1` the
  transition is longer: `first` is first extended forwards by `(windows - 1) // 2`
  windows and `second` backwards by the rest (`extend`, `extension_context` given frames),
  and the connecting window joins the two extensions, so the frames next to either video
  are continuations of it and the jump between the two scenes is made in the middle.
  Extension window i uses seed `seeds[n] + 1 + i`. Returns `[N, gap, H, W, 3]`,
  `gap = transition_frames(sampler, context=context, windows=windows)`.
  """
  first, second = np.asarray(first), np.asarray(second)
  start, window, end, (head, tail) = _join(sampler, prompts, first, second, seeds, context,
                                           windows, False, options)
  frames = window.shape[1]
  return np.concatenate([start[:, first.shape[1]:], window[:, head:frames - tail],
                         end[:, :end.shape[1] - second.shape[1]]], axis=1)


def _join(sampler: Sampler, prompts: Sequence[str], first: np.ndarray, second: np.ndarray,
          seeds: Sequence[int], context: int | Sequence[int] | None, windows: int,
          handover: bool, options: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                  tuple[int, int]]:
  """`first` extended forwards, the connecting window (all its frames, decoded), `second`
  extended backwards (`handover`: with its windows' decodings of their given frames), and
  the window's `(head, tail)` given frames."""
  if windows < 1:
    raise ValueError(f"windows={windows} must be positive.")
  frames = window_frames(sampler)
  head, tail = transition_context(sampler, context)
  check_context(sampler, head, at_end=False, generated=frames - head - tail)
  check_context(sampler, tail, at_end=True, generated=frames - head - tail)
  first = _batch(first, "first", min_frames=head)
  second = _batch(second, "second", min_frames=tail)
  if first.shape[0] != second.shape[0] or first.shape[2:] != second.shape[2:]:
    raise ValueError(f"videos to connect differ in batch or frame size: {first.shape} and "
                     f"{second.shape}.")
  ahead = (windows - 1) // 2
  behind = windows - 1 - ahead
  start, end = first, second
  if ahead:
    start = extend(sampler, prompts, first, [s + 1 for s in seeds], direction="forward",
                   times=ahead, context=extension_context(sampler, at_end=False), **options)
  if behind:
    end = extend(sampler, prompts, second, [s + 1 + ahead for s in seeds],
                 direction="backward", times=behind,
                 context=extension_context(sampler, at_end=True), handover=handover,
                 **options)
  given, mask = _window(len(start), frames, start.shape[2:])
  given[:, :head], mask[:, :head] = start[:, -head:], True
  given[:, -tail:], mask[:, -tail:] = end[:, :tail], True
  window = sampler.generate(prompts, seeds, given_video=given, given_frames=mask, **options)
  return start, window, end, (head, tail)


def connect(sampler: Sampler, prompts: Sequence[str], first: np.ndarray, second: np.ndarray,
            seeds: Sequence[int], *, context: int | Sequence[int] | None = None,
            windows: int = 1, handover: bool = True, **options) -> np.ndarray:
  """`first`, a generated transition (`transition`), then `second`: `[N, T1 + gap + T2, H, W, 3]`.

  `handover` (default): where the generated frames meet frames the model was given at the
  end of a window (`second`'s first frames, or over several windows the backward
  extension's), the output shows the window's own decoding of those given frames instead
  of the input's. A pixel model returns them exactly, so nothing changes; a causal latent
  model decodes them after the generated latents, continuous with what precedes them: the
  decoder made the generated frames lead into its decoding, while the input's own first
  frame can be far from the last generated one. The price is that first frame (the first
  of its latent group), which comes back further from the input than the autoencoder's
  reconstruction error unless reconstruction guidance (the `given_guidance` option, see
  `sora_jax.sample.reconstruction_guided`) makes the generated latents ones after which
  it decodes as given (docs/results/prompting.md measures all three). `handover=False` keeps `first` and
  `second` verbatim.
  """
  start, window, end, (head, tail) = _join(sampler, prompts, first, second, seeds, context,
                                           windows, handover, options)
  # `start` ends with `first`'s frames and `end` begins with `second`'s (or their backward
  # extension's): the window's tail either replaces the latter or is dropped.
  if handover:
    return np.concatenate([start, window[:, head:], end[:, tail:]], axis=1)
  return np.concatenate([start, window[:, head:window.shape[1] - tail], end], axis=1)


def loop(sampler: Sampler, prompts: Sequence[str], videos: np.ndarray, seeds: Sequence[int],
         *, context: int | Sequence[int] | None = None, windows: int = 1,
         handover: bool = True, **options) -> np.ndarray:
  """`videos` followed by a transition (`transition`, over `windows` windows) back into
  their first frames: played on repeat, the result has no seam. With `handover` (see
  `connect`) the first frames are the window's decoding of them. Returns
  `[N, T + gap, H, W, 3]`."""
  videos = _batch(videos, "videos")
  joined = connect(sampler, prompts, videos, videos, seeds, context=context, windows=windows,
                   handover=handover, **options)
  t = videos.shape[1]
  return np.concatenate([joined[:, -t:], joined[:, t:-t]], axis=1)


def edit(sampler: Sampler, prompts: Sequence[str], videos: np.ndarray, seeds: Sequence[int],
         *, strength: float, **options) -> np.ndarray:
  """SDEdit `videos [N, T, H, W, 3]` towards `prompts`: strength 0 keeps them, 1 ignores them."""
  return sampler.generate(prompts, seeds, source_video=_batch(videos, "videos"),
                          strength=strength, **options)


MODES = ("text", "image", "extend", "loop", "connect", "edit")
INPUTS = {"text": (0, 0), "image": (1, 2), "extend": (1, 1), "loop": (0, 1),
          "connect": (2, 2), "edit": (1, 1)}   # mode -> (fewest, most) input files


def check_inputs(mode: str, count: int) -> None:
  """Raises ValueError unless `mode` is one of `MODES` and takes `count` input files."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {MODES}.")
  fewest, most = INPUTS[mode]
  if not fewest <= count <= most:
    wanted = str(fewest) if fewest == most else f"{fewest} to {most}"
    raise ValueError(f"mode {mode!r} takes {wanted} input files, got {count}.")


def generate(sampler: Sampler, mode: str, prompt: str, seed: int,
             inputs: Sequence[np.ndarray] = (), *, direction: str = "forward",
             times: int = 1, context: Sequence[int] | None = None, handover: bool = True,
             strength: float = 0.6, frames: int | None = None, height: int | None = None,
             width: int | None = None, **options) -> np.ndarray:
  """One video `[1, T, H, W, 3]` uint8 for `prompt` and `seed` in a prompting mode.

  Args:
    mode: one of `MODES`: "text" (text-to-video; `frames` 1: an image), "image" (animate
      inputs[0]; inputs[1], if given, is the last frame), "extend" (inputs[0] by `times`
      windows in `direction`), "loop" (inputs[0], or a video generated from the prompt when
      there is no input, followed by a transition back to its start), "connect" (inputs[0]
      into inputs[1]), "edit" (SDEdit inputs[0] at `strength`).
    inputs: uint8 `[T, H, W, 3]` images (T = 1) or videos at the model's size
      (`video_io.read_media(path, height, width)`), as many as the mode takes (`INPUTS`).
    context: given frames per window (extend: the first number; loop, connect: one number
      or start and end); None: the modes' defaults.
    handover, times: see `connect` / `extend`; frames, height, width: the size of a
      text-to-video clip (the run's size where None); **options: `SamplingOptions` fields
      and `progress` (see `Sampler.generate`).
  """
  check_inputs(mode, len(inputs))
  prompts, seeds = [prompt], [seed]
  batch = [np.asarray(x, np.uint8)[None] for x in inputs]            # [1, T, H, W, 3] each
  if mode == "image":
    last = batch[1][:, 0] if len(batch) > 1 else None
    return image_to_video(sampler, prompts, batch[0][:, 0], seeds, last_images=last,
                          **options)
  if mode == "extend":
    return extend(sampler, prompts, batch[0], seeds, direction=direction, times=times,
                  context=context[0] if context else None, **options)
  if mode == "loop":
    base = batch[0] if batch else sampler.generate(prompts, seeds, height=height,
                                                   width=width, batch_size=1, **options)
    return loop(sampler, prompts, base, seeds, context=context, windows=times,
                handover=handover, **options)
  if mode == "connect":
    return connect(sampler, prompts, batch[0], batch[1], seeds, context=context,
                   windows=times, handover=handover, **options)
  if mode == "edit":
    return edit(sampler, prompts, batch[0], seeds, strength=strength, **options)
  return sampler.generate(prompts, seeds, frames=frames, height=height, width=width,
                          batch_size=1, **options)
