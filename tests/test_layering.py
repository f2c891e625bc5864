"""The layering written at the top of emojax/__init__.py holds: every import in emojax/, pipelines/ and kernels/
(those inside functions included) runs down or sideways, never up, and no two modules import each other in a
cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import emojax

REPO = Path(__file__).resolve().parents[1]


def _layers() -> dict[str, int]:
    """unit -> rank, from the "Layers." block of emojax's docstring (one layer a line, lowest first)."""
    block = emojax.__doc__.split("Layers.")[1].split("kernels/")[0]
    lines = [line.split("(")[0].strip() for line in block.splitlines()[1:] if line.startswith("    ")]
    ranks = {}
    for rank, line in enumerate(lines):
        for name in re.split(r",\s*(?:and\s+)?", line):
            ranks[name.split()[0]] = rank
    return ranks


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] in ("pipelines", "kernels"):
        parts = ["emojax", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _unit(module: str) -> str | None:
    """The layer unit of a module: cli for emojax.cli and every package's commands module, else its top name."""
    parts = module.split(".")
    if parts[0] != "emojax":
        return None
    if len(parts) == 1:
        return "emojax"
    if parts[1] == "cli" or parts[-1] == "commands":
        return "cli"
    return parts[1]


def _modules() -> dict[str, Path]:
    files = [p for base in ("emojax", "pipelines", "kernels") for p in (REPO / base).rglob("*.py")]
    return {_module_of(p): p for p in files}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The emojax modules a file imports, each with its line (pipelines/kernels under their installed emojax.*
    names). `from package import name` imports the module package.name when there is one, else the package."""
    out = []

    def own(name: str) -> str | None:
        name = "emojax." + name if name.split(".")[0] in ("pipelines", "kernels") else name
        if name.split(".")[0] != "emojax":
            return None
        while name not in modules and "." in name:  # `from emojax.models.lm import X`: the module emojax.models.lm
            name = name.rsplit(".", 1)[0]
        return name

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [own(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and own(node.module):
            base = own(node.module)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out += [(name, node.lineno) for name in names if name]
    return out


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {m: {name for name, _ in _imports(path, modules) if name != m} for m, path in modules.items()}


def test_no_import_runs_upward():
    ranks = _layers()
    assert {"errors", "models", "concepts", "run", "cli", "emojax"} <= set(ranks), ranks
    modules = _modules()
    upward = []
    for module, path in modules.items():
        src = _unit(module)
        for name, line in _imports(path, modules):
            dst = _unit(name)
            if src == "kernels":
                upward.append(f"{path.relative_to(REPO)}:{line} imports {name}: kernels/ imports nothing from emojax")
                continue
            for unit in (src, dst):
                assert unit in ranks, f"{path.relative_to(REPO)}:{line}: {unit!r} is in no layer of emojax/__init__.py"
            if ranks[dst] > ranks[src]:
                upward.append(f"{path.relative_to(REPO)}:{line} ({src}) imports {name} ({dst}), a higher layer")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph(_modules())
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
