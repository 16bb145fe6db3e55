"""Writes the config-key reference generated from the schema to stdout:

  python -m sora_jax.configs.reference > docs/reference/config-keys.md
"""

from sora_jax.configs.schema import reference_markdown

if __name__ == "__main__":
  print(reference_markdown(), end="")
