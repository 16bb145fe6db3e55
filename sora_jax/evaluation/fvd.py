"""Fréchet Video Distance with a pluggable feature extractor.

  FVD = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))

over the features of real and generated videos (Unterthiner et al., 2018), in float64.
Extractors map uint8 videos `[N, T, H, W, 3]` to features `[N, D]`:

  TorchScriptExtractor  a TorchScript I3D the user supplies (the `i3d_torchscript.pt`
                        that StyleGAN-V and others use for FVD): the standard number,
                        comparable with published FVDs at the same clip size
  WorldExtractor        a small 3D convolutional network trained here on the procedural
                        world to name each clip's colours, shapes, directions and object
                        count (`train_world_extractor`); its penultimate features give an
                        FVD computable without downloads, meaningful for this world only
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy import linalg

from sora_jax.data.world import DIRECTIONS, WorldConfig, object_attributes, render_example
from sora_jax.models.convolution import video_conv


class FeatureExtractor(Protocol):
  name: str

  def __call__(self, videos: np.ndarray) -> np.ndarray:
    """uint8 `[N, T, H, W, 3]` -> float `[N, D]`."""


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[D]` and covariance `[D, D]` (float64) of `features [N, D]`."""
  features = np.asarray(features, np.float64)
  return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """The Fréchet distance between two Gaussians (float64; a tiny diagonal offset when the
  product of covariances is singular, as in the reference FID/FVD code)."""
  diff = mu1 - mu2
  with warnings.catch_warnings():      # singular products are handled below
    warnings.simplefilter("ignore")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      offset = np.eye(len(sigma1)) * 1e-6
      covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  covmean = np.real(covmean)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fvd(real: np.ndarray, generated: np.ndarray, extractor: FeatureExtractor,
        batch_size: int = 32) -> float:
  """FVD between uint8 video sets `[N, T, H, W, 3]` under `extractor`."""
  def features(videos):
    return np.concatenate([extractor(videos[i:i + batch_size])
                           for i in range(0, len(videos), batch_size)])
  return frechet_distance(*statistics(features(real)), *statistics(features(generated)))


class TorchScriptExtractor:
  """A TorchScript video network the user supplies (e.g. I3D for the standard FVD).

  Videos are resized to `size x size`, scaled to `value_range` and given as float
  `[N, 3, T, H, W]`; `kwargs` go to the call (StyleGAN-V's I3D: `rescale=False,
  resize=False, return_features=True`, inputs in [-1, 1] at 224x224).
  """

  def __init__(self, path: str, size: int = 224, value_range: tuple[float, float] = (-1.0, 1.0),
               kwargs: dict[str, Any] | None = None, device: str | None = None):
    import torch  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(path):
      raise FileNotFoundError(f"FVD extractor {path!r}: no such file (a TorchScript model, "
                              "e.g. i3d_torchscript.pt).")
    self.torch = torch
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.model = torch.jit.load(path, map_location=self.device).eval()
    self.size, self.value_range = size, value_range
    self.kwargs = dict(rescale=False, resize=False, return_features=True) if kwargs is None else kwargs
    self.name = f"TorchScript {os.path.basename(path)}"

  def __call__(self, videos: np.ndarray) -> np.ndarray:
    torch = self.torch
    x = torch.from_numpy(np.asarray(videos, np.float32)).to(self.device)      # N T H W C
    n, t = x.shape[:2]
    x = x.permute(0, 1, 4, 2, 3).reshape(n * t, 3, *x.shape[2:4])
    x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                        align_corners=False)
    low, high = self.value_range
    x = x / 255.0 * (high - low) + low
    x = x.reshape(n, t, 3, self.size, self.size).permute(0, 2, 1, 3, 4)     # N C T H W
    with torch.no_grad():
      return self.model(x, **self.kwargs).reshape(n, -1).cpu().numpy()


# The world's own extractor ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorldExtractorConfig:
  channels: tuple[int, ...] = (16, 32, 64)
  features: int = 64


class WorldNet(nnx.Module):
  """3D conv net: video `[B, T, H, W, 3]` in [-1, 1] -> features `[B, F]` and, per world
  colour, logits of (present, shape, direction) and the object count. A 1x4x4 patch
  convolution first (cheap on CPU), then 3x3x3 convolutions halving space."""

  def __init__(self, world: WorldConfig, config: WorldExtractorConfig, *, rngs: nnx.Rngs):
    convs = [video_conv(3, config.channels[0], (1, 4, 4), strides=(1, 4, 4), rngs=rngs)]
    width = config.channels[0]
    for c in config.channels[1:]:
      convs.append(video_conv(width, c, (3, 3, 3), strides=(1, 2, 2), rngs=rngs))
      width = c
    self.convs = nnx.List(convs)
    self.features = nnx.Linear(width, config.features, rngs=rngs)
    k = len(world.colours)
    self.heads = nnx.Linear(config.features,
                            k * (1 + len(world.shapes) + len(DIRECTIONS)) + world.max_objects,
                            rngs=rngs)

  def embed(self, video: jax.Array) -> jax.Array:
    x = video
    for conv in self.convs:
      x = jax.nn.gelu(conv(x))
    return jax.nn.gelu(self.features(x.mean(axis=(1, 2, 3))))

  def __call__(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = self.embed(video)
    return features, self.heads(features)


def world_targets(example: dict[str, Any], world: WorldConfig) -> np.ndarray:
  """int32 `[K * 3 + 1]`: per world colour (present, shape, direction; -1 when absent),
  then the object count - 1."""
  k = len(world.colours)
  present, shape, direction = np.zeros(k, np.int32), -np.ones(k, np.int32), -np.ones(k, np.int32)
  for a in object_attributes(example, world):
    c = world.colours.index(a["colour"])
    present[c], shape[c] = 1, world.shapes.index(a["shape"])
    direction[c] = list(DIRECTIONS).index(a["direction"])
  return np.concatenate([present, shape, direction, [int(example["num_objects"]) - 1]])


def split_heads(logits, world: WorldConfig):
  """`[B, heads]` -> logits of (present `[B, K]`, shape `[B, K, S]`, direction
  `[B, K, 4]`, count `[B, max_objects]`), K the world's colours (numpy or jax)."""
  k, s, d = len(world.colours), len(world.shapes), len(DIRECTIONS)
  return (logits[:, :k], logits[:, k:k + k * s].reshape(-1, k, s),
          logits[:, k + k * s:k + k * s + k * d].reshape(-1, k, d),
          logits[:, k + k * s + k * d:])


def split_targets(targets, world: WorldConfig):
  """`world_targets` rows `[B, 3K + 1]` -> (present, shape, direction `[B, K]`, count `[B]`)."""
  k = len(world.colours)
  return targets[:, :k], targets[:, k:2 * k], targets[:, 2 * k:3 * k], targets[:, 3 * k]


def world_loss(logits: jax.Array, targets: jax.Array, world: WorldConfig) -> jax.Array:
  """Cross-entropies of the attribute heads (absent colours' shape/direction ignored)."""
  present_logits, shape_logits, dir_logits, count_logits = split_heads(logits, world)
  present, shape, direction, count = split_targets(targets, world)
  loss = optax.sigmoid_binary_cross_entropy(present_logits, present).mean()
  mask = present.astype(jnp.float32)
  for lg, tg in ((shape_logits, shape), (dir_logits, direction)):
    ce = optax.softmax_cross_entropy_with_integer_labels(lg, jnp.maximum(tg, 0))
    loss += (ce * mask).sum() / jnp.maximum(mask.sum(), 1)
  return loss + optax.softmax_cross_entropy_with_integer_labels(count_logits, count).mean()


def train_world_extractor(world: WorldConfig, workdir: str, steps: int = 600,
                          batch_size: int = 32, seed: int = 0,
                          config: WorldExtractorConfig = WorldExtractorConfig(),
                          log: Callable[[str], None] = print) -> "WorldExtractor":
  """Trains `WorldNet` on freshly rendered clips of `world` and saves it to `workdir`."""
  model = WorldNet(world, config, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adamw(2e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, video, targets):
    def loss_fn(model):
      return world_loss(model(video)[1], targets, world)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    seeds = rng.integers(10_000_000, 20_000_000, batch_size)    # never the dataset's seeds
    examples = [render_example(world, int(s)) for s in seeds]
    video = jnp.asarray(np.stack([e["video"] for e in examples]), jnp.float32) / 127.5 - 1
    targets = jnp.asarray(np.stack([world_targets(e, world) for e in examples]))
    loss = step(model, optimizer, video, targets)
    if (i + 1) % 100 == 0 or i + 1 == steps:
      log(f"world extractor step {i + 1}: loss {float(loss):.4f}")
  os.makedirs(workdir, exist_ok=True)
  state = nnx.state(model, nnx.Param)
  flat = {"/".join(str(k) for k in path): np.asarray(v) for path, v in
          nnx.to_flat_state(state)}
  np.savez(os.path.join(workdir, "world_extractor.npz"), **flat)
  with open(os.path.join(workdir, "world_extractor.json"), "w", encoding="utf-8") as f:
    json.dump({"world": dataclasses.asdict(world), "config": dataclasses.asdict(config),
               "steps": steps, "batch_size": batch_size, "seed": seed}, f, indent=1)
  return WorldExtractor(model, world)


class WorldExtractor:
  """The penultimate features of a trained `WorldNet` (see module docstring)."""

  def __init__(self, model: WorldNet, world: WorldConfig):
    self.model, self.world = model, world
    self.name = "world extractor (trained on the procedural world)"
    self._embed = nnx.jit(lambda m, v: m.embed(v))

  @classmethod
  def load(cls, workdir: str) -> "WorldExtractor":
    meta_path = os.path.join(workdir, "world_extractor.json")
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"{workdir}: no world extractor (train one with "
                              "`python -m experiments.shapes_bench --train-fvd-extractor`).")
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    world = WorldConfig.from_dict(meta["world"])
    config = WorldExtractorConfig(**{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in meta["config"].items()})
    model = WorldNet(world, config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    saved = np.load(os.path.join(workdir, "world_extractor.npz"))
    for path, variable in nnx.to_flat_state(state):
      variable.value = jnp.asarray(saved["/".join(str(k) for k in path)])
    nnx.update(model, state)
    return cls(model, world)

  def __call__(self, videos: np.ndarray) -> np.ndarray:
    x = jnp.asarray(np.asarray(videos), jnp.float32) / 127.5 - 1
    return np.asarray(self._embed(self.model, x), np.float64)

  def accuracy(self, examples: list[dict[str, Any]]) -> dict[str, float]:
    """Held-out accuracy of its heads: colours present, shapes, directions, counts."""
    video = jnp.asarray(np.stack([e["video"] for e in examples]), jnp.float32) / 127.5 - 1
    heads = split_heads(np.asarray(self.model(video)[1]), self.world)
    present, shape, direction, count = split_targets(
        np.stack([world_targets(e, self.world) for e in examples]), self.world)
    seen = present == 1
    return {"colours": float(((heads[0] > 0) == seen).mean()),
            "shapes": float((heads[1].argmax(-1) == shape)[seen].mean()),
            "directions": float((heads[2].argmax(-1) == direction)[seen].mean()),
            "counts": float((heads[3].argmax(-1) == count).mean())}
