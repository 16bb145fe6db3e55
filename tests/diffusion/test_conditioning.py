"""Frame-conditioning masks, inputs and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import conditioning

PROBS = dict(none=0.2, first=0.2, first_k=0.2, last_k=0.2, first_last=0.1, random=0.1)


def test_masks_follow_their_kinds_and_leave_a_free_frame():
  masks = np.asarray(conditioning.sample_frame_masks(jax.random.PRNGKey(0), 4000, 8, PROBS, 3))
  assert masks.shape == (4000, 8) and masks.dtype == bool
  assert (~masks).any(-1).all()                                     # a frame is always free
  given = masks.sum(-1)
  assert abs((given == 0).mean() - 0.2) < 0.03                      # "none" (+ rare random)
  prefix = np.array([m[:m.sum()].all() and m.sum() > 0 for m in masks])
  only_first = np.array([m[0] and m.sum() == 1 for m in masks])
  # first + first_k (k = 1 counts as "first" too) + random prefixes.
  assert 0.35 < prefix.mean() < 0.5
  assert only_first.mean() > 0.2 + 0.2 / 3 - 0.03
  # first_k/last_k/first_last never give more than max_frames at each end.
  suffix = np.array([m[-m.sum():].all() and m.sum() > 0 and not m[0] for m in masks])
  assert 0.15 < suffix.mean() < 0.3
  assert masks.sum(-1).max() <= 7


def test_one_frame_clips_are_never_conditioned():
  masks = conditioning.sample_frame_masks(jax.random.PRNGKey(1), 64, 1, dict(first=1.0), 2)
  assert not np.asarray(masks).any()


def test_conditioning_input_and_masked_loss():
  clean = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 3, 3, 2))
  mask = jnp.array([[True, False, False, True], [False] * 4])
  cond = conditioning.conditioning_input(clean, mask)
  assert cond.shape == (2, 4, 3, 3, 3)
  np.testing.assert_array_equal(cond[0, 0, ..., :2], clean[0, 0])
  np.testing.assert_array_equal(cond[0, 1], 0.0)
  np.testing.assert_array_equal(cond[..., 2], np.broadcast_to(mask[:, :, None, None], (2, 4, 3, 3)))
  noisy = conditioning.conditioning_input(clean, mask, noise_level=0.1, key=jax.random.PRNGKey(1))
  assert 0 < float(jnp.abs(noisy[0, 0, ..., :2] - clean[0, 0]).max()) < 1.0
  with pytest.raises(ValueError, match="key"):
    conditioning.conditioning_input(clean, mask, noise_level=0.1)

  pred, target = jnp.zeros_like(clean), clean
  loss = conditioning.masked_mse(pred, target, mask)
  np.testing.assert_allclose(loss[0], np.square(np.asarray(clean[0, 1:3])).mean(), rtol=1e-6)
  np.testing.assert_allclose(loss[1], np.square(np.asarray(clean[1])).mean(), rtol=1e-6)
  # Predictions on given frames do not count.
  changed = pred.at[0, 0].set(100.0)
  np.testing.assert_allclose(conditioning.masked_mse(changed, target, mask), loss)


def test_latent_frame_mask_of_a_causal_autoencoder():
  # 9 frames, temporal factor 4: latents {0}, {1..4}, {5..8}.
  mask = jnp.array([[True] * 5 + [False] * 4, [True] * 4 + [False] * 5,
                    [False] * 5 + [True] * 4])
  np.testing.assert_array_equal(conditioning.latent_frame_mask(mask, 4),
                                [[True, True, False], [True, False, False], [False, False, True]])
  np.testing.assert_array_equal(conditioning.latent_frame_mask(mask, 1), mask)
  with pytest.raises(ValueError, match="temporal factor"):
    conditioning.latent_frame_mask(mask[:, :8], 4)
