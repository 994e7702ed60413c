"""The import graph of src/funcpipe: no circle, the design's nevers, and what each entry point loads.

The graph is computed with ``ast`` from the source, counting imports inside
functions (a lazy import is still a dependency) and leaving out those under
``if TYPE_CHECKING:`` (never run). What an entry point loads is measured in a
fresh interpreter, with the packages a deployed function does not have made
unimportable, so a new top-level import of one of them fails here.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "funcpipe"

#: Third-party packages a deployed function's image does not install (backends/*/requirements.txt).
NOT_IN_THE_IMAGE = ("ortools", "ray", "matplotlib", "tqdm", "yaml")

#: funcpipe modules a function must not load: driver-side planning, training and presentation.
NOT_IN_A_FUNCTION = (
    "funcpipe.planner", "funcpipe.simulator", "funcpipe.trainer", "funcpipe.report", "funcpipe.plot",
    "funcpipe.executors", "funcpipe.costmodel", "funcpipe.profiler", "funcpipe.cli", "funcpipe.calibrate",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return skipped


def imported_names(path: Path) -> Iterator[str]:
    """Every module name ``path`` imports at run time (absolute; ``from a import b`` gives ``a.b`` and ``a``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = _type_checking_nodes(tree)
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module


def _funcpipe_module(name: str) -> str | None:
    """The funcpipe module ``name`` refers to (a module, or the module an attribute is imported from)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {_funcpipe_module(imported) for imported in imported_names(path)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def third_party(name: str) -> set[str]:
    return {imported.partition(".")[0] for imported in imported_names(MODULES[name])
            if not imported.startswith("funcpipe")}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, pending = {start}, [start]
    while pending:
        for target in graph[pending.pop()] - seen:
            seen.add(target)
            pending.append(target)
    return seen


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


GRAPH = import_graph()


# -- the graph ------------------------------------------------------------------------------


def test_the_graph_sees_imports_inside_functions() -> None:
    # preload() imports torch inside the function; the planner imports the simulator at module level.
    assert "torch" in third_party("funcpipe.function")
    assert "funcpipe.planner.search" in GRAPH["funcpipe.planner"]


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    assert circles(GRAPH) == []


@pytest.mark.parametrize(
    ("modules", "never", "why"),
    [
        (("funcpipe.worker",), ("funcpipe.executors", "funcpipe.trainer", "funcpipe.run", "funcpipe.restore",
                                "funcpipe.planner", "funcpipe.simulator", "funcpipe.function"),
         "a worker does not know how it is launched, by whom, or how it was planned"),
        # A plan prints itself through funcpipe.report (plain Python, loaded when a plan is printed): the
        # function does not load it (test_the_function_entry_loads_a_worker_and_nothing_of_the_driver).
        (("funcpipe.function", "funcpipe.probe"), tuple(m for m in NOT_IN_A_FUNCTION if m != "funcpipe.report"),
         "a function loads only what a worker (or the calibration probe) runs"),
        (("funcpipe.storage",), ("funcpipe.worker", "funcpipe.trainer", "funcpipe.collectives", "funcpipe.protocol",
                                 "funcpipe.plans", "funcpipe.executors", "funcpipe.function"),
         "storage moves bytes and knows nothing of training"),
        (("funcpipe.planner", "funcpipe.simulator", "funcpipe.costmodel", "funcpipe.profiler", "funcpipe.plans"),
         ("funcpipe.executors", "funcpipe.trainer", "funcpipe.worker", "funcpipe.function"),
         "planning never launches anything"),
        (("funcpipe.protocol",), ("funcpipe.worker", "funcpipe.trainer", "funcpipe.executors", "funcpipe.plans",
                                  "funcpipe.collectives"),
         "the protocol is names and encodings, below everything that uses it"),
    ],
    ids=["worker", "function", "storage", "planning", "protocol"],
)
def test_nevers(modules: tuple[str, ...], never: tuple[str, ...], why: str) -> None:
    starts = [name for name in MODULES if _under(name, modules)]
    assert starts, modules
    for start in starts:
        bad = sorted(name for name in reachable(GRAPH, start) if _under(name, never))
        assert bad == [], f"{start} imports {bad}: {why}"


def test_the_library_imports_nothing_of_backends() -> None:
    for name, path in MODULES.items():
        bad = [imported for imported in imported_names(path)
               if imported.partition(".")[0] in ("backends", "handler", "server")]
        assert bad == [], f"{name} imports {bad}: backends/ holds what is deployed, and calls funcpipe, not back"


def test_the_function_side_needs_none_of_the_driver_packages() -> None:
    for start in reachable(GRAPH, "funcpipe.function") | reachable(GRAPH, "funcpipe.probe"):
        assert third_party(start).isdisjoint(NOT_IN_THE_IMAGE), start


# -- what the entry points load (fresh interpreters) ------------------------------------------------


def _loaded_after(code: str, blocked: tuple[str, ...] = ()) -> list[str]:
    """``sys.modules`` after running ``code`` in a fresh interpreter in which ``blocked`` cannot be imported."""
    script = (
        "import json, sys\n"
        f"for name in {list(blocked)!r}:\n"
        "    sys.modules[name] = None  # import fails, as where it is not installed\n"
        f"{code}\n"
        "print(json.dumps(sorted(m for m in sys.modules if sys.modules[m] is not None)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.splitlines()[-1]))


def test_the_function_entry_loads_a_worker_and_nothing_of_the_driver() -> None:
    loaded = _loaded_after("import funcpipe.function as f\nf.preload()", blocked=NOT_IN_THE_IMAGE)
    for needed in ("torch", "safetensors", "cloudpickle", "funcpipe.worker", "funcpipe.protocol", "funcpipe.codec",
                   "funcpipe.binding", "funcpipe.signed", "funcpipe.checkpoint"):
        assert needed in loaded, needed
    assert [m for m in loaded if _under(m, NOT_IN_A_FUNCTION)] == []


def test_the_calibration_probe_loads_nothing_of_the_driver() -> None:
    # What a function imports to run `funcpipe calibrate`'s benchmark (function.handle loads it by name).
    loaded = _loaded_after("import funcpipe.function\nimport funcpipe.probe", blocked=NOT_IN_THE_IMAGE)
    assert "funcpipe.probe" in loaded
    assert [m for m in loaded if _under(m, NOT_IN_A_FUNCTION)] == []


def test_the_storage_adapter_loads_on_first_open() -> None:
    loaded = _loaded_after("import funcpipe.function\nfrom funcpipe.storage import open_storage\n"
                           "open_storage('memory://x')", blocked=NOT_IN_THE_IMAGE)
    assert "funcpipe.storage.memory" in loaded
    assert not any(m.startswith(("funcpipe.storage.s3", "funcpipe.storage.oss", "boto3", "oss2")) for m in loaded)


@pytest.mark.parametrize("code", ["import funcpipe", "import funcpipe.cli as c\nc.build_parser().format_help()"],
                         ids=["import funcpipe", "funcpipe --help"])
def test_the_package_root_and_the_cli_load_no_heavy_package(code: str) -> None:
    loaded = _loaded_after(code)
    assert [m for m in loaded if m.partition(".")[0] in ("torch", "ortools", "ray", "matplotlib", "numpy")] == []


def test_every_public_name_loads_on_first_use() -> None:
    loaded = _loaded_after("import funcpipe\nnames = [getattr(funcpipe, n) for n in funcpipe.__all__]\n"
                           "assert funcpipe.plan.__module__ == 'funcpipe.planner', funcpipe.plan")
    assert "funcpipe.trainer" in loaded and "funcpipe.planner" in loaded
