"""The package's layers point one way (`sora_jax.LAYERS`, stated in `sora_jax/__init__.py`).

Every `import` of a `sora_jax` module, at the top of a file or inside a function, is
checked: a module may import from its own layer or a lower one, never a higher one.
Imports inside functions of `sora_jax` modules are allowed only where `DEFERRED_OK`
says why (optional dependencies such as torch or tensorflow are not `sora_jax` modules
and are not checked here).
"""

from __future__ import annotations

import ast
import pathlib
import textwrap

import pytest

import sora_jax

# module (below `sora_jax`) -> why it defers imports of the library
DEFERRED_OK = {
    "cli": "the console script loads a subcommand's library (JAX, TFDS, Orbax) only when "
           "that subcommand runs, so `sora-jax <command> --help` and usage errors answer "
           "at once",
}


def module_imports(root: pathlib.Path, package: str):
  """Yields `(module, imported_module, deferred, line)` for every import of a module of
  `package` in the package at `root` (dotted names below the package)."""
  files = {".".join(p.relative_to(root).with_suffix("").parts): p for p in root.rglob("*.py")}
  modules = {name.removesuffix(".__init__").removesuffix("__init__") for name in files}

  def resolve(name: str) -> str | None:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  for name, path in sorted(files.items()):
    module = name.removesuffix(".__init__").removesuffix("__init__")
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    for node, deferred in _imports(tree, deferred=False):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      else:
        if node.level:
          base = module.split(".") if module else []
          base = base[:len(base) - node.level + (1 if is_package else 0)]
          source = ".".join(base + ([node.module] if node.module else []))
        else:
          source = node.module or ""
          if source != package and not source.startswith(package + "."):
            continue
          source = source[len(package) + 1:]
        targets = [f"{source}.{a.name}".strip(".") for a in node.names] or [source]
        targets = [t if resolve(t) == t else source for t in targets]
        for target in dict.fromkeys(targets):
          found = resolve(target)
          if found and found != module:
            yield module, found, deferred, node.lineno
        continue
      for target in targets:
        if target == package or target.startswith(package + "."):
          found = resolve(target[len(package) + 1:])
          if found and found != module:
            yield module, found, deferred, node.lineno


def _imports(node: ast.AST, deferred: bool):
  for child in ast.iter_child_nodes(node):
    inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    if isinstance(child, (ast.Import, ast.ImportFrom)):
      yield child, deferred
    yield from _imports(child, inner)


def layer_of(module: str, layers) -> int | None:
  """Index of the layer whose longest entry is `module` or a package holding it."""
  best, best_len = None, -1
  for index, entries in enumerate(layers):
    for entry in entries:
      if (module == entry or module.startswith(entry + ".")) and len(entry) > best_len:
        best, best_len = index, len(entry)
  return best


def violations(root: pathlib.Path, package: str, layers, deferred_ok=()) -> list[str]:
  """Every import of a higher layer, of a module no layer names, and every deferred
  import of the package outside `deferred_ok`, as `file:line` messages."""
  found = []
  for module, target, deferred, line in module_imports(root, package):
    where = f"{package}.{module}:{line}"
    low, high = layer_of(module, layers), layer_of(target, layers)
    if module and low is None:
      found.append(f"{where}: module {package}.{module} is in no layer")
    elif module and high is None:
      found.append(f"{where}: imports {package}.{target}, which is in no layer")
    elif module and high > low:
      found.append(f"{where}: layer {low} imports {package}.{target} of higher layer {high}")
    if deferred and layer_of(module, [deferred_ok]) is None:
      found.append(f"{where}: imports {package}.{target} inside a function")
  return found


def test_sora_jax_layers_point_one_way():
  root = pathlib.Path(sora_jax.__file__).parent
  assert violations(root, "sora_jax", sora_jax.LAYERS, tuple(DEFERRED_OK)) == []


def test_every_module_is_in_a_layer():
  root = pathlib.Path(sora_jax.__file__).parent
  for path in root.rglob("*.py"):
    name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    if name != "__init__":
      assert layer_of(name, sora_jax.LAYERS) is not None, name


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


LAYERS = (("models",), ("train",), ("cli",))


@pytest.mark.parametrize("importer, expected", [
    # top-level and deferred, absolute and relative: all caught
    ("from pkg.train import loop\n", "layer 0 imports pkg.train.loop of higher layer 1"),
    ("def f():\n  from pkg.train.loop import run\n",
     "layer 0 imports pkg.train.loop of higher layer 1"),
    ("import pkg.cli\n", "layer 0 imports pkg.cli of higher layer 2"),
    ("from ..train import loop\n", "layer 0 imports pkg.train.loop of higher layer 1"),
])
def test_a_lower_layer_importing_a_higher_one_fails(tmp_path, importer, expected):
  _write(tmp_path / "pkg", {"__init__.py": "", "models/__init__.py": "",
                            "models/dit.py": importer, "train/__init__.py": "",
                            "train/loop.py": "from pkg.models import dit\n", "cli.py": ""})
  found = violations(tmp_path / "pkg", "pkg", LAYERS)
  assert found and all(f.startswith("pkg.models.dit:") for f in found)
  assert any(expected in f for f in found)


def test_downward_imports_pass_and_deferred_ones_need_a_reason(tmp_path):
  _write(tmp_path / "pkg", {"__init__.py": "", "models/__init__.py": "", "models/dit.py": "",
                            "train/__init__.py": "",
                            "train/loop.py": "from pkg.models import dit\n",
                            "cli.py": "def main():\n  from pkg.train import loop\n"})
  assert violations(tmp_path / "pkg", "pkg", LAYERS, deferred_ok=("cli",)) == []
  found = violations(tmp_path / "pkg", "pkg", LAYERS)
  assert found == ["pkg.cli:2: imports pkg.train.loop inside a function"]
