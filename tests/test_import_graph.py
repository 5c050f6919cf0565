"""The package's imports run one way: no module imports, even inside a function, one that imports it back.

Read from the source with ``ast`` (nothing is imported): every ``import stable_diffusion.x``,
``from stable_diffusion.x import y``, ``from . import x`` and ``from .x import y``, at any depth of
the module (a function-level import closes a circle just as well, only later).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stable_diffusion"


def module_names(package: Path) -> dict:
    """{dotted module name: file} of every module under ``package`` (a package is its ``__init__``)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = (package.name,) + path.relative_to(package).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(name: str, path: Path, modules: dict) -> set:
    """The package's modules that module ``name`` (at ``path``) imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative to the module's package: a package's __init__ is inside itself.
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            # "from origin import x" imports origin, or origin.x where x is a submodule.
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names]
        else:
            continue
        for target in targets:
            # "import a.b.c" runs a.b.c; the nearest module of the package that the name names.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict):
    """One import circle as [a, b, ..., a], or None."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph(package: Path) -> dict:
    modules = module_names(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_the_package_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert "stable_diffusion.pipeline" in graph["stable_diffusion"]  # the parser sees the package's imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_errors_is_the_bottom_floor():
    assert import_graph(PACKAGE)["stable_diffusion.errors"] == set()


def test_a_circle_closed_inside_a_function_or_through_the_package_is_found(tmp_path):
    """The checker itself, on a crafted package: each import form makes an edge, and circles are reported."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import A\n",
        "a.py": "import os\nfrom . import b\n",
        "b.py": "from .sub.c import C\n",
        "sub/__init__.py": "",
        "sub/c.py": "def late():\n    from ..a import A\n",
        "d.py": "import pkg.sub.c\nfrom pkg import e\n",
        "e.py": "from .. import something_outside\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph(package)
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.a"},
        "pkg.d": {"pkg.sub.c", "pkg.e"},
        "pkg.e": set(),
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (package / "sub" / "c.py").write_text("def late():\n    pass\n")
    assert find_cycle(import_graph(package)) is None
