"""The package's shape: no import cycles between offprune's modules (function-level imports count)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "offprune"


def import_graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in ROOT.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("offprune"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ re-exporting its submodules is not a cycle
    def related(a, b):
        return a.startswith(b + ".") or b.startswith(a + ".")

    cycles = []

    def visit(start, node, path):
        for nxt in graph[node]:
            if nxt == start and not any(related(a, b) for a in path for b in path if a != b):
                cycles.append(path)
            elif nxt not in path and len(path) < 8:
                visit(start, nxt, path + [nxt])

    for module in graph:
        visit(module, module, [module])
    assert cycles == [], cycles[:3]
    # the graph sees real edges, lazy ones included: sparse builds on nets, never the other way round
    assert "offprune.nets" in graph["offprune.sparse"] and "offprune.sparse" not in graph["offprune.nets"]
    assert "offprune.data.behaviour" in graph["offprune.data.generate"]  # a function-level import
