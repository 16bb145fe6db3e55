"""The docs that describe the code agree with it."""

import os
import re

import sora_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_architecture_table_is_the_layers_of_the_code():
  with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
    text = f.read()
  rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.M)
  documented = tuple(tuple(re.findall(r"`([\w.]+)`", entries)) for _, entries in rows)
  assert [int(index) for index, _ in rows] == list(range(len(sora_jax.LAYERS)))
  assert documented == sora_jax.LAYERS


def test_relative_links_in_the_docs_resolve():
  pages = [os.path.join(ROOT, "README.md")]
  for folder, _, files in os.walk(os.path.join(ROOT, "docs")):
    pages += [os.path.join(folder, f) for f in files if f.endswith(".md")]
  broken = []
  for page in pages:
    with open(page, encoding="utf-8") as f:
      for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", f.read()):
        if not target.startswith(("http://", "https://", "mailto:")) and not os.path.exists(
            os.path.join(os.path.dirname(page), target)):
          broken.append(f"{os.path.relpath(page, ROOT)} -> {target}")
  assert broken == []


def test_cli_reference_is_generated_from_the_parsers():
  from sora_jax import cli  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, "docs", "reference", "cli.md"), encoding="utf-8") as f:
    committed = f.read()
  assert committed == cli.reference_markdown(), (
      "docs/reference/cli.md is stale: run `sora-jax reference > docs/reference/cli.md`.")
