"""`experiments.head_ceiling`: held-out clips projected onto the best affine subspaces of
patches (principal components), scored by ShapesBench."""

import json
import os

import numpy as np
import pytest

from experiments import head_ceiling


def test_principal_subspace_is_the_best_fit_and_full_rank_reproduces():
  rng = np.random.default_rng(0)
  patches = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 3.0
  mean, basis = head_ceiling.principal_subspace(patches, 2)
  np.testing.assert_allclose(mean, patches.mean(0))
  np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-10)
  # Against the SVD's top right singular vectors of the centred patches (Eckart-Young).
  _, _, vt = np.linalg.svd(patches - mean, full_matrices=False)
  np.testing.assert_allclose(np.abs(basis.T @ vt[:2].T), np.eye(2), atol=1e-8)
  full_mean, full = head_ceiling.principal_subspace(patches, 6)
  np.testing.assert_allclose((patches - full_mean) @ full @ full.T + full_mean, patches,
                             atol=1e-8)


def test_projections_lose_shapes_below_full_rank(tmp_path, data_dir, capsys):
  tiny = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "world_tiny.py:test")
  out = str(tmp_path / "ceiling.json")
  head_ceiling.main(["--config", tiny, f"--config.world.data_dir={data_dir}",
                     "--patch", "2x4x4", "--ranks", "2,96", "--train-clips", "32",
                     "--clips", "6", "--out", out])
  with open(out) as f:
    truth, low, full = json.load(f)["rows"]
  assert truth["psnr_db"] is None and truth["shape"] == 1.0
  assert [low["rank"], full["rank"]] == [2, 96]
  assert full["psnr_db"] > 45 and full["shape"] == truth["shape"]   # uint8 rounding only
  assert low["psnr_db"] < full["psnr_db"]
  assert "| projected onto 96 dimensions |" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_info:
    head_ceiling.main(["--config", tiny, "--patch", "3x4x4"])
  assert exit_info.value.code == 2 and "does not tile" in capsys.readouterr().err


def test_on_a_camera_world_rows_give_the_camera_benchs_columns(tmp_path):
  camera = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "world_camera.py:test")
  out = str(tmp_path / "ceiling.json")
  head_ceiling.main(["--config", camera, f"--config.world.data_dir={tmp_path / 'world'}",
                     "--patch", "2x4x4", "--ranks", "96", "--train-clips", "8", "--clips", "4",
                     "--out", out])
  with open(out) as f:
    truth, full = json.load(f)["rows"]
  assert truth["camera"]["all"]["camera_ok"] == full["camera"]["all"]["camera_ok"]
  assert 0 <= truth["camera"]["all"]["object_direction"] <= 1
