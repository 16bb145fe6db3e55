"""FVD: the Fréchet distance against a float64 reference, and both extractors end to end."""

import numpy as np
import pytest
from scipy import linalg

from sora_jax.data.world import WorldConfig, render_example
from sora_jax.evaluation import fvd

WORLD = WorldConfig(frames=4, height=16, width=16, min_objects=1, max_objects=2)


def test_frechet_distance_matches_its_definition():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(200, 6))
  b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 1.0
  mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
  root = linalg.sqrtm(s1 @ s2).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
  assert fvd.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
  assert fvd.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
  # Two Gaussians with equal covariance: the squared distance of the means.
  assert fvd.frechet_distance(np.zeros(3), np.eye(3), np.ones(3), np.eye(3)) == pytest.approx(3.0)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("fvd"))
  fvd.train_world_extractor(WORLD, workdir, steps=100, batch_size=8, log=lambda _: None,
                            config=fvd.WorldExtractorConfig(features=32))
  return workdir


def test_world_extractor_ranks_corruption_and_round_trips(extractor):
  model = fvd.WorldExtractor.load(extractor)
  real = np.stack([render_example(WORLD, 5_000 + i)["video"] for i in range(96)])
  other = np.stack([render_example(WORLD, 6_000 + i)["video"] for i in range(96)])
  rng = np.random.default_rng(0)
  noisy = np.clip(other.astype(np.int32) + rng.integers(-80, 81, other.shape), 0, 255
                  ).astype(np.uint8)
  blank = np.full_like(other, 40)
  same_world = fvd.fvd(real, other, model)
  assert same_world < fvd.fvd(real, noisy, model) < fvd.fvd(real, blank, model)
  features = model(real[:4])
  assert features.shape == (4, 32) and np.isfinite(features).all()
  np.testing.assert_allclose(fvd.WorldExtractor.load(extractor)(real[:4]), features, rtol=1e-6)


def test_torchscript_extractor_runs_a_user_model(tmp_path):
  torch = pytest.importorskip("torch")

  class Pool(torch.nn.Module):     # stands in for I3D: [N, 3, T, H, W] -> [N, 3]
    def forward(self, x, rescale: bool = False, resize: bool = False,
                return_features: bool = True):
      return x.mean(dim=(2, 3, 4))

  path = str(tmp_path / "pool.pt")
  torch.jit.script(Pool()).save(path)
  extractor = fvd.TorchScriptExtractor(path, size=8)
  videos = np.zeros((2, 3, 16, 16, 3), np.uint8)
  videos[1] = 255
  np.testing.assert_allclose(extractor(videos), [[-1, -1, -1], [1, 1, 1]], atol=1e-6)
  with pytest.raises(FileNotFoundError, match="TorchScript"):
    fvd.TorchScriptExtractor(str(tmp_path / "missing.pt"))
