"""SecretBox (at rest, key rotation) and the sealed hand-off to one machine and one run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispatcher.crypto import SealedDataError, SecretBox, WorkerKeyPair, seal_to
from dispatcher.errors import ConfigurationError
from dispatcher.settings import Settings

pytestmark = pytest.mark.unit


def test_secret_box_round_trip_binds_the_context() -> None:
    box = SecretBox.parse(f"k1:{SecretBox.generate_key()}")
    sealed = box.seal(b"P@ssw0rd!", "c1")
    assert "P@ssw0rd" not in sealed and sealed.startswith("sb1.k1.")
    assert box.open(sealed, "c1") == b"P@ssw0rd!"
    with pytest.raises(SealedDataError):
        box.open(sealed, "c2")  # moved to another connection
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    with pytest.raises(SealedDataError):
        box.open(tampered, "c1")


def test_secret_box_rotation() -> None:
    old_key, new_key = SecretBox.generate_key(), SecretBox.generate_key()
    old = SecretBox.parse(f"k1:{old_key}")
    sealed_with_old = old.seal_text("secret-1", "c1")
    rotated = SecretBox.parse(f"k2:{new_key},k1:{old_key}")
    assert rotated.open_text(sealed_with_old, "c1") == "secret-1"
    assert rotated.needs_rotation(sealed_with_old)
    resealed = rotated.seal_text("secret-1", "c1")
    assert resealed.startswith("sb1.k2.") and not rotated.needs_rotation(resealed)
    with pytest.raises(SealedDataError):
        old.open(resealed, "c1")  # the old box does not know k2
    with pytest.raises(SealedDataError):
        SecretBox.parse(f"k2:{new_key}").open(sealed_with_old, "c1")  # k1 retired


def test_secret_box_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="SECRET_KEYS is empty"):
        SecretBox.from_settings(Settings(secret_keys=""))
    with pytest.raises(ConfigurationError, match="32 bytes"):
        SecretBox.parse("k1:c2hvcnQ=")
    with pytest.raises(ConfigurationError, match="base64"):
        SecretBox.parse("k1:not base64!")
    with pytest.raises(ConfigurationError, match="twice"):
        key = SecretBox.generate_key()
        SecretBox.parse(f"k1:{key},k1:{key}")


def test_sealed_hand_off_opens_only_on_its_machine_and_run() -> None:
    machine, other = WorkerKeyPair.generate(), WorkerKeyPair.generate()
    sealed = seal_to(machine.public_key_b64, b'{"password":"hunter2"}', "run-1")
    assert "hunter2" not in sealed
    assert machine.open(sealed, "run-1") == b'{"password":"hunter2"}'
    with pytest.raises(SealedDataError):
        other.open(sealed, "run-1")
    with pytest.raises(SealedDataError):
        machine.open(sealed, "run-2")  # replayed into another run
    assert seal_to(machine.public_key_b64, b"x", "r") != seal_to(machine.public_key_b64, b"x", "r")
    with pytest.raises(SealedDataError):
        seal_to("not-a-key", b"x", "r")


def test_worker_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "state" / "worker.key"
    first = WorkerKeyPair.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = WorkerKeyPair.load_or_create(path)
    assert again.public_key_b64 == first.public_key_b64
    sealed = seal_to(first.public_key_b64, b"token", "run-9")
    assert again.open(sealed, "run-9") == b"token"
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        WorkerKeyPair.load_or_create(path)
