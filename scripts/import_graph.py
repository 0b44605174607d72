"""The import graph of the ``uge`` package, checked against its layers (issue 12).

Usage: python scripts/import_graph.py [SRC_DIR ...]   (default: src; give an older checkout's src to compare)

Lists every import between the package's modules (module level and inside functions), then the imports that
point *up* the layers below (a module importing one from a higher layer) and any import cycle between
top-level parts. A lower layer must not know the layers above it.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

LAYERS = [  # lowest first; a part is a module (``result``) or a subpackage (``protectors``)
    {"errors", "params", "utils", "workers", "distributed", "standing"},
    {"config", "seeds"},
    {"data", "similarity", "sealing"},
    {"models", "weights", "pgd"},
    {"training", "diagnostics"},
    {"result", "records"},
    {"countermeasures", "protectors", "published", "protect", "publish"},  # the last two: before issue 12
    {"evaluate"},
    {"benchmark", "demo"},
    {"cli", "__init__", "__main__"},
]
LEVEL = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _exists(src: Path, module: str) -> bool:
    path = src.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def edges(src: Path) -> list[tuple[str, str, bool]]:
    """(importer, imported, lazy) for every import of one ``uge`` module by another; lazy: inside a function."""
    out = []
    for path in sorted((src / "uge").rglob("*.py")):
        mod = _module_name(path, src)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        lazy_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in ast.walk(f)}
        typing_only = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and "TYPE_CHECKING" in ast.unparse(i.test)
                       for n in ast.walk(i)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] if node.module else [f"{target}.{a.name}" if _exists(src, f"{target}.{a.name}")
                                                      else target for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for t in names:
                if t.startswith("uge.") and t != mod:
                    out.append((mod, t, id(node) in lazy_nodes))
    return out


def part(module: str) -> str:
    """The top-level part of a module: ``uge.protectors.em`` -> ``protectors``; ``uge`` -> ``__init__``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def report(src: Path) -> tuple[list[str], list[str]]:
    """(upward imports, cycles between parts) as printable lines."""
    es = edges(src)
    upward = sorted({f"{a} -> {b}{' (lazy)' if lazy else ''}" for a, b, lazy in es
                     if part(a) != part(b) and LEVEL.get(part(b), -1) > LEVEL.get(part(a), 99)})
    unknown = sorted({part(m) for e in es for m in e[:2]} - set(LEVEL))
    upward += [f"{p}: not in any layer" for p in unknown]
    graph = defaultdict(set)
    for a, b, _ in es:
        if part(a) != part(b):
            graph[part(a)].add(part(b))
    cycles = sorted({" <-> ".join(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, ())})
    return upward, cycles


def main(argv: list[str]) -> int:
    for src in map(Path, argv or ["src"]):
        es = edges(src)
        upward, cycles = report(src)
        print(f"## {src}: {len(es)} imports between uge modules ({sum(e[2] for e in es)} inside functions)")
        print(f"upward imports: {len(upward)}")
        for line in upward:
            print(f"  {line}")
        print(f"cycles between parts: {len(cycles)}")
        for line in cycles:
            print(f"  {line}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
