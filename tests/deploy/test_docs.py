"""docs/operations.md ("Deploying") names what the deployment files contain."""

from __future__ import annotations

import pytest
import yaml

from .tools import DEPLOY, REPO

pytestmark = pytest.mark.deploy

OPERATIONS = (REPO / "docs" / "operations.md").read_text()


def test_every_compose_service_is_described() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    missing = [name for name in services if f"`{name}`" not in OPERATIONS]
    assert not missing, f"docs/operations.md does not describe {missing}"


def test_every_kubernetes_directory_is_described() -> None:
    directories = [
        path.parent.relative_to(DEPLOY / "kubernetes").as_posix() + "/"
        for path in (DEPLOY / "kubernetes").rglob("kustomization.yaml")
    ]
    assert len(directories) == 3
    missing = [d for d in directories if f"`{d}`" not in OPERATIONS]
    assert not missing, f"docs/operations.md does not describe {missing}"


def test_the_commands_and_the_image_user_match() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile and "uid/gid **10001**" in OPERATIONS
    for command in ("rundispatch serve", "rundispatch-worker serve", "make image-test"):
        assert command in OPERATIONS
