"""The package layers (shared/DESIGN.md): every import of every module, lazy ones inside
functions included, read with `ast`, against the edges the architecture forbids."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder → the package it installs as (setup.py's package_dir).
PACKAGES = {"embtables": "embtables", "kernels": "embtables.kernels", "pipelines": "embtables.pipelines"}

# (importer prefix, imported prefix, why it is forbidden)
FORBIDDEN = [
    ("embtables.", "embtables.pipelines", "the library never imports the jobs"),
    ("embtables.kernels", "embtables.methods", "kernels know tables, not methods (both speak embtables.specs)"),
    ("embtables.methods", "embtables.kernels", "methods never import kernels (both speak embtables.specs)"),
    ("embtables.pipelines.data", "embtables.pipelines.cli", "a job never reaches up to the CLI"),
    ("embtables.pipelines.train", "embtables.pipelines.cli", "a job never reaches up to the CLI"),
    ("embtables.pipelines.serve", "embtables.pipelines.cli", "a job never reaches up to the CLI"),
    ("embtables.pipelines.bench", "embtables.pipelines.cli", "a job never reaches up to the CLI"),
    ("embtables.pipelines.data", "embtables.pipelines.train", "data comes before training"),
    ("embtables.pipelines.data", "embtables.pipelines.serve", "data comes before serving"),
    ("embtables.pipelines.data", "embtables.pipelines.bench", "data comes before benchmarks"),
]


def modules() -> dict[str, Path]:
    """Every module of the three source trees by its installed dotted name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement anywhere in the file."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = name.split(".")[:len(name.split(".")) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]  # `from pkg import module`
    return out


def under(module: str, prefix: str) -> bool:
    return module == prefix.rstrip(".") or module.startswith(prefix if prefix.endswith(".") else prefix + ".")


def violations() -> list[str]:
    bad = []
    for name, path in modules().items():
        for line, target in imports(name, path):
            for importer, imported, why in FORBIDDEN:
                library = importer == "embtables." and under(name, "embtables.pipelines")
                if under(name, importer) and not library and under(target, imported):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}: {why}")
    return sorted(set(bad))


def test_the_trees_have_modules_to_check():
    names = modules()
    assert "embtables.collection" in names and "embtables.kernels.lookup" in names
    assert "embtables.kernels.triton.lookup" in names  # nested kernel packages are walked too
    assert "embtables.pipelines.cli.main" in names and "embtables.pipelines.data.batches" in names


def test_no_module_imports_across_a_forbidden_edge():
    assert violations() == []


def test_pipelines_has_no_top_level_module():
    assert sorted(p.name for p in (ROOT / "pipelines").glob("*.py")) == ["__init__.py"]


@pytest.mark.parametrize("source, target", [
    ("import embtables.pipelines.train.local", "embtables.pipelines.train.local"),
    ("def f():\n    from embtables.methods.binary_code import X", "embtables.methods.binary_code"),
    ("from embtables.methods import binary_code", "embtables.methods.binary_code"),
])
def test_the_walk_sees_lazy_and_from_imports(tmp_path, source, target):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert target in [t for _, t in imports("embtables.kernels.m", path)]


def test_relative_imports_resolve_against_the_package(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from ..methods import base\nfrom . import lookup\n")
    found = [t for _, t in imports("embtables.kernels.m", path)]
    assert "embtables.methods.base" in found and "embtables.kernels.lookup" in found
