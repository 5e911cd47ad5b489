"""Who may read the worker's key file: its owner only.

On POSIX the key pair's own check applies (mode bits, ``chmod 600``). On Windows mode bits say
nothing: the file's access control list (DACL) does. There the key file is created with a
protected DACL (no inherited entries: the owner, SYSTEM and Administrators), and an existing
one is refused when its DACL lets anyone else in, as ssh does with its keys.

The DACL is read as SDDL text (``ConvertSecurityDescriptorToStringSecurityDescriptorW``) and
judged by :func:`sddl_problem`, a pure function; the reader is injected, so the logic is tested
on any system with SDDL strings as Windows writes them.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dispatcher.errors import ConfigurationError

# Who may hold rights on the key file besides its owner: LocalSystem, Administrators, the
# owner-rights principal (SDDL aliases and their SIDs).
TRUSTED = {"SY", "S-1-5-18", "BA", "S-1-5-32-544", "OW", "S-1-3-4", "CO"}
ALLOW_TYPES = {"A", "OA", "XA", "ZA"}
# Rights that do not open the file's content or its ACL: read-control, synchronize.
HARMLESS_RIGHTS = {"RC", "SY", "0x100000", "0x20000", "0x120000"}
ACE = re.compile(r"\(([^;()]*);([^;()]*);([^;()]*);([^;()]*);([^;()]*);([^;()]*)[^()]*\)")
# Owner, SYSTEM and Administrators; nothing inherited from the folder.
PROTECTED_SDDL = "D:P(A;;FA;;;OW)(A;;FA;;;SY)(A;;FA;;;BA)"
FIX = (
    'icacls "{path}" /inheritance:r /grant:r "%USERNAME%:F" /grant:r SYSTEM:F '
    "/grant:r Administrators:F"
)

SddlReader = Callable[[Path], str]
SddlWriter = Callable[[Path, str], None]


def sddl_problem(sddl: str) -> str | None:
    """Why a file with this owner and DACL is readable by others, or None when it is not."""
    owner = re.search(r"O:([A-Z]{2}|S-[0-9-]+)", sddl)
    trusted = TRUSTED | ({owner.group(1)} if owner else set())
    dacl = re.search(r"D:([A-Z_]*)((?:\([^()]*\))*)", sddl)
    if dacl is None or "NO_ACCESS_CONTROL" in dacl.group(1):
        return "it has no access control list (everyone may read it)"
    others = []
    for kind, flags, rights, _object, _inherited, sid in ACE.findall(dacl.group(2)):
        if kind not in ALLOW_TYPES or "IO" in flags:  # deny entries, inherit-only entries
            continue
        if sid in trusted or rights in HARMLESS_RIGHTS:
            continue
        others.append(f"{sid} ({rights})")
    if others:
        return "its access control list lets others in: " + ", ".join(others)
    return None


class WindowsKeyFile:
    """``protect`` and ``check`` for :meth:`WorkerKeyPair.load_or_create` on Windows."""

    def __init__(self, read: SddlReader | None = None, write: SddlWriter | None = None) -> None:
        self.read = read or read_sddl
        self.write = write or write_sddl

    def protect(self, path: Path) -> None:
        self.write(path, PROTECTED_SDDL)

    def check(self, path: Path) -> None:
        try:
            sddl = self.read(path)
        except OSError as exc:
            raise ConfigurationError(f"cannot read the access list of {path}: {exc}") from None
        problem = sddl_problem(sddl)
        if problem is not None:
            raise ConfigurationError(
                f"worker key file {path} is accessible by others: {problem}; "
                f"fix it with: {FIX.format(path=path)}"
            )


def key_file_guard() -> dict[str, Callable[[Path], None]]:
    """The key file's protection for this system (empty: the POSIX mode-bit check)."""
    if os.name != "nt":
        return {}
    guard = WindowsKeyFile()
    return {"protect": guard.protect, "check": guard.check}


# ---- Windows API (advapi32), only called on Windows ------------------------------------------
_OWNER, _DACL, _PROTECTED_DACL = 0x1, 0x4, 0x80000000
_SE_FILE_OBJECT, _SDDL_REVISION = 1, 1


def _last_error() -> int:
    return int(getattr(ctypes, "get_last_error")())  # noqa: B009 - Windows only


def _advapi32() -> Any:
    return getattr(ctypes, "WinDLL")("advapi32", use_last_error=True)  # noqa: B009 - Windows only


def read_sddl(path: Path) -> str:
    """The owner and DACL of ``path`` as SDDL text."""
    advapi32 = _advapi32()
    descriptor = ctypes.c_void_p()
    status = advapi32.GetNamedSecurityInfoW(
        str(path), _SE_FILE_OBJECT, _OWNER | _DACL, None, None, None, None,
        ctypes.byref(descriptor),
    )  # fmt: skip
    if status != 0:
        raise OSError(status, "GetNamedSecurityInfoW failed")
    text = ctypes.c_wchar_p()
    try:
        if not advapi32.ConvertSecurityDescriptorToStringSecurityDescriptorW(
            descriptor, _SDDL_REVISION, _OWNER | _DACL, ctypes.byref(text), None
        ):
            raise OSError(_last_error(), "cannot convert the security descriptor")
        return str(text.value or "")
    finally:
        getattr(ctypes, "windll").kernel32.LocalFree(descriptor)  # noqa: B009 - Windows only


def write_sddl(path: Path, sddl: str) -> None:
    """Replace the DACL of ``path`` with ``sddl`` (protected: nothing inherited)."""
    advapi32 = _advapi32()
    descriptor = ctypes.c_void_p()
    if not advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW(
        sddl, _SDDL_REVISION, ctypes.byref(descriptor), None
    ):
        raise OSError(_last_error(), "invalid security descriptor")
    try:
        if not advapi32.SetFileSecurityW(str(path), _DACL | _PROTECTED_DACL, descriptor):
            raise OSError(_last_error(), "SetFileSecurityW failed")
    finally:
        getattr(ctypes, "windll").kernel32.LocalFree(descriptor)  # noqa: B009 - Windows only
