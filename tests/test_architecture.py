"""The package's layers, stated once and checked: imports run one way, no cycles, and no
module reads another module's private names.

Every import counts, those under ``if TYPE_CHECKING:`` and inside functions included.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "zmqmesh"

# Lowest first: a module may import from its own layer and the layers before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("zmqmesh._version", "zmqmesh._addresses", "zmqmesh._ids", "zmqmesh._record", "zmqmesh.errors", "zmqmesh.config", "zmqmesh.message", "zmqmesh._stats")),
    ("observe", ("zmqmesh._observe",)),
    ("wire", ("zmqmesh._wire",)),
    ("io", ("zmqmesh._io",)),
    ("store", ("zmqmesh._store",)),
    ("membership", ("zmqmesh._membership",)),
    ("mesh", ("zmqmesh._mesh",)),
    ("patterns", ("zmqmesh._patterns",)),
    ("engine", ("zmqmesh._engine",)),
    ("drivers", ("zmqmesh._drivers",)),
    ("facades", ("zmqmesh.node", "zmqmesh.asyncnode", "zmqmesh")),
    ("tools", ("zmqmesh.tools", "zmqmesh.__main__")),
]
PURE = ("zmqmesh._wire",)  # no sockets: the wire layer must not import zmq
TOOLS_MAY_IMPORT = ("zmqmesh", "zmqmesh.tools")  # the public API, and each other


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The zmqmesh modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "zmqmesh" or a.name.startswith("zmqmesh.")]
    if node.level:
        package = importer if is_package(importer) else importer.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if not (base == "zmqmesh" or base.startswith("zmqmesh.")):
        return []
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.append(sub if sub in MODULES else base)
    return found


def layer_of(name: str) -> int:
    best, index = -1, -1
    for i, (_label, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index >= 0, f"{name} belongs to no layer: add it to LAYERS"
    return index


def parse(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name in MODULES:
        for node in ast.walk(parse(name)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(name, node):
                    if target != name:
                        graph[name].add(target)
    return graph


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        layer_of(name)


def test_imports_run_downwards() -> None:
    wrong = []
    for importer, targets in import_graph().items():
        for target in targets:
            if layer_of(target) > layer_of(importer):
                wrong.append(f"{importer} ({LAYERS[layer_of(importer)][0]}) imports "
                             f"{target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name)
    # the package root imports its submodules, and they import the root's siblings: a
    # submodule importing the root package itself would be a cycle and is reported
    assert not cycles, "\n".join(cycles)


def test_tools_use_only_the_public_api() -> None:
    wrong = []
    for importer, targets in import_graph().items():
        if layer_of(importer) != len(LAYERS) - 1:
            continue
        for target in targets:
            if not (target == "zmqmesh" or target.startswith("zmqmesh.tools")):
                wrong.append(f"{importer} imports {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("prefix", PURE)
def test_the_wire_layer_is_pure(prefix: str) -> None:
    for name in MODULES:
        if name == prefix or name.startswith(prefix + "."):
            for node in ast.walk(parse(name)):
                if isinstance(node, ast.Import):
                    assert all(a.name.split(".")[0] != "zmq" for a in node.names), f"{name} imports zmq"
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    assert (node.module or "").split(".")[0] != "zmq", f"{name} imports zmq"


def private_names_defined(tree: ast.Module) -> set[str]:
    """Underscore names a module defines itself: functions, classes, attributes, variables."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute):
            names.add(node.target.attr)
    return {n for n in names if n.startswith("_")}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_reads_another_modules_private_names() -> None:
    # an object's own private state (``self._x``, inherited included) is its business;
    # reading ``other._x`` is allowed only where ``_x`` is defined in the same module
    wrong = []
    for name in MODULES:
        tree = parse(name)
        own = private_names_defined(tree)
        for node in ast.walk(tree):
            on_self = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if isinstance(node, ast.Attribute) and is_private(node.attr) and not on_self and node.attr not in own:
                wrong.append(f"{name}:{node.lineno} reads .{node.attr}")
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    target = resolve(name, node)
                    if is_private(alias.name) and target and f"{target[0]}" not in MODULES:
                        wrong.append(f"{name}:{node.lineno} imports {alias.name}")
                    elif is_private(alias.name) and target and not target[0].endswith("." + alias.name):
                        wrong.append(f"{name}:{node.lineno} imports the private {alias.name}")
    assert not wrong, "\n".join(wrong)
