"""The package's floor plan, checked from the source (ast; nothing is imported): wings instead of loose modules,
imports that point down only and form no circle, rooms of a readable size, arguments that travel as records."""

import ast
from collections import defaultdict
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "dit"
# The wings, lowest first: a module may import from its own wing and the wings before it, never from a later one.
LAYERS = [
    ("dit.registry", "dit.atomic", "dit.integrity"),
    ("dit.ops",),
    ("dit.models",),
    ("dit.diffusion",),
    ("dit.data",),
    ("dit.eval",),
    ("dit.hub",),
    ("dit.sampling",),
    ("dit.phema",),
    ("dit.training",),
    ("dit.analysis",),
    ("dit.zoo", "dit.demo"),  # command-line programs
]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def layer(module: str) -> int:
    for i, wing in enumerate(LAYERS):
        if any(module == w or module.startswith(w + ".") for w in wing):
            return i
    raise AssertionError(f"{module} is in no wing of tests/test_layout.py's LAYERS")


def imports(name: str, path: Path, known: dict[str, Path]):
    """(imported dit module, line, inside a function?) for every import of a dit module in the file."""
    tree = ast.parse(path.read_text())
    inside = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dit"):
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("dit")]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name:
                yield target, node.lineno, id(node) in inside


def test_the_top_level_holds_at_most_six_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 6, loose


def test_imports_point_down_and_form_no_circle():
    known = modules()
    graph, upward = defaultdict(set), []
    for name, path in known.items():
        for target, line, _ in imports(name, path, known):
            graph[name].add(target)
            if layer(target) > layer(name):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, upward
    state, cycle = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(known):
        if node not in state:
            visit(node, [node])
    assert not cycle, cycle


def test_an_import_inside_a_function_says_why():
    """Deferred imports of our own modules are for a heavy or optional dependency, with the reason on the line."""
    known, silent = modules(), []
    for name, path in known.items():
        lines = path.read_text().splitlines()
        for _, line, deferred in imports(name, path, known):
            if deferred and "#" not in lines[line - 1]:
                silent.append(f"{path.relative_to(ROOT)}:{line}")
    assert not silent, silent


def test_rooms_of_a_readable_size():
    """No module over 450 lines, no function of 80 lines or more, at most 4 functions with 8 or more parameters
    (the Triton kernels' launch signatures among them), the Trainer built from at most 6."""
    files = [*modules().values(), ROOT / "train.py", ROOT / "sample.py"]
    long_modules, long_functions, wide = [], [], []
    for path in files:
        text = path.read_text()
        if len(text.splitlines()) > 450:
            long_modules.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(ROOT)}:{node.name}"
                if node.end_lineno - node.lineno + 1 >= 80:
                    long_functions.append(where)
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
                count = len(params) - (bool(a.args) and a.args[0].arg in ("self", "cls"))
                if count >= 8:
                    wide.append(where)
                if where == "dit/training/loop.py:__init__":
                    assert count <= 6, where
    assert not long_modules and not long_functions, (long_modules, long_functions)
    assert len(wide) <= 4, wide


def test_the_formatter_is_trusted():
    skips = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts for _ in range(p.read_text().count("fmt: skip"))]
    assert len(skips) <= 10, sorted({str(p.relative_to(ROOT)) for p in skips})
