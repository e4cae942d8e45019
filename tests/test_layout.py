"""The repository's layout: the binaries in experiments/ hold no library code (none imports
another but experiments.cli), the library imports nothing outside itself, and tests/ mirrors the
code (tests/conftest.py states the convention)."""

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


TESTS = pathlib.Path(__file__).resolve().parent
REPOSITORY = TESTS.parent
# tests/ files that mirror no single module, each with its reason. Keep this short: a test of a
# module goes in that module's file.
NOT_MIRRORED = {
    # Checks across the repository's folders (imports between them, this very convention).
    "test_layout.py",
}
# The shared helpers tests import by name (tests/ is on sys.path, see pyproject.toml).
HELPERS = {"binaries.py", "fake_folders.py", "real_data.py", "resumption.py", "subprocess_env.py",
           "tiny.py"}


def mirrored_module(test_file: pathlib.PurePosixPath, exists) -> str | None:
  """The code path `test_file` (relative to tests/) mirrors, or None when there is none.

  tests/<path>/test_<name>.py mirrors medxai_jax/<path>/<name>.py or the package
  medxai_jax/<path>/<name>/; tests/experiments/ and tests/benchmarks/ mirror those folders'
  modules, and a file directly in tests/ may also mirror a folder of the repository (configs/).
  `exists(relative path)` says whether the repository has that file or folder.
  """
  folder, name = test_file.parent, test_file.name[len("test_"):-len(".py")]
  candidates = [f"medxai_jax/{folder}/{name}.py", f"medxai_jax/{folder}/{name}/__init__.py"]
  if folder.parts and folder.parts[0] in ("experiments", "benchmarks"):
    candidates.append(f"{folder}/{name}.py")
  if not folder.parts:
    candidates.append(f"{name}/__init__.py")
  candidates = [str(pathlib.PurePosixPath(path)) for path in candidates]
  return next((path for path in candidates if exists(path)), None)


def layout_problems(test_files, exists) -> list[str]:
  """What breaks the convention among `test_files` (paths relative to tests/, as strings)."""
  problems = []
  for relative in sorted(test_files):
    path = pathlib.PurePosixPath(relative)
    if path.name == "conftest.py" or (not path.parent.parts and path.name in HELPERS):
      continue
    if not path.name.startswith("test_"):
      problems.append(f"{relative}: neither a test file, a conftest.py nor a helper in tests/")
    elif relative not in NOT_MIRRORED and mirrored_module(path, exists) is None:
      problems.append(f"{relative}: mirrors no module (expected medxai_jax/"
                      f"{path.parent}/{path.name[5:]} or a package of that name)")
  return problems


def test_every_test_file_mirrors_a_module():
  files = [path.relative_to(TESTS).as_posix() for path in TESTS.rglob("*.py")]
  assert len(files) > 40, f"no tests found in {TESTS}"
  assert all(name in files for name in NOT_MIRRORED | HELPERS), "a stale allow-list entry"
  problems = layout_problems(files, lambda relative: (REPOSITORY / relative).exists())
  assert not problems, "tests/ mirrors the code (tests/conftest.py): " + "; ".join(problems)


def test_the_layout_check_catches_what_mirrors_nothing():
  code = {"medxai_jax/train/loop.py", "medxai_jax/data/builders/__init__.py",
          "experiments/demo.py", "configs/__init__.py", "medxai_jax/runs.py"}
  good = ["train/test_loop.py", "data/test_builders.py", "experiments/test_demo.py",
          "test_configs.py", "test_runs.py", "train/conftest.py", "tiny.py", "test_layout.py"]
  bad = ["test_loop.py", "train/test_looping.py", "experiments/test_loop.py",
         "benchmarks/test_demo.py", "train/test_runs.py", "train/tiny.py", "helper.py"]
  problems = layout_problems(good + bad, code.__contains__)
  assert [problem.split(":")[0] for problem in problems] == sorted(bad)
