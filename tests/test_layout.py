"""The house rules that keep the package readable, checked on its source (ast, no imports run):
imports go down the layers only, no private name crosses a module, modules and functions stay
small. A new module must be given its place in LAYERS."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "onnx_lobs"

# Lowest first: a module may import only from modules listed before it (or from its own package).
LAYERS = [
    "version", "errors", "atomic", "hessian", "layers", "solvers", "modelio", "runtime", "index", "rewrite", "graph",
    "channel_ops", "channel_layout", "groups", "flops", "cuts", "calibration", "activations", "memory", "segments", "topology", "allocation", "report", "pictures", "solve", "workers", "distributed", "passes", "evaluate",
    "sensitivity", "output_allocation", "structured_checks", "structured_allocation", "structured", "pruning", "roundtrip", "retrain", "cli", "__init__", "__main__",
]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        yield path, rel.parts


def _top(parts) -> str:
    return parts[0]


def _imports(path, parts):
    """(imported top-level module, imported names) for every package-relative import."""
    tree = ast.parse(path.read_text())
    package = list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            target = base + (node.module.split(".") if node.module else [])
            if target:
                yield target, [a.name for a in node.names]
            else:  # "from . import x" at the package root
                for a in node.names:
                    yield [a.name], []


def test_every_module_has_a_layer():
    missing = {_top(parts) for _, parts in _modules()} - set(LAYERS)
    assert not missing, f"give these modules a place in LAYERS: {sorted(missing)}"


def test_imports_only_go_down():
    wrong = []
    for path, parts in _modules():
        me = LAYERS.index(_top(parts))
        for target, _ in _imports(path, parts):
            if target[0] == _top(parts):
                continue  # within the same module or subpackage
            if target[0] not in LAYERS or LAYERS.index(target[0]) >= me:
                wrong.append(f"{'/'.join(parts)} imports {'.'.join(target)}")
    assert not wrong, wrong


def test_no_private_name_crosses_a_module():
    wrong = []
    for path, parts in _modules():
        for target, names in _imports(path, parts):
            if target[-1].startswith("_") and target[-1] != "__init__":
                wrong.append(f"{'/'.join(parts)} imports the private module {'.'.join(target)}")
            wrong += [f"{'/'.join(parts)} imports {n} from {'.'.join(target)}"
                      for n in names if n.startswith("_") and n != "__version__"]
    assert not wrong, wrong


def test_modules_and_functions_stay_small():
    big = []
    for path, parts in _modules():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            big.append(f"{'/'.join(parts)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big.append(f"{'/'.join(parts)}:{node.lineno} {node.name}: {length} lines")
    assert not big, big
