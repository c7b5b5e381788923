"""The package's layout: no import circle between memstack's modules, and a lean core.

The import graph is read from the source with ``ast`` (nothing is imported). An edge ``A -> B``
means running module ``A`` may import module ``B``:

- top-level imports count, and so do late imports inside functions and methods (they run when
  the function is first called, and a circle through them is still a circle);
- imports inside an ``if TYPE_CHECKING:`` block do not count: that block never runs (its
  ``else:`` branch does, and counts);
- relative imports are resolved against the importing module's package;
- ``from pkg import name`` depends on ``pkg.name`` when that is a submodule, on ``pkg`` otherwise;
- importing ``a.b.c`` depends on ``a.b.c`` and on the ``__init__`` of ``a.b`` and ``a`` (importing
  a submodule runs its packages' ``__init__`` first), except the packages that contain the
  importing module itself: Python ran those before the module, so that edge exists for every
  module and means nothing. An explicit ``import a`` or ``from a import name`` (a name defined in
  ``a/__init__.py``) does count, wherever it is.

``importlib.import_module`` calls are not followed.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "memstack"


# The import graph -------------------------------------------------------------------------------


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Every module of ``package`` under ``src``: dotted name -> (file, is_package)."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules[".".join(parts)] = (path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at top level, in functions, classes, try, with, loops;
    not inside the body of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_imports(
    name: str, is_package: bool, source: str, known: Iterable[str], package: str = PACKAGE
) -> dict[str, int]:
    """The modules of ``known`` that module ``name`` imports: target -> line of its first import."""
    known = set(known)
    own_package = name if is_package else name.rpartition(".")[0]
    ancestors = {name, *_parents(name)}
    targets: dict[str, int] = {}

    def depend(target: str, line: int, explicit: bool) -> None:
        # explicit: the import names this module itself (not only a submodule inside it)
        if target in known and (explicit or target not in ancestors):
            targets.setdefault(target, line)

    def depend_with_parents(target: str, line: int) -> None:
        for parent in _parents(target):
            depend(parent, line, explicit=False)
        depend(target, line, explicit=True)

    for node in _imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    depend_with_parents(alias.name, node.lineno)
            continue
        if node.level:
            base = own_package.split(".")
            if node.level > 1:
                base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module != package and not module.startswith(package + "."):
            continue
        names_only = False
        for alias in node.names:
            sub = f"{module}.{alias.name}"
            if sub in known:
                depend_with_parents(sub, node.lineno)
            else:
                names_only = True
        # the names come from module itself (its __init__ for a package); with only submodules
        # imported, module is one of their parents: counted above unless it contains this module
        for parent in _parents(module):
            depend(parent, node.lineno, explicit=False)
        depend(module, node.lineno, explicit=names_only)
    targets.pop(name, None)
    return targets


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported module: line}, for every module of ``package``."""
    modules = module_files(src, package)
    return {
        name: module_imports(name, is_package, path.read_text(), modules, package)
        for name, (path, is_package) in modules.items()
    }


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; every node is in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_path(graph: Mapping[str, Iterable[str]], start: str, goal: str, members: set[str]) -> list[str]:
    """A shortest path from ``start`` to ``goal`` through ``members`` (breadth first)."""
    came_from = {start: start}
    frontier = [start]
    while goal not in came_from:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child in members and child not in came_from:
                    came_from[child] = node
                    following.append(child)
        if not following:
            raise AssertionError(f"no path from {start} to {goal}")
        frontier = following
    path = [goal]
    while path[-1] != start:
        path.append(came_from[path[-1]])
    return path[::-1]


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Import circles, sorted: for every edge inside a strongly connected component (self-imports
    included), the shortest circle through that edge, so every import that closes a circle shows up.
    Each circle starts and ends at its first module in sorted order and is listed once."""
    found = set()
    for component in strongly_connected(graph):
        members = set(component)
        for a in component:
            for b in graph.get(a, ()):
                if b in members:
                    circle = [a, *_shortest_path(graph, b, a, members)] if a != b else [a, a]
                    first = circle.index(min(circle[:-1]))
                    found.add(tuple(circle[first:-1] + circle[:first] + [circle[first]]))
    return sorted(map(list, found))


# Self-tests of the graph code, so a passing circle check means something -------------------------


def test_cycle_finder_on_synthetic_graphs():
    acyclic = {"a": ["b", "c"], "b": ["c", "d"], "c": ["d"], "d": []}
    assert cycles(acyclic) == []
    assert sorted(strongly_connected(acyclic)) == [["a"], ["b"], ["c"], ["d"]]
    # a -> b -> c -> a, reached from x; a separate two-circle d <-> e; f imports itself
    graph = {"x": ["a"], "a": ["b"], "b": ["c", "d"], "c": ["a"], "d": ["e"], "e": ["d"], "f": ["f"]}
    assert sorted(c for c in strongly_connected(graph) if len(c) > 1) == [["a", "b", "c"], ["d", "e"]]
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["d", "e", "d"], ["f", "f"]]
    # each import's shortest way round
    assert cycles({"a": ["b", "c"], "b": ["c"], "c": ["a"]}) == [["a", "b", "c", "a"], ["a", "c", "a"]]
    # every import that closes a circle shows up: two circles in one component, both listed
    two = {"s": ["p", "c"], "p": ["s"], "c": ["l"], "l": ["s"]}
    assert cycles(two) == [["c", "l", "s", "c"], ["p", "s", "p"]]
    # a long chain does not hit the recursion limit (the search is iterative)
    chain = {str(i): [str(i + 1)] for i in range(3000)}
    assert cycles(chain) == []
    chain["3000"] = ["0"]
    assert [len(c) for c in strongly_connected(chain)] == [3001]


KNOWN = ["pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d", "pkg.sub.deep", "pkg.sub.deep.e"]


def _deps(name: str, source: str, is_package: bool = False) -> dict[str, int]:
    return module_imports(name, is_package, textwrap.dedent(source), KNOWN, package="pkg")


def test_import_parser_on_synthetic_sources():
    source = """
        from __future__ import annotations
        import os
        from typing import TYPE_CHECKING
        import pkg.sub.deep.e
        if TYPE_CHECKING:
            from pkg.b import Never
        else:
            from pkg import a
        def late():
            from . import d
        class K:
            def method(self):
                import pkg.b as bee
    """
    deps = _deps("pkg.sub.c", source)
    # e and its package pkg.sub.deep; pkg.sub and pkg contain pkg.sub.c, so they are not edges
    assert set(deps) == {"pkg.sub.deep.e", "pkg.sub.deep", "pkg.a", "pkg.sub.d", "pkg.b"}
    assert (
        deps["pkg.sub.deep.e"] == 5 and deps["pkg.a"] == 9 and deps["pkg.sub.d"] == 11 and deps["pkg.b"] == 14
    )
    # only TYPE_CHECKING: no edge
    assert _deps("pkg.a", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\n") == {}
    assert _deps("pkg.a", "import typing\nif typing.TYPE_CHECKING:\n    import pkg.b\n") == {}
    # from pkg.sub import a name of its __init__: the __init__; of a submodule: it and its packages
    assert set(_deps("pkg.a", "from pkg.sub import helper")) == {"pkg.sub"}
    assert set(_deps("pkg.a", "from pkg.sub.deep import e")) == {"pkg.sub", "pkg.sub.deep", "pkg.sub.deep.e"}
    # a name from the root package counts even from inside it; a submodule import does not add it
    assert set(_deps("pkg.a", "from pkg import helper")) == {"pkg"}
    assert set(_deps("pkg.a", "import pkg")) == {"pkg"}
    assert set(_deps("pkg.a", "from pkg import b")) == {"pkg.b"}
    # relative imports, from a module and from a package's __init__
    assert set(_deps("pkg.sub.deep.e", "from .. import c")) == {"pkg.sub.c"}
    assert set(_deps("pkg.sub.deep.e", "from ...b import x")) == {"pkg.b"}
    assert set(_deps("pkg.sub", "from .c import x\nfrom . import d", is_package=True)) == {
        "pkg.sub.c",
        "pkg.sub.d",
    }
    assert set(_deps("pkg.sub.deep", "from ..c import x", is_package=True)) == {"pkg.sub.c"}
    # other packages are not memstack's
    assert _deps("pkg.a", "import pkgx\nfrom pkgx.y import z\nimport numpy") == {}


def test_the_graph_is_read_from_the_real_package():
    graph = import_graph()
    assert {"memstack", "memstack.stack", "memstack.memory.store.chunk_store", "memstack.data.filler"} <= set(
        graph
    )
    assert "memstack.stack" in graph["memstack"]  # memstack/__init__.py re-exports MemoryStack
    assert "memstack.data.tokenizer" in graph["memstack.data.filler"]


# The checks ---------------------------------------------------------------------------------------


def test_no_import_circle():
    graph, files = import_graph(), module_files()
    found = cycles(graph)
    lines = []
    for cycle in found:
        lines.append("  " + " -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):  # noqa: B905 (one shorter by design)
            lines.append(f"      {files[a][0].relative_to(SRC.parent)}:{graph[a][b]} imports {b}")
    assert not found, f"{len(found)} import circle(s) among memstack's modules:\n" + "\n".join(lines)


OUTSIDE_CORE = ("train", "evals", "data")
"""Subpackages a model wrapped in memory never needs: training, benchmarks, datasets and tasks."""


def test_core_modules_import_no_command_line_machinery():
    # torch itself imports argparse and runpy, so the running check below cannot see them; the
    # source can: only scripts and the training/evaluation helpers parse command lines
    offenders = []
    for name, (path, _) in module_files().items():
        parts = name.split(".")
        if len(parts) > 1 and parts[1] in OUTSIDE_CORE:
            continue
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            else:
                roots = [] if node.level else [(node.module or "").split(".")[0]]
            offenders += [f"{name}:{node.lineno} imports {r}" for r in roots if r in ("argparse", "runpy")]
    assert not offenders, offenders


LEAN_CORE = """
import json, sys
import einops, faiss, numpy, peft, safetensors, torch, transformers
from transformers import AutoModelForCausalLM, LlamaConfig
before = set(sys.modules)
import memstack
from memstack import CompressiveConfig, MemoryStack, StackConfig, StoreConfig
config = LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, intermediate_size=64, max_position_embeddings=256)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config).eval()
stack = MemoryStack(model, StackConfig(segment_len=16, compressive=CompressiveConfig(),
                                       store=StoreConfig(layers="all", chunk_len=4, block_len=4)))
ids = torch.randint(0, 64, (1, 48))
loss = stack(ids, labels=ids).loss
print(json.dumps({"loss": float(loss), "new": sorted(set(sys.modules) - before)}))
"""

HEAVY_EXTRAS = ("matplotlib", "datasets", "sentence_transformers", "bm25s", "argparse", "runpy")
"""Libraries the core must not import: plotting, dataset loading, the retrieval benchmark's peers,
command-line parsing (argparse and runpy come with torch, so this can only see memstack's own)."""
NOT_CORE = ("memstack.train", "memstack.evals", "memstack.data", "memstack.sleep")
"""memstack's subpackages a forward pass needs none of (sleep runs only when asked to)."""


def test_the_core_imports_no_training_plotting_or_datasets():
    """A fresh interpreter: the heavy libraries the core does need first, then import memstack and
    run a stack with compressive memory and the store; what memstack brought in is checked."""
    run = subprocess.run([sys.executable, "-c", LEAN_CORE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["loss"] > 0 and "memstack.memory.store.chunk_store" in result["new"]  # the store ran
    libraries = [m for m in result["new"] if m.split(".")[0] in HEAVY_EXTRAS]
    ours = [m for m in result["new"] if any(m == p or m.startswith(p + ".") for p in NOT_CORE)]
    assert not libraries and not ours, f"the core imported {libraries + ours}"
