"""The floors of ../shared/docs/DESIGN.md, read from the source with `ast` (nothing is imported):

  0  marjax/config.py errors.py typing.py       frozen configs, user-facing errors, shape legend
  1  marjax/ssm/ spiking/ kernels/ pallas_kernels/  the ops
  2  marjax/nn/ marjax/models/ marjax/sampling.py layers, LMs, the token sampler
  3  marjax/io/                                  everything that reads a file
  4  marjax/train/ distill/ eval/, marjax/api.py training, losses, scoring; the public bundle
                                                 (load = io, logits/generate = models)
  5  marjax/app/ cli.py nnx.py __main__.py __init__.py   commands, runner, pipeline, benches
  6  experiments/                                choose variants and seeds, call the runner

Three rules, each failure printed as file:line:
  - no upward import: a module imports only its own floor or the ones below (`marjax/__init__.py`
    is the package facade and may import anything; `import marjax` elsewhere imports the facade,
    so it counts as floor 5);
  - no import circle between modules (imports inside functions count: a late import hides a
    circle, it does not remove it);
  - an import inside a function states why on the same or the previous line, e.g.
    `# late import: optional heavy dependency (matplotlib)`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("marjax", "pallas_kernels", "experiments")

# module prefix (dotted) -> floor; the longest matching prefix wins
FLOORS = {
    "marjax.config": 0, "marjax.errors": 0, "marjax.typing": 0,
    "marjax.ssm": 1, "marjax.spiking": 1, "marjax.kernels": 1, "pallas_kernels": 1,
    "marjax.nn": 2, "marjax.models": 2, "marjax.sampling": 2,
    "marjax.io": 3,
    "marjax.train": 4, "marjax.distill": 4, "marjax.eval": 4, "marjax.api": 4,
    "marjax.app": 5, "marjax.cli": 5, "marjax.nnx": 5, "marjax.__main__": 5, "marjax": 5,
    "experiments": 6,
}
FACADE = "marjax"          # marjax/__init__.py: may import anything
PRAGMAS = ("noqa", "type:", "pragma", "pylint", "fmt:")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict:
    """dotted name -> path for every .py file under the roots."""
    out = {}
    for root in ROOTS:
        for p in sorted((REPO / root).rglob("*.py")):
            out[_module_name(p)] = p
    return out


MODULES = _modules()


def floor_of(module: str):
    best = None
    for prefix, floor in FLOORS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, floor)
    return None if best is None else best[1]


def _resolve(target: str):
    """The in-repo module an import names (the longest existing prefix), or None (third party)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in MODULES:
            return name
    return None


def _targets(node, module: str, is_pkg: bool) -> list:
    """In-repo modules named by one Import / ImportFrom node."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:   # relative: resolve against this module's package
            pkg = module.split(".") if is_pkg else module.split(".")[:-1]
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        # `from pkg import sub` names the submodule when there is one, else the package itself
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return sorted({t for t in (_resolve(n) for n in names) if t is not None})


def _comment(lines: list, lineno: int) -> str:
    """The comment on source line `lineno` (1-based), without linter pragmas."""
    if not 1 <= lineno <= len(lines):
        return ""
    line = lines[lineno - 1]
    i = line.find("#")
    if i < 0:
        return ""
    text = line[i + 1:].strip()
    return "" if not text or text.lower().startswith(PRAGMAS) else text


class _Imports(ast.NodeVisitor):
    def __init__(self):
        self.found = []          # (node, inside_function)
        self._depth = 0

    def _scope(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def visit_Import(self, node):
        self.found.append((node, self._depth > 0))

    visit_ImportFrom = visit_Import


def _scan():
    """(edges {module: {target: first line}}, upward [msg], late [msg])."""
    edges, upward, late = {}, [], []
    for module, path in MODULES.items():
        src = path.read_text()
        lines = src.splitlines()
        v = _Imports()
        v.visit(ast.parse(src, str(path)))
        rel = path.relative_to(REPO)
        floor = floor_of(module)
        for node, in_function in v.found:
            if in_function and not (_comment(lines, node.lineno) or _comment(lines, node.lineno - 1)
                                    or _comment(lines, getattr(node, "end_lineno", node.lineno))):
                late.append(f"{rel}:{node.lineno}: import inside a function without a reason: "
                            f"{ast.unparse(node)}")
            for t in _targets(node, module, path.name == "__init__.py"):
                if t == module:
                    continue
                edges.setdefault(module, {}).setdefault(t, node.lineno)
                tf = floor_of(t)
                if module != FACADE and floor is not None and tf is not None and tf > floor:
                    upward.append(f"{rel}:{node.lineno}: floor {floor} imports {t} (floor {tf})")
    return edges, upward, late


def _cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


EDGES, UPWARD, LATE = _scan()


def test_every_module_has_a_floor():
    missing = [str(p.relative_to(REPO)) for m, p in MODULES.items() if floor_of(m) is None]
    assert not missing, "modules outside every floor (add them to FLOORS):\n" + "\n".join(missing)


def test_no_upward_imports():
    assert not UPWARD, f"{len(UPWARD)} upward imports:\n" + "\n".join(UPWARD)


def test_no_import_circles():
    msgs = []
    for comp in _cycles(EDGES):
        inside = set(comp)
        arrows = [f"  {MODULES[a].relative_to(REPO)}:{line} imports {b}"
                  for a in comp for b, line in sorted(EDGES.get(a, {}).items()) if b in inside]
        msgs.append("circle " + " <-> ".join(comp) + "\n" + "\n".join(arrows))
    assert not msgs, "\n".join(msgs)


def test_imports_in_functions_say_why():
    assert not LATE, f"{len(LATE)} imports inside functions without a reason:\n" + "\n".join(LATE)


# ----------------------------------------------------------------------------- the checker itself

@pytest.mark.parametrize("module,floor", [("marjax.ssm.api", 1), ("marjax.io.resolve", 3), ("marjax.api", 4),
                                          ("marjax.app.runner", 5), ("marjax", 5), ("marjax.typing", 0)])
def test_floor_of(module, floor):
    assert floor_of(module) == floor


def test_checker_finds_circles_and_reasons():
    assert _cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
    lines = ["    import x  # late import: optional (matplotlib)", "    # noqa: E402", "    import y"]
    assert _comment(lines, 1).startswith("late import") and _comment(lines, 2) == "" and _comment(lines, 3) == ""
    tree = ast.parse("def f():\n    import os\nimport sys\n")
    v = _Imports()
    v.visit(tree)
    assert [(ast.unparse(n), inside) for n, inside in v.found] == [("import os", True), ("import sys", False)]
