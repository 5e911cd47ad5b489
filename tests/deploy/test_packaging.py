"""The package as an operator installs it: metadata, constraints, the built wheel, and its
console scripts run from a fresh virtual environment (the image's entrypoint commands)."""

from __future__ import annotations

import os
import re
import sys
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .tools import REPO, run

pytestmark = pytest.mark.deploy

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSTRAINTS = REPO / "constraints.txt"
SCRIPTS = {"rundispatch": "dispatcher.tools.cli:main", "rundispatch-worker": "workers.cli:main"}
# What the runtime never needs: development tools and the local stand-ins for Entra and vaults.
NOT_SHIPPED = ("devtools", "dispatcher.devtools", "tests", "pytest", "ruff", "mypy", "hypothesis")


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not pinned with =="
        found[canonicalize_name(name)] = version
    return found


def test_console_scripts_and_license_metadata() -> None:
    project = PYPROJECT["project"]
    assert project["scripts"] == SCRIPTS
    # An SPDX expression and the licence file: the form setuptools >= 77 accepts without a
    # deprecation warning (a TOML table or a licence classifier is deprecated).
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert "MIT License" in (REPO / "LICENSE").read_text()
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]


def test_constraints_pin_every_dependency_within_pyproject() -> None:
    """constraints.txt is complete and current: every dependency of pyproject.toml (runtime and
    dev, with extras) is pinned to a version its specifier allows. Run `make constraints`
    after changing a dependency."""
    pinned = pins()
    requirements = [*PYPROJECT["project"]["dependencies"]]
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        requirements.extend(extra)
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in pinned:
            problems.append(f"{requirement.name}: not pinned")
        elif not requirement.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{requirement.name}: pinned {pinned[name]}, needs {text}")
    assert not problems, "constraints.txt is stale (make constraints):\n" + "\n".join(problems)


def test_makefile_installs_with_the_constraints() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints.txt -e '.[dev]'" in makefile
    assert re.search(r"^\$\(STAMP\): pyproject\.toml constraints\.txt$", makefile, re.M)


# ---- the built distribution -----------------------------------------------------------------
@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """Wheel and sdist built with `python -m build` (isolated, as a release would), and what
    the build printed."""
    out = tmp_path_factory.mktemp("dist")
    result = run(sys.executable, "-m", "build", "--outdir", out, REPO, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    yield out, result.stdout + result.stderr


def the_wheel(out: Path) -> Path:
    (wheel,) = out.glob("rundispatch-*.whl")
    return wheel


def test_build_prints_no_deprecation_warning(dist: tuple[Path, str]) -> None:
    _, output = dist
    noisy = [
        line
        for line in output.splitlines()
        if re.search(r"deprecat|Package would be ignored|is absent from the", line, re.I)
    ]
    assert not noisy, "\n".join(noisy)


def test_wheel_has_the_scripts_the_licence_and_no_development_tools(
    dist: tuple[Path, str],
) -> None:
    wheel = the_wheel(dist[0])
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
        metadata = archive.read(next(n for n in names if n.endswith("dist-info/METADATA")))
    assert not [n for n in names if "devtools" in n or n.startswith("tests/")]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "dispatcher",
        "workers",
    }
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "dispatcher/adapters/lua/start.lua" in names  # package data travels
    text = entry_points.decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in text
    assert "License-Expression: MIT" in metadata.decode()


def test_sdist_has_no_development_tools(dist: tuple[Path, str]) -> None:
    import tarfile

    (sdist,) = dist[0].glob("rundispatch-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert not [n for n in names if "devtools" in n]
    assert any(n.endswith("/LICENSE") for n in names)


@pytest.fixture(scope="module")
def installed(dist: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed at the pinned versions, as the
    image's runtime stage does; returns its bin directory."""
    env_dir = tmp_path_factory.mktemp("venv") / "rundispatch"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    result = run(
        bin_dir / "python", "-m", "pip", "install", "--quiet", "--constraint", CONSTRAINTS,
        the_wheel(dist[0]), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return bin_dir


def clean_env(bin_dir: Path) -> dict[str, str]:
    """No RUNDISPATCH_* and no PYTHONPATH: the installed package alone, as in the image."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNDISPATCH_", "PYTHON"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["rundispatch", "--help"], "serve"),
        (["rundispatch", "--version"], "0.1.0"),
        (["rundispatch", "serve", "--help"], "--metrics-port"),
        (["rundispatch-worker", "--help"], "serve"),
        (["rundispatch-worker", "serve", "--help"], "--machine-id"),
    ],
)
def test_console_scripts_run_from_a_fresh_install(
    installed: Path, tmp_path: Path, command: list[str], expected: str
) -> None:
    # From an empty directory, so the repository's sources cannot shadow the installed ones.
    result = run(installed / command[0], *command[1:], cwd=tmp_path, env=clean_env(installed))
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_fresh_install_is_consistent_and_has_no_development_tools(
    installed: Path, tmp_path: Path
) -> None:
    env = clean_env(installed)
    check = run(installed / "python", "-m", "pip", "check", cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    probe = (
        "import importlib.util, sys\n"
        "def found(name):\n"
        "    try:\n"
        "        return importlib.util.find_spec(name) is not None\n"
        "    except ModuleNotFoundError:\n"
        "        return False\n"
        f"print([m for m in {NOT_SHIPPED!r} if found(m)])\n"
        "import dispatcher, workers\n"
        "print(dispatcher.__file__)\n"
    )
    result = run(installed / "python", "-c", probe, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    present, location = result.stdout.splitlines()
    assert present == "[]"
    assert location.startswith(str(installed.parent))
    # Every pin the install took matches constraints.txt.
    frozen = run(installed / "python", "-m", "pip", "freeze", cwd=tmp_path, env=env)
    pinned = pins()
    for line in frozen.stdout.splitlines():
        name, _, version = line.partition("==")
        if version and canonicalize_name(name) in pinned:
            assert pinned[canonicalize_name(name)] == version, line
