"""The package's shape: one layer order without cycles (lazy imports included), files and functions
of a readable size, every file seen by the linter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pijepa"
# Each layer may import from itself and the layers before it, never from a later one.
LAYERS = (
    ("runtime",),
    ("masks",),
    ("models", "losses"),
    ("data",),
    ("parallel",),
    ("config",),
    ("plan",),  # below train: the trainer asks it for the micro-batch (data.batch_size: auto)
    ("train",),
    ("eval", "bench", "rehearsal"),
    ("commands",),
    ("cli", "__main__", "__init__"),
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def _unit(path: Path) -> str:
    """The layer unit of a file: its subpackage, or the top-level module's name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, imported pijepa unit) for every import that runs, at module level or inside a
    function; `if TYPE_CHECKING:` blocks never run and are left out."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name.split(".")[1]) for a in node.names
                         if a.name.startswith("pijepa.") and a.name.count(".") >= 1)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "pijepa":
                if len(parts) > 1:
                    found.append((node.lineno, parts[1]))
                else:  # from pijepa import x: x is a unit (subpackage or module) or the root
                    found.extend((node.lineno, a.name if a.name in LAYER_OF else "__init__") for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in _package_files()}
    assert units <= set(LAYER_OF), f"add these to LAYERS: {sorted(units - set(LAYER_OF))}"


def test_imports_follow_the_layer_order():
    wrong = []
    for path in _package_files():
        unit = _unit(path)
        for line, target in _imports(ast.parse(path.read_text())):
            if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[unit]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {unit} (layer {LAYER_OF[unit]}) imports "
                             f"{target} (layer {LAYER_OF[target]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_units():
    edges: dict[str, set[str]] = {}
    for path in _package_files():
        unit = _unit(path)
        edges.setdefault(unit, set()).update(t for _, t in _imports(ast.parse(path.read_text())) if t != unit)
    cycles = []

    def walk(node: str, stack: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif len(stack) < len(edges):
                walk(nxt, stack + [nxt])

    for start in sorted(edges):
        walk(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles))[:20])


def test_modules_and_functions_are_of_a_readable_size():
    long_modules, long_functions = [], []
    for path in _package_files():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)


def _tool(name: str) -> Path:
    tool = Path(sys.executable).with_name(name)
    if not tool.exists():
        pytest.skip(f"{name} is not installed in this environment (pip install -e '.[dev]')")
    return tool


def test_ruff_passes():
    r = subprocess.run([str(_tool("ruff")), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def test_mypy_passes():
    """mypy over the package (settings in mypy.ini)."""
    r = subprocess.run([str(_tool("mypy"))], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_ruff_sees_every_python_file():
    ruff = _tool("ruff")
    shown = subprocess.run([str(ruff), "check", "--show-files", "."], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout
    seen = {Path(line.strip()).resolve() for line in shown.splitlines() if line.strip().endswith(".py")}
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    missing = sorted(p for p in tracked if (ROOT / p).resolve() not in seen)
    assert not missing, f"ruff does not check: {missing}"
