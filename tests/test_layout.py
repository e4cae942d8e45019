"""The binaries in experiments/ hold no library code: none imports another but experiments.cli."""

from __future__ import annotations

import ast
import pathlib

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
ALLOWED = {"experiments", "experiments.cli"}  # `from experiments import cli` names both


def experiments_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every import of an `experiments` module in `path` (any scope)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names
                if alias.name.split(".")[0] == "experiments"]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
        node.module.split(".")[0] == "experiments"):
      found.append((node.lineno, node.module))
      if node.module == "experiments":  # `from experiments import x` imports experiments.x
        found += [(node.lineno, f"experiments.{alias.name}") for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level:  # relative: inside experiments/
      base = "experiments" if node.level == 1 else "<outside experiments>"
      modules = ([f"{base}.{node.module}"] if node.module else
                 [f"{base}.{alias.name}" for alias in node.names])
      found += [(node.lineno, module) for module in modules]
  return found


def test_experiments_import_no_other_experiments_module_but_cli():
  files = sorted(EXPERIMENTS.glob("*.py"))
  assert len(files) > 5, f"no binaries found in {EXPERIMENTS}"
  bad = [f"{path.name}:{line} imports {module}" for path in files
         for line, module in experiments_imports(path) if module not in ALLOWED]
  assert not bad, ("experiments/ binaries must import library modules (medxai_jax) and "
                   "experiments.cli only; move shared code into medxai_jax: " + "; ".join(bad))


def test_the_import_check_catches_every_form(tmp_path):
  source = tmp_path / "binary.py"
  source.write_text("import experiments.demo\nfrom experiments import cli, demo_sections\n"
                    "from experiments.evaluate_explanations import evaluate_run\n"
                    "def f():\n  from . import train\n")
  modules = [module for _, module in experiments_imports(source)]
  assert [m for m in modules if m not in ALLOWED] == [
      "experiments.demo", "experiments.demo_sections", "experiments.evaluate_explanations",
      "experiments.train"]


LIBRARY = EXPERIMENTS.parent / "medxai_jax"
OUTSIDE_THE_PACKAGE = ("configs", "experiments", "benchmarks", "tests")


def top_level_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, top-level package) of every absolute import in `path` (any scope)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.append((node.lineno, node.module.split(".")[0]))
  return found


def test_the_library_imports_nothing_that_is_not_installed_with_it():
  # pip installs medxai_jax only: research code importing it from elsewhere has no configs/.
  files = sorted(LIBRARY.rglob("*.py"))
  assert len(files) > 20, f"no library modules found in {LIBRARY}"
  bad = [f"{path.relative_to(LIBRARY.parent)}:{line} imports {package}" for path in files
         for line, package in top_level_imports(path) if package in OUTSIDE_THE_PACKAGE]
  assert not bad, "medxai_jax must not import the repository's other folders: " + "; ".join(bad)
