"""The import graph of the library (`src/gill_pipeline`) and the training code (`training/`), and its circles.

    python -m tools.import_graph              # every circle, the layout figures; exit 1 when there is a circle
    python -m tools.import_graph --edges      # also every edge, `a -> b`, one a line
    python -m tools.import_graph --dot g.dot  # the module graph in Graphviz' format

Every import counts, including those inside functions (an import moved into a function still makes a circle; it only
hides it from Python's import-time check). `from .x import y` depends on `x.y` when that is a module, else on `x`;
importing `a.b.c` from outside the package `a.b` also depends on `a.b` and `a` (Python runs their `__init__` first).
Standard-library and third-party imports are left out. A circle is a strongly connected component of more than one
module (or a module that imports itself).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (import name of the top package, folder that holds it)
ROOTS = (("gill_pipeline", os.path.join(REPO, "src")), ("training", REPO))
# A library file above this many lines is reported as too long (issue 20: "no library file above ~600 lines").
MAX_LIBRARY_LINES = 600


@dataclass
class Module:
    name: str
    path: str
    is_package: bool
    lines: int
    imports: set[str] = field(default_factory=set)


def find_modules() -> dict[str, Module]:
    """Every `.py` file below the roots, by dotted module name."""
    modules = {}
    for top, base in ROOTS:
        for folder, dirs, files in os.walk(os.path.join(base, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for file in sorted(files):
                if not file.endswith(".py"):
                    continue
                path = os.path.join(folder, file)
                parts = os.path.relpath(path, base)[: -len(".py")].split(os.sep)
                is_package = parts[-1] == "__init__"
                if is_package:
                    parts = parts[:-1]
                with open(path, encoding="utf-8") as f:
                    lines = sum(1 for _ in f)
                modules[".".join(parts)] = Module(".".join(parts), path, is_package, lines)
    return modules


def _resolve(module: Module, level: int, target: str | None) -> str:
    """The absolute dotted name of a (possibly relative) import inside `module`."""
    if level == 0:
        return target or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _known(name: str, modules: dict[str, Module]) -> str | None:
    """`name` or its closest parent that is a module of ours."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def read_imports(modules: dict[str, Module]) -> None:
    for module in modules.values():
        with open(module.path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=module.path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    targets.append(sub if sub in modules else base)
            for target in targets:
                known = _known(target, modules)
                if known is None or known == module.name:
                    continue
                module.imports.add(known)
                # Importing `a.b.c` runs the `__init__` of `a` and `a.b` first, unless the importer is inside them.
                own = module.name if module.is_package else module.name.rpartition(".")[0]
                parent = known.rpartition(".")[0]
                while parent and not (own == parent or own.startswith(parent + ".")):
                    module.imports.add(parent)
                    parent = parent.rpartition(".")[0]


def circles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, iter(sorted(modules[start].imports)))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(modules[child].imports))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def long_library_files(modules: dict[str, Module], limit: int = MAX_LIBRARY_LINES) -> list[tuple[str, int]]:
    return sorted(
        ((os.path.relpath(m.path, REPO), m.lines) for m in modules.values() if m.name.startswith("gill_pipeline")
         and m.lines > limit),
        key=lambda item: -item[1],
    )


def build_graph() -> dict[str, Module]:
    modules = find_modules()
    read_imports(modules)
    return modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", action="store_true", help="print every edge, `a -> b`")
    parser.add_argument("--dot", metavar="FILE", help="write the graph in Graphviz' format to FILE")
    args = parser.parse_args(argv)

    modules = build_graph()
    if args.edges:
        for name in sorted(modules):
            for target in sorted(modules[name].imports):
                print(f"{name} -> {target}")
    if args.dot:
        with open(args.dot, "w", encoding="utf-8") as f:
            f.write("digraph imports {\n  rankdir=LR;\n")
            for name in sorted(modules):
                for target in sorted(modules[name].imports):
                    f.write(f'  "{name}" -> "{target}";\n')
            f.write("}\n")
    found = circles(modules)
    edges = sum(len(m.imports) for m in modules.values())
    print(f"modules: {len(modules)}, edges: {edges}, circles: {len(found)}")
    for component in found:
        print("circle: " + " <-> ".join(component))
    long_files = long_library_files(modules)
    print(f"library files above {MAX_LIBRARY_LINES} lines: {len(long_files)}")
    for path, lines in long_files:
        print(f"  {path}: {lines}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
