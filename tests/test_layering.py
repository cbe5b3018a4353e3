"""The package's import arrows point one way (DESIGN.md): a lower layer never imports a higher one,
not even lazily inside a function, and no code checks a class by its name string."""

import ast
from pathlib import Path

import lorakit

SRC = Path(lorakit.__file__).parent
# Lower number = lower layer. A module may import its own package and anything of a lower layer.
LAYERS = {
    "config": 0, "dtypes": 0,
    "utils": 1, "methods": 1,
    "precision": 2, "quant": 2, "data": 2,
    "model": 3,
    "lora": 4,
    "train": 5,
    "memory": 6, "report": 6, "export": 6,
    "recipes": 7,
    "cli": 8, "api": 8,
    "__main__": 9, "__init__": 9,
}


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.suffix == ".py" else rel.stem


def _imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level lorakit package, line) of every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = path.relative_to(SRC).parts[:-1]  # the file's package path inside lorakit
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # "from . import x" at the top level
                    parts = [alias.name for alias in node.names][:1]
                found.add((parts[0], node.lineno))
            elif node.module and node.module.startswith("lorakit."):
                found.add((node.module.split(".")[1], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lorakit."):
                    found.add((alias.name.split(".")[1], node.lineno))
    return found


def test_imports_never_point_up_the_layers():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = _package(path)
        assert pkg in LAYERS, f"{path}: add its package {pkg!r} to LAYERS"
        for target, line in _imported_packages(path):
            if target == pkg or target not in LAYERS:
                continue
            if LAYERS[target] >= LAYERS[pkg]:
                bad.append(f"{path.relative_to(SRC)}:{line} ({pkg}) imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_class_name_string_checks():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "__name__":
                inner = node.left.value
                if isinstance(inner, ast.Call) and getattr(inner.func, "id", None) == "type":
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not bad, "type(x).__name__ comparisons (use isinstance; FSDP2 swaps classes): " + ", ".join(bad)
