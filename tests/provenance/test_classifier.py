"""The generated-vs-real classifier: training separates what differs, ROC AUC, bad input."""

import numpy as np
import pytest

from sora_jax.provenance import classifier


def test_roc_auc_counts_pairs_in_float64():
  positive, negative = np.array([0.9, 0.4, 0.4]), np.array([0.4, 0.1])
  # 6 pairs: 0.9 > 0.4, 0.9 > 0.1, 0.4 > 0.1 twice; the two 0.4 == 0.4 ties count half.
  assert classifier.roc_auc(positive, negative) == pytest.approx((4 + 0.5 * 2) / 6)
  assert classifier.roc_auc(negative, positive) == pytest.approx(0.5 * 2 / 6)


def test_training_separates_speckled_from_flat_videos():
  rng = np.random.default_rng(0)
  flat = np.repeat(rng.integers(0, 256, (48, 1, 1, 1, 3)), 16, axis=3)
  flat = np.broadcast_to(np.repeat(flat, 16, axis=2), (48, 4, 16, 16, 3)).astype(np.uint8)
  speckled = np.clip(flat + rng.normal(0, 25, flat.shape), 0, 255).astype(np.uint8)
  model = classifier.train_classifier(flat[:32], speckled[:32], steps=60, batch_size=16)
  p_real = classifier.generated_probability(model, flat[32:])
  p_gen = classifier.generated_probability(model, speckled[32:])
  assert p_real.shape == p_gen.shape == (16,)
  assert classifier.roc_auc(p_gen, p_real) > 0.95


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="one size"):
    classifier.train_classifier(np.zeros((2, 4, 8, 8, 3), np.uint8),
                                np.zeros((2, 4, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match="even"):
    classifier.train_classifier(np.zeros((2, 4, 8, 8, 3), np.uint8),
                                np.zeros((2, 4, 8, 8, 3), np.uint8), batch_size=3)
