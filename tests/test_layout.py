"""The layout of the repository (docs/architecture.md): no import circle, small library files, a diffusers-sized
pipeline class, the library independent of training code, no `sys.path` edits."""

import ast
import os
import re

from tools.import_graph import MAX_LIBRARY_LINES, build_graph, circles, long_library_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_FILE = os.path.join(REPO, "src", "gill_pipeline", "pipeline", "pipeline_gill.py")
# diffusers' pipelines have about ten public methods besides properties; loading, retrieval and input processing live
# in mixins and helper classes (loaders/, pipeline/processor.py).
MAX_PIPELINE_PUBLIC_METHODS = 12


def test_no_import_circle():
    found = circles(build_graph())
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_circle_finder_finds_a_circle():
    from tools.import_graph import Module

    modules = {name: Module(name, name, False, 1) for name in ("a", "b", "c")}
    modules["a"].imports = {"b"}
    modules["b"].imports = {"c"}
    modules["c"].imports = {"a"}
    assert circles(modules) == [["a", "b", "c"]]
    modules["c"].imports = set()
    assert circles(modules) == []


def test_no_library_file_is_too_long():
    assert long_library_files(build_graph()) == [], f"library files above {MAX_LIBRARY_LINES} lines"


def test_the_library_never_imports_training_code():
    modules = build_graph()
    for name, module in modules.items():
        if name.startswith("gill_pipeline"):
            assert not [m for m in module.imports if m.startswith("training")], name


def test_pipeline_class_has_few_public_methods():
    with open(PIPELINE_FILE, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GILLPipeline")
    public = []
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            decorators = {getattr(d, "id", getattr(d, "attr", None)) for d in node.decorator_list}
            if "property" not in decorators and "setter" not in decorators:
                public.append(node.name)
    assert len(public) <= MAX_PIPELINE_PUBLIC_METHODS, public


def test_no_sys_path_edits():
    pattern = re.compile(r"sys\.path\.(insert|append)")
    offenders = []
    for folder in ("src", "training", "tests", "benchmarks", "tools"):
        for root, dirs, files in os.walk(os.path.join(REPO, folder)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "data")]
            for file in files:
                if file.endswith(".py"):
                    path = os.path.join(root, file)
                    with open(path, encoding="utf-8") as f:
                        if pattern.search(f.read()) and os.path.abspath(path) != os.path.abspath(__file__):
                            offenders.append(os.path.relpath(path, REPO))
    assert offenders == []


def test_package_root_holds_only_entry_points_and_constants():
    root = os.path.join(REPO, "src", "gill_pipeline")
    loose = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    assert loose == ["__init__.py", "__main__.py", "_deprecated.py", "_import_notices.py", "constants.py"], loose
