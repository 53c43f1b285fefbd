"""The package's layout, read from the source (nothing imported): no import circles, neither among the
imports a module runs when it loads nor counting the ones inside functions too; imports run down the
floors of the house (commands -> sharing -> student -> teacher, inspect -> models -> data -> training,
losses, errors); every module and folder says in its docstring what lives there.

`distill/__init__.py` is left out of the graph: the public names it loads on first use by name
(`_EXPORTS`) are the whole package, and modules read its `__version__`, which it defines before any of
that."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "distill"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}
# The rooms of the house, by floor: a module imports from its own room or from rooms on lower floors.
# distill.cli, distill.callbacks and distill.cifar_resnet keep former paths working, from the top.
FLOORS = {"cli": 7, "callbacks": 7, "cifar_resnet": 7, "commands": 6, "sharing": 5, "student": 4, "teacher": 3,
          "inspect": 3, "models": 2, "data": 1, "training": 0, "losses": 0, "errors": 0,
          "network": 0}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, lazy: bool):
    """The import statements that run: at load time (module and class bodies), and with `lazy` also
    those inside functions; `if TYPE_CHECKING:` blocks never run."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not lazy:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The modules of this package an import statement in module `name` loads."""
    if isinstance(node, ast.Import):
        found = {a.name for a in node.names}
    else:
        package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.level and node.module else (package if node.level else node.module)
        found = {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES}


def import_graph(lazy: bool) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set().union(*(_targets(name, n) for n in _imports(tree, lazy)))
        if lazy and "import_module(" in path.read_text():  # modules named by string (the command's dispatch table)
            edges |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in MODULES}
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_of_every_kind():
    graph = import_graph(lazy=True)
    assert "distill.losses" in graph["distill.student.module"]  # from ..losses import (module level)
    assert "distill.models.pretrained" in graph["distill.models.build"]  # inside a function
    assert "distill.commands.pipeline" in graph["distill.commands.main"]  # by name, through importlib
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles_at_load_time():
    assert cycles(import_graph(lazy=False)) == []


def test_no_import_circles_counting_imports_inside_functions():
    assert cycles(import_graph(lazy=True)) == []


def room(module: str) -> str:
    return module.split(".")[1]


def test_imports_run_down_the_floors():
    assert set(FLOORS) == {room(m) for m in MODULES}, "a new room needs its floor in FLOORS"
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph(lazy=True).items() for b in targets
                    if room(a) != room(b) and FLOORS[room(a)] <= FLOORS[room(b)])
    assert upward == []


def test_every_module_and_folder_says_what_lives_there():
    missing = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert missing == []
