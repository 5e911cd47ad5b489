"""Paths and external tools of the deployment tests (self-contained: no test harness imports).

A test that needs a tool (promtool, kubectl, hadolint, podman) skips when it is missing on a
developer's machine, and fails under CI (``CI`` or ``RUNDISPATCH_REQUIRE_TOOLS`` set): a skip
must never hide a failure there. ``make tools`` / ``deploy/local/install-tools.sh`` install them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.required import missing

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent


def require_tool(name: str, how: str) -> str:
    """The path of ``name`` (on PATH or next to this Python), or skip / fail saying ``how``."""
    found = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if found:
        return found
    missing(f"{name} is not installed ({how})")


def run(
    *command: str | Path, cwd: Path | None = None, timeout: float = 120, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text, never raise on a non-zero exit."""
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def kustomize_command() -> list[str]:
    """``kustomize build`` or ``kubectl kustomize``, whichever is installed."""
    standalone = shutil.which("kustomize")
    if standalone:
        return [standalone, "build"]
    kubectl = require_tool("kubectl", "kubectl with kustomize, or kustomize: make tools")
    return [kubectl, "kustomize"]
