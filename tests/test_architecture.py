"""The folder list is the architecture: each folder (or leaf module) sits in a layer and imports only from layers below
it, no two modules import each other even through others, and no module reaches into another's private names.

Every import counts, also those inside functions (kept there so that `sdlora --help`, `inspect` and `doctor` start
fast): a lazy import that goes up a layer is still a dependency that goes up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sdlora"

# Lowest first. A unit is a subpackage or a module directly in sdlora/; units in one layer do not import each other.
LAYERS = [
    ("errors", "bnb_import"),  # import nothing of sdlora
    ("config", "atomic", ""),  # "" is sdlora/__init__.py, which hides bitsandbytes
    ("models",),
    ("adapters", "data"),
    ("generate",),
    ("train",),
    ("toyworld",),
    ("ui",),
    ("cli",),  # the console script's entry point
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    """sdlora.models.loading -> "models", sdlora.config -> "config", sdlora -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported sdlora module, names taken from it, line) for every import statement of `module`, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                # `from sdlora.train import checkpoint` imports the module sdlora.train.checkpoint.
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return [(target, names, line) for target, names, line in found if target.split(".")[0] == "sdlora"]


GRAPH = {module: imports(module) for module in MODULES}


def test_every_unit_has_a_layer():
    assert {unit(m) for m in MODULES} <= set(LAYER), "add the new folder or module to LAYERS (and to the README)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_only_down_a_layer(module):
    wrong = [f"line {line}: {target} ({unit(target) or 'sdlora'}, layer {LAYER[unit(target)]})"
             for target, _, line in GRAPH[module]
             if unit(target) != unit(module) and LAYER[unit(target)] >= LAYER[unit(module)]]
    assert not wrong, f"{module} (layer {LAYER[unit(module)]}) imports from its own layer or above: {wrong}"


def test_no_import_cycles():
    """No strongly connected group of modules (Tarjan's algorithm): modules that import each other, directly or
    through others, are one module in two files."""
    edges = {m: sorted({t for t, _, _ in GRAPH[m] if t in MODULES and t != m}) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in edges[module]:
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in MODULES:
        if module not in index:
            connect(module)
    assert not cycles, f"modules that import each other: {cycles}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_takes_another_modules_private_names(module):
    private = [f"line {line}: {target}.{name}" for target, names, line in GRAPH[module] for name in names
               if name.startswith("_") and target != module]
    assert not private, f"{module} imports private names; make them public where they belong, or move them: {private}"


@pytest.mark.parametrize("module", sorted(m for m, p in MODULES.items() if p.name == "__init__.py" and m != "sdlora"))
def test_folder_inits_import_nothing(module):
    """Importing one module of a folder runs the folder's __init__: an import there would load for every user."""
    tree = ast.parse(MODULES[module].read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_library_code_does_not_import_test_tools(module):
    tree = ast.parse(MODULES[module].read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("unittest", "pytest", "hypothesis")], module
