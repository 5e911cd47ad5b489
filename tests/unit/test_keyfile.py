"""The worker's key file on Windows: its DACL, read as SDDL, must let nobody but its owner,
SYSTEM and Administrators in. Judged with SDDL strings as Windows writes them (a fake reader)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispatcher.crypto import WorkerKeyPair
from dispatcher.errors import ConfigurationError
from workers.keyfile import PROTECTED_SDDL, WindowsKeyFile, key_file_guard, sddl_problem

pytestmark = pytest.mark.unit

USER = "S-1-5-21-1004336348-1177238915-682003330-1001"
OWNER_ONLY = f"O:{USER}G:{USER}D:PAI(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;{USER})"
# What a file under C:\ProgramData inherits: Users may read.
INHERITED = f"O:{USER}D:AI(A;ID;FA;;;SY)(A;ID;FA;;;BA)(A;ID;0x1200a9;;;BU)(A;ID;FA;;;{USER})"


@pytest.mark.parametrize(
    ("sddl", "problem"),
    [
        (OWNER_ONLY, None),
        (PROTECTED_SDDL, None),
        (f"O:{USER}D:P(A;;FA;;;OW)(A;;RC;;;WD)", None),  # read-control only: not the content
        (f"O:{USER}D:P(D;;FA;;;WD)(A;;FA;;;{USER})", None),  # a deny entry grants nothing
        (f"O:{USER}D:P(A;OICIIO;FA;;;BU)(A;;FA;;;{USER})", None),  # inherit-only: not this file
        (INHERITED, "BU (0x1200a9)"),
        (f"O:{USER}D:P(A;;FR;;;WD)", "WD (FR)"),
        (f"O:{USER}D:P(A;;FA;;;S-1-5-21-1-2-3-1002)", "S-1-5-21-1-2-3-1002 (FA)"),
        (f"O:{USER}D:NO_ACCESS_CONTROL", "no access control list"),
        (f"O:{USER}", "no access control list"),
    ],
)
def test_sddl_is_judged(sddl: str, problem: str | None) -> None:
    found = sddl_problem(sddl)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_a_readable_key_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    guard = WindowsKeyFile(read=lambda path: INHERITED, write=lambda path, sddl: None)
    key = tmp_path / "worker.key"
    with pytest.raises(ConfigurationError) as refused:
        WorkerKeyPair.load_or_create(key, protect=guard.protect, check=guard.check)
    message = str(refused.value)
    assert "accessible by others" in message and "BU" in message
    assert "icacls" in message and "/inheritance:r" in message


def test_a_new_key_file_gets_the_protected_acl_and_loads(tmp_path: Path) -> None:
    # As on Windows, the ACL belongs to the file, not to a name: keyed by inode here.
    acls: dict[int, str] = {}
    written: list[str] = []

    def write(path: Path, sddl: str) -> None:
        written.append(path.name)
        acls[path.stat().st_ino] = sddl

    guard = WindowsKeyFile(read=lambda path: acls[path.stat().st_ino], write=write)
    key = tmp_path / "worker.key"
    pair = WorkerKeyPair.load_or_create(key, protect=guard.protect, check=guard.check)
    # Protected before it got its name (no moment where others could read it).
    assert len(written) == 1 and written[0].startswith(".worker.key.")
    assert list(acls.values()) == [PROTECTED_SDDL]
    again = WorkerKeyPair.load_or_create(key, protect=guard.protect, check=guard.check)
    assert again.public_key_b64 == pair.public_key_b64


def test_an_unreadable_acl_is_a_configuration_error(tmp_path: Path) -> None:
    def broken(path: Path) -> str:
        raise OSError(5, "access denied")

    guard = WindowsKeyFile(read=broken, write=lambda path, sddl: None)
    with pytest.raises(ConfigurationError, match="cannot read the access list"):
        guard.check(tmp_path / "worker.key")


@pytest.mark.skipif(os.name == "nt", reason="POSIX only")
def test_posix_keeps_the_mode_bit_check() -> None:
    assert key_file_guard() == {}
