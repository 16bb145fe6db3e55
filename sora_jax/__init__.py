"""sora_jax: text-to-video generation with a diffusion transformer over spacetime patches.

Library layout (data flows one way):
  data/        procedural world (TFDS builder) and the Grain input pipeline
  models/      tokenizer, text encoder, autoencoder, diffusion transformer
  diffusion/   rectified-flow objective and ODE solvers
  parallel/    mesh, logical axis rules, activation sharding constraints
  train/       optimiser, train state, jitted step, Orbax checkpoints, metrics, loop
  sample.py    the jitted sampler
  evaluation/  deterministic analyses of generated videos (colour adherence)
"""

__version__ = "0.1.0"
