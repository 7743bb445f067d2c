"""The library's structure as README's Architecture section states it: the layer table holds (no module
imports a module of a higher layer), there is no import cycle, and the low modules that the data and model
layers ask load none of the heavy libraries.

The imports are read statically with `ast`, from every module under `rlvr/` (subpackages included), at the top
of a file and inside functions alike, so a cycle or an upward import hidden in a function is found too.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "rlvr"
HEAVY = ("torch", "transformers", "trl", "mlflow")


def module_files() -> dict[str, Path]:
    """Every module of the library by its name inside `rlvr` (`tracking.uris`, `analysis`, ...); the root
    package is ''."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = module_files()


def _lazy_names() -> dict[str, str]:
    """The names `rlvr/__init__.py` loads on first use, and the module each comes from (`_HOMES`)."""
    tree = ast.parse(MODULES[""].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_HOMES" for t in node.targets):
            return {name: home.removeprefix("rlvr.") for name, home in ast.literal_eval(node.value).items()}
    return {}


LAZY = _lazy_names()


def _library_module(dotted: str) -> str | None:
    """The library module an absolute dotted name refers to (the longest prefix that is one), else None."""
    if dotted != "rlvr" and not dotted.startswith("rlvr."):
        return None
    name = dotted.removeprefix("rlvr").removeprefix(".")
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> set[str]:
    """The library modules `module` imports by name anywhere in its file (neither itself nor the root
    package)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(filter(None, (_library_module(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = ["rlvr", *package.split(".")] if package else ["rlvr"]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            source = _library_module(base)
            if source is None:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}" if source else alias.name
                if submodule in MODULES:
                    found.add(submodule)
                elif source == "" and alias.name in LAZY:
                    found.add(LAZY[alias.name])
                else:
                    found.add(source)
    return found - {module, ""}


def with_packages(modules: set[str]) -> set[str]:
    """`modules` and the packages above them: importing `a.b.c` runs `a` and `a.b` first."""
    result = set(modules)
    for name in modules:
        parts = name.split(".")
        result.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return result


def layer_table() -> list[tuple[int, str, list[str]]]:
    """README's layer table: (layer, its name, the module names it lists)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"(\d+) (.+)", cells[0]) if len(cells) >= 2 else None
        if match:
            rows.append((int(match[1]), match[2], re.findall(r"`([\w.]+)`", cells[1])))
    return rows


TABLE = layer_table()
LISTED = {name: layer for layer, _, names in TABLE for name in names}


def layer_of(module: str) -> int:
    """The layer of the longest listed name that is `module` or a package above it."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in LISTED:
            return LISTED[name]
    raise AssertionError(
        f"rlvr.{module} is in no row of README's layer table; add it to the layer it belongs to"
    )


def test_the_layer_table_is_well_formed_and_covers_every_module():
    layers = [layer for layer, _, _ in TABLE]
    assert layers == list(range(len(layers))) and len(layers) >= 5, layers
    names = [name for _, _, listed in TABLE for name in listed]
    assert len(names) == len(set(names)), "a module is listed in two rows"
    assert not set(names) - set(MODULES), "the table lists modules that do not exist"
    for module in MODULES:
        if module:
            layer_of(module)


def test_the_root_package_imports_nothing_up_front():
    """`rlvr` loads its top-level names on first use, so importing any module never loads the model code."""
    assert imports_of("") == set()
    assert set(LAZY.values()) <= set(MODULES)


def test_no_module_imports_one_of_a_higher_layer():
    upward = []
    for module in MODULES:
        if not module:
            continue
        for imported in sorted(with_packages(imports_of(module))):
            if layer_of(imported) > layer_of(module):
                upward.append(
                    f"rlvr.{module} (layer {layer_of(module)}) imports rlvr.{imported} "
                    f"(layer {layer_of(imported)})"
                )
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    """Depth-first search over the imports that each module names (a package importing its own modules is no
    cycle: Python runs the package first, then the module)."""
    graph = {module: imports_of(module) for module in MODULES}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycle = path[path.index(imported) :] + [imported]
                raise AssertionError("import cycle: " + " -> ".join(f"rlvr.{m}" for m in cycle))
            if imported not in state:
                visit(imported)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_graph_sees_imports_inside_functions():
    """The checks above would be blind to an upward import inside a function if the reader missed those:
    `pipeline` imports `models` only in `run_pipeline`, `surgery` imports `rollout` only in
    `enable_fast_rollouts`."""
    assert "models" in imports_of("pipeline")
    assert "rollout" in imports_of("surgery")


@pytest.mark.parametrize(
    "modules, absent",
    [
        (("rlvr.tracking.uris", "rlvr.sampling"), HEAVY),
        (("rlvr.slurm.backend",), ("torch", "transformers", "trl")),
    ],
)
def test_low_modules_load_no_heavy_library(modules, absent):
    """The URI test and the sampling rules are asked by the data and model layers, and the SLURM backend runs
    inside `mlflow run`: importing them must not pay for the libraries they do not need."""
    code = f"import sys\nimport {', '.join(modules)}\nprint(sorted(set({absent!r}) & set(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
