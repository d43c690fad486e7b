"""The library's layout: the packages import downward only (config -> data -> model -> parallel -> checkpoint ->
engine -> evaluation -> planning -> the commands), no module imports itself back through another, and an import
inside a function says why it is there."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "megapixel"
# Lowest first: a module may import from its own layer and the layers below it.
LAYERS = (
    ("megapixel", "megapixel.errors", "megapixel.atomic", "megapixel.config"),
    ("megapixel.data",),
    ("megapixel.model",),
    ("megapixel.parallel",),
    ("megapixel.checkpoint",),
    ("megapixel.engine",),
    ("megapixel.evaluation",),
    ("megapixel.planning",),
    ("megapixel.demo", "megapixel.cli"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in LIBRARY.rglob("*.py")}


def imports_of(path: Path) -> list[tuple[str, ast.stmt]]:
    """Every megapixel module `path` imports, at any depth, with the statement that imports it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names if alias.name.startswith("megapixel.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "megapixel":
            for alias in node.names:
                # `from megapixel.data import palette` imports the module megapixel.data.palette.
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule if submodule in MODULES else node.module, node))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in imports_of(path)} - {name} for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer if top != "megapixel"):
            return index
    assert module == "megapixel", f"{module} is in no layer: add it to LAYERS"
    return 0


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_imported_megapixel_module_exists():
    missing = sorted(
        {(name, target) for name, targets in graph().items() for target in targets if target not in MODULES}
    )
    assert not missing


def test_no_two_library_modules_import_each_other_at_any_depth():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_only_their_own_layer_and_the_layers_below():
    upward = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(name)
    ]
    assert upward == []


def test_an_import_inside_a_function_says_why_it_is_there():
    unexplained = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            inner = [n for n in ast.walk(function) if isinstance(n, (ast.Import, ast.ImportFrom))]
            if not inner:
                continue
            first = min(n.lineno for n in inner)
            before = lines[function.lineno : first - 1]
            if not any(line.strip().startswith("# Imported here") for line in before):
                unexplained.append(f"{name}.{function.name} (line {first})")
    assert unexplained == [], "add a '# Imported here: <why>' comment above the first import"
