"""`python -m sora_jax.cli`: the `sora-jax` console script."""

from sora_jax.cli import main

if __name__ == "__main__":
  main()
