"""The package's shape: no import cycle among its modules, and the layer contracts hold.

The cycle check reads every module with ``ast`` and counts every import, those written
inside functions included (a lazy import still ties two modules together). The layer
contracts are import-linter's (``[tool.importlinter]`` in pyproject.toml, run by
``make lint``); the tests below show that each of them, and the cycle check, fails on a
deliberately added import.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "merge_cli"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package rooted at ``package``."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]
) -> set[str]:
    """The package modules an import statement in ``module`` loads."""
    root = module.split(".")[0]
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            base = base if is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        candidates = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
    found = set()
    for name in candidates:
        if name.split(".")[0] != root:
            continue
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known and name != module:
            found.add(name)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its code."""
    modules = module_names(package)
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name] |= _imported(node, name, path.name == "__init__.py", known)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def _copy_with_import(tmp_path: Path, module_file: str, statement: str) -> Path:
    """A copy of the package (and pyproject.toml) with ``statement`` added to a module."""
    target = tmp_path / "merge_cli"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    path = target / module_file
    path.write_text(path.read_text() + f"\n\ndef _violation() -> None:\n    {statement}\n")
    return target


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 80  # every module was read
    # imports inside functions count: the commands import the pipeline when they run
    assert "merge_cli.pipeline" in graph["merge_cli.cli.app"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_back_import_inside_a_function(tmp_path):
    """A lazy import from the engine back up to the pipeline closes a cycle."""
    copy = _copy_with_import(tmp_path, "engine/plan.py", "from merge_cli import pipeline  # noqa")
    cycle = find_cycle(import_graph(copy))
    assert cycle is not None
    assert cycle[0] == cycle[-1]
    assert "merge_cli.engine.plan" in cycle and "merge_cli.pipeline" in cycle


def _lint_imports() -> Path:
    path = Path(sys.executable).parent / "lint-imports"
    if not path.exists():
        pytest.skip("import-linter is not installed (make test installs it)")
    return path


def test_the_import_contracts_hold():
    result = subprocess.run(
        [str(_lint_imports())], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout
    assert _verdicts(result.stdout) == dict.fromkeys(CONTRACTS, "KEPT")


@pytest.mark.parametrize(
    "module_file, statement, broken_contracts",
    [
        # a stage reaching up to the pipeline: also a layer violation
        (
            "align/stage.py",
            "from merge_cli import pipeline",
            {"Layers:", "No stage imports the pipeline"},
        ),
        # the engine reaching up to a stage
        ("engine/plan.py", "from merge_cli.fuse import METHODS", {"Layers:"}),
        # the schema reaching for anything but its errors (progress is a lower layer)
        (
            "recipe.py",
            "from merge_cli import progress",
            {"The recipe schema imports nothing of merge-cli but its errors"},
        ),
    ],
)
def test_each_import_contract_fails_on_a_violating_import(
    tmp_path, module_file, statement, broken_contracts
):
    _copy_with_import(tmp_path, module_file, statement)
    broken = subprocess.run(
        [str(_lint_imports()), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert _verdicts(broken.stdout) == {
        name: "BROKEN" if name in broken_contracts else "KEPT" for name in CONTRACTS
    }


CONTRACTS = [
    "Layers:",
    "No stage imports the pipeline",
    "The recipe schema imports nothing of merge-cli but its errors",
]


def _verdicts(report: str) -> dict[str, str]:
    """Each contract's verdict (KEPT or BROKEN) in lint-imports' report, whose lines wrap."""
    text = " ".join(report.split())
    verdicts = {}
    for name in CONTRACTS:
        after = text[text.index(name) :]
        kept, broken = after.find(" KEPT"), after.find(" BROKEN")
        verdicts[name] = "BROKEN" if broken != -1 and (kept == -1 or broken < kept) else "KEPT"
    return verdicts
