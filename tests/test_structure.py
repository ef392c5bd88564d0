"""The shape of the harness (issue 14): dependencies point one way, the trainer knows no
method, and the docstring examples of bench run."""

import ast
import doctest
import importlib
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _module_name(path: Path) -> str:
    parts = path.relative_to(BENCH.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bench_imports() -> dict[str, set[str]]:
    """``{module: {bench modules it imports}}`` for every module of bench, from its source
    (imports inside functions included: a lazy import is still a dependency)."""
    modules = {_module_name(p): p for p in BENCH.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                subs = [f"{base}.{a.name}" for a in node.names]
                # ``from pkg import mod`` depends on pkg.mod (and pkg's __init__, which it runs first)
                targets = [base, *subs]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                return stack[stack.index(d) :] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_bench_import_graph_has_no_cycle():
    graph = bench_imports()
    assert {"bench.ablate", "bench.runner", "bench.executors", "bench.perf.paired"} <= set(graph)
    assert graph["bench.ablate"] >= {"bench.runner", "bench.executors"}  # the parser sees relative imports
    assert find_cycle(graph) is None, find_cycle(graph)


def test_dependencies_point_one_way():
    graph = bench_imports()
    assert graph["bench.executors"] <= {
        "bench.runner",
        "bench.errors",
        "bench.provenance",
        "bench.gate",
        "bench.packing",
        "bench.pool",
    }
    assert graph["bench.gate"] == set()  # the timing gate: usable by any process, imports nothing
    assert graph["bench.packing"] <= {"bench.runner"} and graph["bench.pool"] <= {
        "bench.runner",
        "bench.gate",
        "bench.provenance",
    }
    assert graph["bench.errors"] == set()
    assert graph["bench.fsio"] <= {"bench.errors"}  # safe writes: a leaf every writer can use
    assert graph["bench.provenance"] <= {"bench.measure", "bench.errors", "bench.fsio"}
    # the paired timer is reusable by the trainer: it must not import the trainer or the CLI
    assert graph["bench.perf.paired"] <= {"bench", "bench.measure"}
    assert graph["bench.perf"] == set() and graph["bench"] == set()  # the packages import no module
    for name, deps in graph.items():  # nothing but a __main__ imports the command-line entry points
        if name.endswith("__main__"):
            continue
        assert not deps & {"bench.ablate", "bench.perf.cli", "bench.__main__", "bench.perf.__main__"}, name


def test_the_trainer_knows_no_method():
    source = (BENCH / "runner.py").read_text()
    hits = [ln for ln in source.splitlines() if re.search(r'"(lstm|cd|cdopt|cayley|geotorch)', ln)]
    assert hits == []


MODULES = sorted(n for n in bench_imports() if not n.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_doctests_of_bench(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
