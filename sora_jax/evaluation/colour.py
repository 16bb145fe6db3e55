"""Deterministic colour adherence: does the generated video show the colour the prompt names?

Pixels further than `threshold` (RGB Euclidean) from the background are foreground;
each foreground pixel votes for its colour (`tracking.label_pixels`: the palette colour
whose blend with the background is nearest); the dominant colour is
the one with most votes over all frames. No learned model is involved.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from sora_jax.data.world import WorldConfig, PALETTE, caption_for
from sora_jax.evaluation.tracking import background_of, label_pixels


def dominant_colour(video: np.ndarray, palette: Mapping[str, Sequence[int]],
                    background: Sequence[int] | None, threshold: float = 60.0) -> str | None:
  """Name of the dominant non-background colour of uint8 `video [T, H, W, 3]` (None if none)."""
  names = list(palette)
  labels = label_pixels(video, [palette[n] for n in names], background, threshold)
  votes = np.bincount(labels[labels >= 0], minlength=len(names))
  return names[int(np.argmax(votes))] if votes.sum() else None


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  colour: str
  shape: str
  direction: str
  speed: str


def single_object_prompts(world: WorldConfig, count: int, seed: int = 0) -> list[Prompt]:
  """`count` prompts naming one shape of one colour, cycling through all combinations in a
  seeded order (every colour appears equally often when count is a multiple of the colours)."""
  rng = np.random.default_rng(seed)
  combos = [(s, d, v[0]) for s in world.shapes for d in world.directions for v in world.speeds]
  order = rng.permutation(len(combos))
  prompts = []
  for i in range(count):
    colour = world.colours[i % len(world.colours)]
    shape, direction, speed = combos[order[(i // len(world.colours)) % len(combos)]]
    text = caption_for([{"colour": colour, "shape": shape, "direction": direction,
                         "speed": speed}])
    prompts.append(Prompt(text, colour, shape, direction, speed))
  return prompts


def colour_score(videos: np.ndarray, expected: Sequence[str], world: WorldConfig,
                 threshold: float = 60.0) -> tuple[float, list[str | None]]:
  """Share of `videos [N, T, H, W, 3]` whose dominant colour is the expected one, and the colours."""
  palette = {name: PALETTE[name] for name in world.colours}
  found = [dominant_colour(v, palette, background_of(world), threshold) for v in videos]
  score = float(np.mean([f == e for f, e in zip(found, expected)])) if len(found) else 0.0
  return score, found
