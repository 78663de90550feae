"""docs/ARCHITECTURE.md's layer table holds for every module of the package: each module is named in exactly one
layer, no module imports from a layer above its own, and no two modules import each other, directly or around a
longer cycle. Imports are read with ast, those inside functions and under `if TYPE_CHECKING:` included, so a lazy
import is no way around the table. The layers are parsed from the doc itself, so the doc cannot drift.

How the doc's modules column names modules: `name.py` is a top-level module, or, when there is none of that name,
a file of a folder named in the same cell (`analysis/` ... `levels.py`); `folder/name.py` is a path; `folder/`
names the folder's package (its `__init__.py`); `__init__.py` is the package's own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import immiscible_cli

PACKAGE = Path(immiscible_cli.__file__).parent
DOC = PACKAGE.parent / "docs" / "ARCHITECTURE.md"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name), e.g. immiscible_cli.metrics.scorer."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_rows() -> list[tuple[str, str]]:
    """(layer, modules cell) of each row of the doc's layer table, top (commands) first."""
    lines = DOC.read_text().split("\n")
    start = lines.index("## Layers (each imports only from the layers below it)")
    rows = []
    for line in lines[start + 1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows.append((cells[0], cells[1]))
    assert rows[0] == ("layer", "modules"), rows[0]
    return rows[1:]


def layer_of_modules() -> dict[str, int]:
    """Each module's layer as the doc's table gives it: 0 for the lowest row (foundation), higher above."""
    known = modules()
    rows = layer_rows()
    layers: dict[str, int] = {}
    for rank, (layer, cell) in enumerate(reversed(rows)):
        names = re.findall(r"`([\w/]+(?:\.py|/))`", cell)
        folders = [name[:-1] for name in names if name.endswith("/")]
        for name in names:
            if name.endswith("/"):
                module = "immiscible_cli." + name[:-1].replace("/", ".")
                assert module in known and known[module].name == "__init__.py", f"{layer}: no package {name}"
                wanted = [module]
            elif name == "__init__.py":  # the package's own
                wanted = ["immiscible_cli"]
            elif "/" in name or f"immiscible_cli.{name[:-3]}" in known:
                wanted = ["immiscible_cli." + name[:-3].replace("/", ".")]
            else:  # a file of a folder of this row
                wanted = [f"immiscible_cli.{folder.replace('/', '.')}.{name[:-3]}" for folder in folders]
                wanted = [module for module in wanted if module in known]
                assert len(wanted) == 1, f"{layer}: {name} is no module of the package (nor of one of {folders})"
            for module in wanted:
                assert module in known, f"{layer}: the doc names {name}, which is no module of the package"
                assert layers.get(module, rank) == rank, f"{name} is named in two layers"
                layers[module] = rank
    return layers


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `module` imports anywhere in its file (a name imported from a package, when it is a
    module of it, counts as that module)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # immiscible_cli.x.name -> immiscible_cli.x
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports(module, path, known) for module, path in known.items()}


def test_the_layer_table_is_read() -> None:
    layers = layer_of_modules()
    rows = [layer for layer, _ in layer_rows()]
    assert rows[0] == "command" and rows[-1] == "foundation" and len(rows) >= 8
    assert layers["immiscible_cli.cli"] == len(rows) - 1 and layers["immiscible_cli.errors"] == 0
    assert layers["immiscible_cli.metrics.scorer"] > layers["immiscible_cli.generation"] > \
        layers["immiscible_cli.objectives.ddpm"] > layers["immiscible_cli.data"] > layers["immiscible_cli.config"]
    graph = import_graph()
    assert "immiscible_cli.latents" in graph["immiscible_cli.data"]  # module-level imports are read
    assert "immiscible_cli.train_setup" in graph["immiscible_cli.cli_train"]  # and those inside functions


def test_every_module_is_in_one_layer_of_the_doc() -> None:
    missing = sorted(set(modules()) - set(layer_of_modules()))
    assert not missing, f"add these modules to docs/ARCHITECTURE.md's layer table: {missing}"


def test_no_module_imports_from_a_higher_layer() -> None:
    layers = layer_of_modules()
    rows = [layer for layer, _ in reversed(layer_rows())]
    upward = [f"{module} ({rows[layers[module]]}) imports {target} ({rows[layers[target]]})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if layers[target] > layers[module]]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = [stack.pop()]
            while component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other: {cycles}"
