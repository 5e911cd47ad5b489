"""The shape of the code base, checked.

- only adapters touch RabbitMQ, Redis, HTTP and msal;
- the core imports no I/O library, and nothing but the kernel and itself;
- no use case imports an adapter; only the composition root (``dispatcher/bootstrap.py``),
  the tools (``dispatcher/tools/``) and the adapters themselves import ``dispatcher.adapters``;
- ``dispatcher`` never imports ``workers`` (nor the development tools in ``devtools``);
- no module of ``dispatcher`` or ``workers`` is longer than 400 lines.

Each check is shown to see a violation in a sample, so that it cannot pass by checking nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DISPATCHER = REPO / "dispatcher"
WORKERS = REPO / "workers"
PACKAGES = (DISPATCHER, WORKERS)
IO_LIBRARIES = {"aio_pika", "aiormq", "redis", "httpx", "msal"}
ADAPTER_DIRS = (DISPATCHER / "adapters", WORKERS / "adapters")
# The composition root and the tools wire adapters together; the adapters use each other.
MAY_IMPORT_ADAPTERS = (DISPATCHER / "bootstrap.py", DISPATCHER / "tools", DISPATCHER / "adapters")
KERNEL = {"codes", "errors", "models", "names", "settings", "logs", "retry", "crypto"}
MAX_LINES = 400

pytestmark = pytest.mark.unit


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path = REPO) -> set[str]:
    """Every module ``path`` imports, by its full dotted name (relative imports resolved, and
    ``from package import module`` counted as ``package.module``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def roots(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def within(path: Path, places: tuple[Path, ...]) -> bool:
    return any(path == place or path.is_relative_to(place) for place in places)


def product_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in package.rglob("*.py"))


def imports_adapters(names: set[str]) -> bool:
    return any(n == "dispatcher.adapters" or n.startswith("dispatcher.adapters.") for n in names)


# ---- I/O libraries --------------------------------------------------------------------------
def test_only_adapters_import_io_libraries() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(roots(imported_names(path)) & IO_LIBRARIES)
        for path in product_modules()
        if not within(path, ADAPTER_DIRS) and roots(imported_names(path)) & IO_LIBRARIES
    }
    assert offenders == {}


def test_the_core_is_pure() -> None:
    io_modules = IO_LIBRARIES | {"asyncio", "socket", "subprocess", "prometheus_client"}
    allowed = {f"dispatcher.{name}" for name in KERNEL} | {"dispatcher.core", "dispatcher"}
    offenders = {}
    for path in (DISPATCHER / "core").rglob("*.py"):
        names = imported_names(path)
        ours = {n for n in names if n.split(".")[0] == "dispatcher"}
        outside = {n for n in ours if not any(n == a or n.startswith(a + ".") for a in allowed)}
        bad = (roots(names) & io_modules) | outside
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}


# ---- layers ---------------------------------------------------------------------------------
def use_cases_importing_adapters(root: Path) -> list[str]:
    """The modules of ``root``'s ``dispatcher/usecases`` that import ``dispatcher.adapters``."""
    return sorted(
        str(path.relative_to(root))
        for path in (root / "dispatcher" / "usecases").rglob("*.py")
        if imports_adapters(imported_names(path, root))
    )


def test_no_use_case_imports_an_adapter() -> None:
    assert use_cases_importing_adapters(REPO) == []


def test_only_the_composition_root_and_the_tools_import_adapters() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in product_modules()
        if not within(path, MAY_IMPORT_ADAPTERS) and imports_adapters(imported_names(path))
    ]
    assert offenders == []


def test_dispatcher_never_imports_workers_or_devtools() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in DISPATCHER.rglob("*.py")
        if roots(imported_names(path)) & {"workers", "devtools"}
    ]
    assert offenders == []


def test_no_module_is_longer_than_the_limit() -> None:
    lengths = {
        str(path.relative_to(REPO)): len(path.read_text(encoding="utf-8").splitlines())
        for path in product_modules()
    }
    assert {path: n for path, n in lengths.items() if n > MAX_LINES} == {}
    assert len(lengths) > 50  # the walk saw the code base


# ---- the checks see violations ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import redis.asyncio as r\nfrom httpx import Client\n", {"redis", "httpx"}),
        ("from aio_pika.abc import AbstractChannel\n", {"aio_pika"}),
    ],
)
def test_the_io_check_sees_a_violation(tmp_path: Path, source: str, found: set[str]) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text(source)
    assert roots(imported_names(sample, tmp_path)) & IO_LIBRARIES == found


@pytest.mark.parametrize(
    "source",
    [
        "from dispatcher.adapters.redis.transitions import RedisTransitions\n",
        "import dispatcher.adapters.amqp.broker\n",
        "from dispatcher.adapters import outbox\n",
        "def later() -> None:\n    from dispatcher.adapters.outbox import OutboxPublisher\n",
        "from ..adapters.redis import codec\n",
    ],
)
def test_the_layer_check_sees_a_use_case_importing_an_adapter(tmp_path: Path, source: str) -> None:
    usecases = tmp_path / "dispatcher" / "usecases"
    usecases.mkdir(parents=True)
    (usecases / "fine.py").write_text("from dispatcher.usecases.ports import Broker\n")
    (usecases / "bad.py").write_text(source)
    assert use_cases_importing_adapters(tmp_path) == ["dispatcher/usecases/bad.py"]


def test_the_length_check_counts_lines(tmp_path: Path) -> None:
    sample = tmp_path / "long.py"
    sample.write_text("x = 1\n" * (MAX_LINES + 1))
    assert len(sample.read_text().splitlines()) > MAX_LINES
