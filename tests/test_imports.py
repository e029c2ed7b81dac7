"""The import layers of mtnlg, checked from the source with ``ast``: every import, at module level or inside a
function, absolute or relative, so a lazy import inside a function cannot hide a cycle. The rules are
``FORBIDDEN``, ``ALLOWED`` and ``ONLY_IMPORTED_BY`` below, and no cycle between packages. ``pytest -s`` prints
the package-level import graph.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mtnlg"

# What each package must not import (a package is a subpackage or a top-level module of mtnlg).
# parallel <- model <- training; checkpoint below training, convert and eval; training may run evaluations
# (in-training lm-eval) but nothing below it imports it; data never imports model (a family may import its own data
# builders: ``Family.sources``); nothing imports the CLI; the
# planner (plan) reads model, training and config and imports nothing that trains, converts or benchmarks.
FORBIDDEN: dict[str, set[str]] = {
    "model": {"training", "checkpoint", "convert", "eval", "bench", "cli"},
    "checkpoint": {"training", "convert", "eval", "bench", "cli", "data"},
    "data": {"model", "training", "checkpoint", "convert", "eval", "bench", "cli"},
    "training": {"convert", "bench", "cli"},
    "convert": {"training", "bench", "cli"},
    "eval": {"training", "bench", "cli"},
    "plan": {"bench", "convert", "eval", "checkpoint", "data", "cli"},
    "serve": {"training", "bench", "cli", "plan", "convert"},
    "curate": {"model", "training", "checkpoint", "convert", "eval", "bench", "cli", "plan", "parallel"},
}
# What each package may import, where that list is shorter (anything else is a violation). ``deepspeed_compat``
# holds every workaround of DeepSpeed (it imports no other mtnlg package but ``files``).
ALLOWED: dict[str, set[str]] = {"parallel": {"errors", "files", "deepspeed_compat"}, "families": set(),
                                "deepspeed_compat": {"files"}, "files": set(), "errors": set()}
# packages only the named ones import: nothing imports mtnlg.cli (feature modules register with add_commands), and
# only the CLI imports the planner (a leaf above training, model and config)
ONLY_IMPORTED_BY: dict[str, set[str]] = {"cli": {"__main__"}, "plan": {"cli"}}

# Violations in code being reworked elsewhere, to be fixed there; each fix must remove its entry (the test
# fails on a stale one), so this set only shrinks. An entry names the importing module and the imported one
# ("a.b -> c.d"), or a package-level cycle ("cycle: p -> q -> p").
KNOWN_VIOLATIONS: set[str] = set()


def module_name(path: Path) -> str:
    parts = ("mtnlg", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if name != "mtnlg" else Path()
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(mtnlg module, line) of every import of mtnlg in a file, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:  # ``from pkg import sub`` imports the submodule pkg.sub
                sub = f"{base}.{a.name}"
                out.append((sub if is_module(sub) else base, node.lineno))
    return [(m, line) for m, line in out if m == "mtnlg" or m.startswith("mtnlg.")]


def package_of(module: str) -> str:
    """``mtnlg.model.gpt`` -> ``model``; ``mtnlg.cli`` -> ``cli``; ``mtnlg`` -> ``mtnlg``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mtnlg"


def module_imports() -> dict[tuple[str, str], list[str]]:
    """(importing module, imported module) -> where ("path:line"), for every mtnlg file."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        src = module_name(path)
        for dst, line in imports_of(path):
            found[(src, dst)].append(f"{path.relative_to(ROOT.parent)}:{line}")
    return found


def violations(found: dict[tuple[str, str], list[str]]) -> dict[str, str]:
    """Broken layer rules: entry (as in ``KNOWN_VIOLATIONS``) -> the rule and where."""
    out = {}
    for (src, dst), where in found.items():
        a, b = package_of(src), package_of(dst)
        if a == b:
            continue
        rule = None
        if b in FORBIDDEN.get(a, ()):
            rule = f"{a} must not import {b}"
        elif a in ALLOWED and b not in ALLOWED[a]:
            rule = f"{a} may import only {', '.join(sorted(ALLOWED[a]))}"
        elif b in ONLY_IMPORTED_BY and a not in ONLY_IMPORTED_BY[b]:
            rule = (f"only {', '.join(sorted(ONLY_IMPORTED_BY[b]))} may import mtnlg.{b}" if b != "cli" else
                    "nothing imports mtnlg.cli (register subcommands with add_commands)")
        if rule:
            out[f"{src} -> {dst}"] = f"{rule} ({', '.join(where)})"
    for cycle in cycles(package_graph(found)):
        out["cycle: " + " -> ".join([*cycle, cycle[0]])] = "packages import each other"
    return out


def package_graph(found: dict[tuple[str, str], list[str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in found:
        a, b = package_of(src), package_of(dst)
        if a != b:
            graph[a].add(b)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one package (Tarjan), each written
    from its alphabetically first package."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return [_cycle_in(comp, graph) for comp in sorted(components)]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest cycle through the component's first package, by breadth-first search."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ()) & members):
                if w == start:
                    return paths[v]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def test_import_layers():
    found = module_imports()
    graph = package_graph(found)
    print("\nmtnlg package imports (importer -> imported: modules importing):")
    for a in sorted(graph):
        for b in sorted(graph[a]):
            n = sum(1 for src, dst in found if package_of(src) == a and package_of(dst) == b)
            print(f"  {a} -> {b}  ({n})")
    broken = violations(found)
    if broken:
        print("violations:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(broken.items())))
    new = {k: v for k, v in broken.items() if k not in KNOWN_VIOLATIONS}
    assert not new, "import layer violations:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(new.items()))
    fixed = KNOWN_VIOLATIONS - set(broken)
    assert not fixed, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(fixed)}"


def test_the_checker_sees_lazy_relative_and_from_imports(tmp_path, monkeypatch):
    """The checker itself: imports inside functions, relative imports and ``from pkg import submodule`` are
    found, a forbidden one is reported, and a cycle between packages is found."""
    pkg = tmp_path / "mtnlg"
    for rel, text in {
        "__init__.py": "",
        "cli.py": "",
        "model/__init__.py": "from .gpt import GPT\n",
        "model/gpt.py": "def f():\n    from ..training import loop\n",
        "training/__init__.py": "",
        "training/loop.py": "import mtnlg.model.gpt\nfrom mtnlg import cli\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setitem(globals(), "ROOT", pkg)
    found = module_imports()
    assert set(found) == {("mtnlg.model", "mtnlg.model.gpt"), ("mtnlg.model.gpt", "mtnlg.training.loop"),
                          ("mtnlg.training.loop", "mtnlg.model.gpt"), ("mtnlg.training.loop", "mtnlg.cli")}
    assert found[("mtnlg.model.gpt", "mtnlg.training.loop")] == ["mtnlg/model/gpt.py:2"]
    assert set(violations(found)) == {"mtnlg.model.gpt -> mtnlg.training.loop",
                                      "mtnlg.training.loop -> mtnlg.cli", "cycle: model -> training -> model"}
