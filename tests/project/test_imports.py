"""The package's import graph against docs/DESIGN.md section 2, which is the one source of the rooms: no cycles,
every room imports exactly the rooms its row names and only rooms below it, each room's ``__init__`` says the same,
and every optional dependency is imported only where the second table says.

Every ``import`` and ``from ... import`` in segformer_fast/*.py and kernels/*.py is read with ``ast``, at module
level and inside functions alike (an import inside a function that closes a circle is still a circle); relative
imports are resolved, and kernels/ is the package ``segformer_fast.kernels``. Only edges between project modules
count. Importing ``a.b`` is an edge to ``a.b`` only (not to its parent package ``a``), but ``from a import name``
where ``name`` is not a module is an edge to ``a`` itself, whose ``__init__`` defines it.
"""

import ast
import re
from pathlib import Path

import pytest

from helpers import ROOT

DESIGN = ROOT / "docs" / "DESIGN.md"
#: Project module name prefix -> the folder holding its files.
PACKAGE_DIRS = {"segformer_fast": ROOT / "segformer_fast", "segformer_fast.kernels": ROOT / "kernels"}
#: Compiled modules (no .py file; they import nothing from the project): ``from . import _C`` is an edge to them.
EXTENSION_MODULES = ("segformer_fast._C",)
#: Names the rooms table uses beside the rooms: the package's own ``__init__`` and the compiled extension.
TOP_PACKAGE, EXTENSION = "segformer_fast", "_C"
#: The rooms the package's top level (``__init__``) never imports; ``__main__`` runs the CLI.
TOP_ROOMS = ("jobs", "serve", "cli")
ENTRY_POINTS = {"segformer_fast.__main__": ("segformer_fast.cli",)}
#: The one module that imports the Triton kernels (triton is optional; the engine imports it lazily).
KERNELS_IMPORTER = "segformer_fast.engine.triton_backend"


def markdown_table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header line starts with ``header``."""
    lines = text[text.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def code_names(cell: str) -> list[str]:
    """The `backticked` names of a table cell, in order."""
    return re.findall(r"`([^`]+)`", cell)


def rooms_table(text: str) -> dict:
    """{room: (rooms it imports, modules it is limited to or None)} from the rooms table, top room first."""
    table = {}
    for first, _, imports in markdown_table(text, "| room | modules and their one job |"):
        room = code_names(first)[0].rstrip("/")
        names = code_names(imports)
        rooms = {name.split(".")[0] for name in names}
        modules = {f"segformer_fast.{name}" for name in names if "." in name} or None
        table[room] = (rooms, modules)
    return table


def dependencies_table(text: str) -> dict:
    """{optional dependency: the module patterns (``room.module`` or ``room.*``) allowed to import it}."""
    return {code_names(dependency)[0]: set(code_names(importers))
            for dependency, importers in markdown_table(text, "| dependency | imported by |")}


ROOMS = rooms_table(DESIGN.read_text(encoding="utf-8"))
#: The rooms of the package, top first (the table's order), and the rooms each imports (its own included).
ROOM_ORDER = list(ROOMS)
ROOMS_BELOW = {room: rooms | {room} for room, (rooms, _) in ROOMS.items()}


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
    """The room a project module lives in ("kernels" for segformer_fast.kernels.*, "_C" for the extension), or
    None for the package's top-level modules."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    if parts[1] in ROOMS_BELOW or parts[1] == EXTENSION:
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


def test_the_rooms_table_lists_every_room_folder():
    folders = {path.name for path in PACKAGE_DIRS["segformer_fast"].iterdir()
               if (path.is_dir() and (path / "__init__.py").exists()) or path.is_symlink()}
    assert set(ROOMS) == folders, f"rooms in docs/DESIGN.md {sorted(ROOMS)}, folders {sorted(folders)}"


def test_every_room_imports_what_its_row_says_and_only_rooms_below_it(graph):
    found = {room: set() for room in ROOMS}
    for module, targets in graph.items():
        room = room_of(module)
        if room in found:
            found[room].update(str(room_of(target) or TOP_PACKAGE) for target in targets)
    problems = []
    for room, (listed, _) in ROOMS.items():
        imported = found[room] - {room}
        if imported != listed:
            problems.append(f"{room} imports {sorted(imported)}; docs/DESIGN.md says {sorted(listed)}")
        upward = [other for other in listed if other in ROOMS and ROOM_ORDER.index(other) <= ROOM_ORDER.index(room)]
        if upward:
            problems.append(f"{room} imports {upward}, which are not below it in the table")
    assert not problems, "the rooms table and the imports disagree:\n" + "\n".join(problems)


def test_rooms_limited_to_modules_import_only_those(graph):
    offenders = {}
    for room, (_, allowed) in ROOMS.items():
        if allowed is None:
            continue
        for module, targets in graph.items():
            if room_of(module) == room:
                outside = sorted(t for t in targets if room_of(t) != room and t not in allowed)
                if outside:
                    offenders[module] = outside
    assert not offenders, f"modules importing beyond what docs/DESIGN.md allows their room: {offenders}"


@pytest.mark.parametrize("room", [room for room in ROOM_ORDER if room != "kernels"])
def test_each_room_init_says_what_it_imports(room):
    """A room's ``__init__.py`` docstring ends with the line "Imports from the project: ..." naming its row's
    rooms in the table's order ("nothing" for none); kernels/ has no ``__init__`` (its README says it)."""
    docstring = ast.get_docstring(ast.parse((PACKAGE_DIRS["segformer_fast"] / room / "__init__.py").read_text()))
    assert docstring, f"segformer_fast/{room}/__init__.py has no docstring saying what the room holds"
    listed = ROOMS[room][0]
    names = [name for name in [*ROOM_ORDER, EXTENSION, TOP_PACKAGE] if name in listed]
    expected = f"Imports from the project: {', '.join(names) if names else 'nothing'}."
    assert docstring.splitlines()[-1] == expected, f"segformer_fast/{room}/__init__.py: expected {expected!r}"


def optional_imports(path) -> set:
    """Every module name an ``import`` in ``path`` names: ``import a.b`` gives a.b, ``from a import b`` a and a.b."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_optional_dependencies_are_imported_only_where_design_says():
    allowed = dependencies_table(DESIGN.read_text(encoding="utf-8"))
    importers = {dependency: set() for dependency in allowed}
    for module, path in module_files(PACKAGE_DIRS).items():
        short = module.removeprefix("segformer_fast.")
        for name in optional_imports(path):
            for dependency in allowed:
                if name == dependency or name.startswith(dependency + "."):
                    importers[dependency].add(short)
    for dependency, found in importers.items():
        patterns = allowed[dependency]
        stray = sorted(m for m in found if m not in patterns and f"{m.split('.')[0]}.*" not in patterns)
        assert not stray, f"{dependency} is imported by {stray}; docs/DESIGN.md says only {sorted(patterns)}"
        missing = sorted(p for p in patterns if not p.endswith(".*") and p not in found)
        assert not missing, f"docs/DESIGN.md says {missing} import {dependency}; they do not"


def test_only_the_triton_backend_imports_the_kernels(graph):
    importers = sorted(module for module, targets in graph.items() if not module.startswith("segformer_fast.kernels")
                       and any(target.startswith("segformer_fast.kernels") for target in targets))
    assert importers == [KERNELS_IMPORTER], f"modules importing segformer_fast.kernels: {importers}"


def test_the_package_top_level_imports_no_job_service_or_cli(graph):
    """``segformer_fast/__init__.py`` (the public API) stays below the jobs, the service and the CLI; only
    ``__main__`` runs the CLI."""
    offenders = {module: sorted(t for t in targets if room_of(t) in TOP_ROOMS and t not in ENTRY_POINTS.get(module, ()))
                 for module, targets in graph.items() if room_of(module) is None}
    offenders = {module: targets for module, targets in offenders.items() if targets}
    assert not offenders, f"the package's top level imports {offenders}"


def test_the_package_imports_absolutely():
    """Every import of the package and the kernels names its module in full (``from segformer_fast.jobs.outputs
    import ...``), so a module reads the same wherever it moves and the rooms it imports show at a glance."""
    relative = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in module_files(PACKAGE_DIRS).values()
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, f"relative imports: {relative}"
