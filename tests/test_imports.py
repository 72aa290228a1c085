"""The package's import graph: no cycles, and the bottom layers stay at the bottom (docs/DESIGN.md section 2).

Every ``import`` and ``from ... import`` in segformer_fast/*.py and kernels/*.py is read with ``ast``, at module
level and inside functions alike (an import inside a function that closes a circle is still a circle); relative
imports are resolved, and kernels/ is the package ``segformer_fast.kernels``. Only edges between project modules
count. Importing ``a.b`` is an edge to ``a.b`` only (not to its parent package ``a``), but ``from a import name``
where ``name`` is not a module is an edge to ``a`` itself, whose ``__init__`` defines it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Project module name prefix -> the folder holding its files.
PACKAGE_DIRS = {"segformer_fast": ROOT / "segformer_fast", "segformer_fast.kernels": ROOT / "kernels"}
#: Compiled modules (no .py file; they import nothing from the project): ``from . import _C`` is an edge to them.
EXTENSION_MODULES = ("segformer_fast._C",)

#: The rooms of the package, bottom first, and the rooms each may import from (its own included): every import
#: points down this table (docs/DESIGN.md section 2).
ROOMS_BELOW = {
    "core": {"core"},
    "model": {"core", "model"},
    "prepared": {"core", "model", "prepared"},
    "ops": {"core", "prepared", "ops", "_C"},
    "kernels": {"core", "prepared", "ops", "kernels"},
    "inference": {"core", "model", "ops", "inference"},
    "engine": {"core", "model", "prepared", "ops", "kernels", "inference", "engine"},
    "export": {"core", "model", "prepared", "ops", "inference", "engine", "export"},
    "jobs": {"core", "model", "prepared", "ops", "inference", "engine", "export", "jobs"},
    # None: the package itself (its __init__, the public API, for __version__), which imports no room above export
    "serve": {"core", "model", "prepared", "ops", "inference", "engine", "export", "jobs", "serve", None},
    "cli": {"core", "model", "prepared", "ops", "inference", "engine", "export", "jobs", "serve", "cli", None},
}
#: The rooms the package's top level (``__init__``) never imports; ``__main__`` runs the CLI.
TOP_ROOMS = ("jobs", "serve", "cli")
ENTRY_POINTS = {"segformer_fast.__main__": ("segformer_fast.cli",)}
#: The only package modules the Triton kernels may import (besides segformer_fast.kernels.*).
KERNELS_ALLOWED = {"segformer_fast.prepared.weights", "segformer_fast.ops.reference", "segformer_fast.core.runtime"}
#: The one module that imports the Triton kernels (triton is optional; the engine imports it lazily).
KERNELS_IMPORTER = "segformer_fast.engine.triton_backend"
#: No module of the package is longer than this (a module has one reason to change).
MAX_MODULE_LINES = 400


def module_files(package_dirs: dict) -> dict:
    """Module name -> .py file for every module of the packages, subpackages included (``__init__.py`` is the
    package itself)."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def room_of(module: str) -> str | None:
    """The room a project module lives in ("kernels" for segformer_fast.kernels.*), or None for the package's
    top-level modules."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    if parts[1] in ROOMS_BELOW or parts[1] == "_C":
        return parts[1]
    return parts[1] if len(parts) > 2 else None


def imported_modules(module: str, path: Path, known: set) -> set:
    """The project modules (names in ``known``) that ``module``'s source imports anywhere in its body."""
    is_package = path.stem == "__init__"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package_parts) - 1:
                    raise ValueError(f"{path}: relative import beyond the top-level package (line {node.lineno})")
                base_parts = package_parts[:len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    targets.add(submodule)
                elif base in known:
                    targets.add(base)
    targets.discard(module)
    return targets


def import_graph(package_dirs: dict, extension_modules=()) -> dict:
    """Module name -> set of project modules it imports (extension modules are leaves)."""
    files = module_files(package_dirs)
    known = set(files) | set(extension_modules)
    graph = {module: imported_modules(module, path, known) for module, path in files.items()}
    graph.update({module: set() for module in extension_modules})
    return graph


def find_cycles(graph: dict) -> list:
    """Cycles [a, b, ..., a], sorted: in each strongly connected component of more than one module, the shortest
    cycle through each of its modules (each cycle once, starting at its smallest module name)."""
    index_of, lowlink, on_stack, stack, components = {}, {}, set(), [], []

    def strongconnect(start):
        # iterative Tarjan: (node, iterator over its successors)
        work = [(start, iter(sorted(graph[start])))]
        index_of[start] = lowlink[start] = len(index_of)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index_of:
                    index_of[successor] = lowlink[successor] = len(index_of)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index_of[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index_of[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)

    for module in sorted(graph):
        if module not in index_of:
            strongconnect(module)
    cycles = set()
    for component in components:
        if len(component) > 1:
            for start in component:
                cycle = _shortest_cycle(graph, component, start)[:-1]
                first = cycle.index(min(cycle))
                rotated = cycle[first:] + cycle[:first]
                cycles.add(tuple(rotated + [rotated[0]]))
    return sorted(list(cycle) for cycle in cycles)


def _shortest_cycle(graph: dict, component: set, start: str) -> list:
    """A shortest cycle [start, ..., start] through ``start``, staying inside its strongly connected component."""
    came_from = {start: None}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    path, step = [], node
                    while step is not None:
                        path.append(step)
                        step = came_from[step]
                    return path[::-1] + [start]
                if successor not in came_from:
                    came_from[successor] = node
                    next_frontier.append(successor)
        frontier = next_frontier
    raise AssertionError(f"no cycle through {start} in the component {sorted(component)}")


def _format(cycles: list) -> str:
    return "\n".join("  " + " -> ".join(cycle) for cycle in cycles)


# --------------------------------------------------------------------------------------------- the checker itself
def _write_package(root: Path, files: dict) -> dict:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return {"pkg": root / "pkg", "pkg.kern": root / "kern"}


def test_checker_finds_function_level_and_relative_cycles(tmp_path):
    package_dirs = _write_package(tmp_path, {
        "pkg/__init__.py": "from .a import thing\n",
        "pkg/a.py": "import os\nfrom .b import helper\nthing = 1\n",
        "pkg/b.py": "def helper():\n    from pkg import c\n    return c\n",
        "pkg/c.py": "from . import a\n",
        "pkg/d.py": "from .e import x\n",
        "pkg/e.py": "import pkg.d as d\nx = 1\n",
        "pkg/f.py": "from . import g, h\n",
        "pkg/g.py": "from . import f\n",
        "pkg/h.py": "def late():\n    from .f import run\n",
        "pkg/leaf.py": "import torch\n",
        "pkg/ops.py": "def load():\n    from . import _C\n",
        "kern/__init__.py": "from .k import run\n",
        "kern/k.py": "from ..leaf import y\nfrom pkg import kern\n",
    })
    graph = import_graph(package_dirs, extension_modules=("pkg._C",))
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.leaf"] == set()
    assert graph["pkg.ops"] == {"pkg._C"}
    assert graph["pkg.kern.k"] == {"pkg.leaf", "pkg.kern"}
    assert find_cycles(graph) == [
        ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ["pkg.d", "pkg.e", "pkg.d"],
        ["pkg.f", "pkg.g", "pkg.f"],
        ["pkg.f", "pkg.h", "pkg.f"],
        ["pkg.kern", "pkg.kern.k", "pkg.kern"],
    ]


def test_checker_passes_an_acyclic_package(tmp_path):
    package_dirs = _write_package(tmp_path, {
        "pkg/__init__.py": "from .a import thing\n",
        "pkg/a.py": "from .b import helper\nthing = 1\n",
        "pkg/b.py": "def helper():\n    import pkg.c\n",
        "pkg/c.py": "VALUE = 1\n",
        "kern/__init__.py": "from .k import run\n",
        "kern/k.py": "from pkg.c import VALUE\n",
    })
    assert find_cycles(import_graph(package_dirs)) == []


# ------------------------------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE_DIRS, EXTENSION_MODULES)


def test_package_modules_are_found(graph):
    for module in ("segformer_fast", "segformer_fast.engine.engine", "segformer_fast.kernels.common",
                   "segformer_fast.kernels.sr_attention", "segformer_fast.core.runtime",
                   "segformer_fast.ops.reference", "segformer_fast.cli", "segformer_fast.cli.segment",
                   "segformer_fast.jobs.segment", "segformer_fast.jobs.ray_executor"):
        assert module in graph, f"{module} not found under {sorted(map(str, PACKAGE_DIRS.values()))}"


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles (every import counts, also those inside functions):\n{_format(cycles)}"


def test_every_import_points_down_the_rooms(graph):
    offenders = []
    for module, targets in sorted(graph.items()):
        room = room_of(module)
        if room not in ROOMS_BELOW:
            continue
        for target in sorted(targets):
            if room_of(target) not in ROOMS_BELOW[room]:
                offenders.append(f"{module} ({room}) imports {target} ({room_of(target)}); {room} may import only "
                                 f"{sorted(map(str, ROOMS_BELOW[room]))}")
    assert not offenders, "imports that point up or sideways:\n" + "\n".join(offenders)


def test_kernels_import_only_prepared_weights_reference_ops_runtime(graph):
    offenders = {
        module: sorted(target for target in targets
                       if not target.startswith("segformer_fast.kernels") and target not in KERNELS_ALLOWED)
        for module, targets in graph.items() if module.startswith("segformer_fast.kernels")
    }
    offenders = {module: targets for module, targets in offenders.items() if targets}
    assert not offenders, f"kernels may import only {sorted(KERNELS_ALLOWED)} from the package; found {offenders}"


def test_only_the_triton_backend_imports_the_kernels(graph):
    importers = sorted(module for module, targets in graph.items() if not module.startswith("segformer_fast.kernels")
                       and any(target.startswith("segformer_fast.kernels") for target in targets))
    assert importers == [KERNELS_IMPORTER], f"modules importing segformer_fast.kernels: {importers}"


def test_no_module_is_longer_than_the_limit():
    long_modules = {str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
                    for path in module_files(PACKAGE_DIRS).values()}
    long_modules = {path: lines for path, lines in long_modules.items() if lines > MAX_MODULE_LINES}
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"


def test_the_package_top_level_imports_no_job_service_or_cli(graph):
    """``segformer_fast/__init__.py`` (the public API) stays below the jobs, the service and the CLI; only
    ``__main__`` runs the CLI."""
    offenders = {module: sorted(t for t in targets if room_of(t) in TOP_ROOMS and t not in ENTRY_POINTS.get(module, ()))
                 for module, targets in graph.items() if room_of(module) is None}
    offenders = {module: targets for module, targets in offenders.items() if targets}
    assert not offenders, f"the package's top level imports {offenders}"
