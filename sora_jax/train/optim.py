"""The optimiser: AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `optim.lr`, then cosine decay to `optim.lr * optim.min_lr_ratio`."""
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices only (not norms, biases or tables of vectors)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW of `optim`; the top-level parameter groups named in `optim.frozen` (e.g.
  `("text_encoder",)` to fine-tune a pretrained transformer with its text encoder fixed)
  are not updated and have no optimiser state."""
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(learning_rate_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2,
                  weight_decay=optim.weight_decay, mask=_decay_mask),
  )
  frozen = tuple(optim.get("frozen", ()))
  if not frozen:
    return tx

  def labels(params):
    unknown = sorted(set(frozen) - set(params))
    if unknown:
      raise ValueError(f"optim.frozen={frozen}: no parameter groups {unknown} (the model has "
                       f"{sorted(params)}).")
    return {k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "train", v)
            for k, v in params.items()}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def ema_update(ema, params, step: jax.Array, decay: float):
  """`ema <- d * ema + (1 - d) * params` with d warmed up as min(decay, (1 + s) / (10 + s))."""
  d = jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
