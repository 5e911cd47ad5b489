"""The minimal baseline is independent: nothing it runs comes from the product.

Every module of ``bench/minimal`` and every ``bench`` module it imports, followed through
their own imports, must import nothing from ``dispatcher`` or ``workers``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT = {"dispatcher", "workers"}

pytestmark = pytest.mark.unit


def imports_of(path: Path, package: str) -> set[str]:
    """Dotted names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # ``from bench import stats`` imports the module bench.stats
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def module_path(name: str) -> Path | None:
    parts = name.split(".")
    as_file = REPO.joinpath(*parts).with_suffix(".py")
    if as_file.is_file():
        return as_file
    as_package = REPO.joinpath(*parts, "__init__.py")
    return as_package if as_package.is_file() else None


def product_imports(root: Path) -> dict[str, list[str]]:
    """Every ``bench`` module reachable from ``root`` (a file or the files under a folder):
    the product modules each imports."""
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    todo = [(p, ".".join(p.relative_to(REPO).with_suffix("").parts)) for p in files]
    seen: set[Path] = set()
    offenders: dict[str, list[str]] = {}
    while todo:
        path, name = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for module in imports_of(path, package):
            top = module.split(".")[0]
            if top in PRODUCT:
                offenders.setdefault(str(path.relative_to(REPO)), []).append(module)
            elif top in {"bench", "tests"}:
                target = module_path(module)
                if target is not None:
                    todo.append((target, module))
    return offenders


def test_the_minimal_baseline_imports_nothing_of_the_product() -> None:
    assert (REPO / "bench" / "minimal" / "handoff.py").is_file()
    assert product_imports(REPO / "bench" / "minimal") == {}


def test_the_check_follows_bench_imports_to_the_product(tmp_path: Path) -> None:
    # bench/runner.py imports the product: reaching it through a bench import is caught.
    (tmp_path / "probe.py").write_text("from bench import runner\n")
    names = imports_of(tmp_path / "probe.py", "bench.probe")
    assert "bench.runner" in names
    offenders = product_imports(REPO / "bench" / "runner.py")
    assert any(m.startswith("dispatcher") for ms in offenders.values() for m in ms)


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text("from . import amqp\nfrom ..stats import percentile\n")
    names = imports_of(tmp_path / "mod.py", "bench.minimal")
    assert {"bench.minimal.amqp", "bench.stats", "bench.stats.percentile"} <= names
