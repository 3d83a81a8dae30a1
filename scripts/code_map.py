"""A map of dgemma's own code: lines per module, the largest functions, imports made inside functions, and the
import graph's cycles (counting imports inside functions, which hide cycles rather than remove them).

    python scripts/code_map.py            # summary
    python scripts/code_map.py --json     # everything, machine-readable
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The dgemma modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("dgemma")]
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if not base.startswith("dgemma"):
        return []
    return [f"{base}.{a.name}" for a in node.names] + [base]


def scan() -> dict:
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(f): f for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    inner, funcs, lines = [], [], {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lines[mod] = len(path.read_text(encoding="utf-8").splitlines())
        is_pkg = path.name == "__init__.py"
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{mod}.{node.name}"))
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = [t for t in resolve(mod, is_pkg, node) if t in modules and t != mod]
            graph[mod].update(targets)
            p, in_func = parents.get(node), False
            while p is not None:
                if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    in_func = True
                    break
                p = parents.get(p)
            if in_func:
                inner.append(f"{mod}:{node.lineno}")
    return {"lines": lines, "graph": {k: sorted(v) for k, v in graph.items()}, "inner_imports": inner,
            "largest_functions": sorted(funcs, reverse=True)[:15], "cycles": cycles(graph)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10000))
    try:  # the old limit comes back: a caller in the same process (the tests) relies on it
        for v in graph:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = scan()
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{sum(r['lines'].values())} lines in {len(r['lines'])} modules")
    print(f"imports inside functions: {len(r['inner_imports'])}")
    print(f"import cycles: {len(r['cycles'])}")
    for c in r["cycles"]:
        print("  " + " <-> ".join(c))
    print("largest functions:")
    for n, name in r["largest_functions"][:8]:
        print(f"  {n:4d}  {name}")


if __name__ == "__main__":
    main()
