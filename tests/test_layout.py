"""The package's shape: imports run one way (no cycles), no private names across modules, the
maths never imports Lightning, Hydra or the command line, and ``import mvmm_monai`` stays cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mvmm_monai

PACKAGE = Path(mvmm_monai.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``mvmm_monai`` import in ``path``, at any depth (lazy ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mvmm_monai"):
            names = [a.name for a in node.names]
            # ``from mvmm_monai.pkg import module`` imports the module itself
            found.append((node.module, names))
            found += [(f"{node.module}.{n}", []) for n in names if f"{node.module}.{n}" in modules]
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("mvmm_monai")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m, _ in _imports(path, modules) if m in modules and m != name and m != "mvmm_monai"}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_taken_across_modules():
    modules = _modules()
    taken = [
        f"{name}: {mod}.{n}"
        for name, path in modules.items()
        for mod, names in _imports(path, modules)
        for n in names
        if n.startswith("_") and not n.startswith("__") and mod != name
    ]
    assert not taken, taken


def test_the_maths_imports_no_framework():
    """mixture/ and registration/ are pure torch: no Lightning, Hydra, file writing or pipeline."""
    forbidden = ("pytorch_lightning", "lightning", "hydra", "omegaconf", "mvmm_monai.pipeline", "mvmm_monai.cohort",
                 "mvmm_monai.cli", "mvmm_monai.files")
    bad = []
    for name, path in _modules().items():
        if not name.startswith(("mvmm_monai.mixture", "mvmm_monai.registration")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad += [f"{name} imports {m}" for m in mods if m and m.startswith(forbidden)]
    assert not bad, bad


def test_cli_is_a_page():
    lines = (PACKAGE / "cli.py").read_text().splitlines()
    assert len(lines) <= 100, f"cli.py has {len(lines)} lines: it should only compose the config and call the library"


def test_import_is_cheap():
    """``import mvmm_monai`` loads neither Lightning nor Hydra (the API is imported on first use)."""
    code = "import sys, mvmm_monai; print(any(m.startswith(('pytorch_lightning', 'hydra')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert callable(mvmm_monai.segment) and callable(mvmm_monai.fit) and mvmm_monai.CLASS_NAMES[1] == "myocardium"
