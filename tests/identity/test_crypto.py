"""SecretBox (at rest, key rotation) and the sealed hand-off to one machine and one run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispatcher.crypto import Sealer, SecretBox, WorkerKeyPair, handoff_binding, seal_to
from dispatcher.errors import ConfigurationError, SealedDataError
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


def test_sealer_reuses_one_ephemeral_key_per_worker_for_a_while() -> None:
    now = [1000.0]
    sealer = Sealer(reuse_s=300.0, clock=lambda: now[0])
    m1, m2 = WorkerKeyPair.generate(), WorkerKeyPair.generate()

    first = sealer(m1.public_key_b64, b"pw-1", "run-1")
    second = sealer(m1.public_key_b64, b"pw-2", "run-2")
    other = sealer(m2.public_key_b64, b"pw-3", "run-3")

    assert first.split(".")[1] == second.split(".")[1]  # one agreement for both runs
    assert first.split(".")[2] != second.split(".")[2]
    assert other.split(".")[1] != first.split(".")[1]  # each worker its own
    assert (m1.open(first, "run-1"), m1.open(second, "run-2")) == (b"pw-1", b"pw-2")
    assert m2.open(other, "run-3") == b"pw-3"
    # The bindings are those of seal_to: another run, another machine, a changed byte.
    for blob, keys, run in ((first, m1, "run-2"), (first, m2, "run-1"), (other, m1, "run-3")):
        with pytest.raises(SealedDataError):
            keys.open(blob, run)
    body = second.split(".")[2]
    tampered = second[: -len(body)] + ("A" if body[0] != "A" else "B") + body[1:]
    with pytest.raises(SealedDataError):
        m1.open(tampered, "run-2")

    now[0] += 301.0  # the window is over: a new ephemeral key, still opened by the worker
    later = sealer(m1.public_key_b64, b"pw-4", "run-4")
    assert later.split(".")[1] != first.split(".")[1]
    assert m1.open(later, "run-4") == b"pw-4"


def test_sealer_refuses_a_key_that_is_not_x25519_and_bounds_its_cache() -> None:
    sealer = Sealer(max_recipients=2)
    with pytest.raises(SealedDataError):
        sealer("not-a-key", b"x", "run-1")
    pairs = [WorkerKeyPair.generate() for _ in range(5)]
    for index, pair in enumerate(pairs):
        assert pair.open(sealer(pair.public_key_b64, b"s", f"r{index}"), f"r{index}") == b"s"
        assert len(sealer._keys) <= 2


def test_worker_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "state" / "worker.key"
    first = WorkerKeyPair.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = WorkerKeyPair.load_or_create(path)
    assert again.public_key_b64 == first.public_key_b64
    sealed = seal_to(first.public_key_b64, b"token", "run-9")
    assert again.open(sealed, "run-9") == b"token"
    assert path.parent.stat().st_mode & 0o777 == 0o700
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        WorkerKeyPair.load_or_create(path)
    os.chmod(path, 0o600)
    if os.getuid() == 0:  # a key file of another user is refused too
        os.chown(path, 65534, 65534)
        with pytest.raises(ConfigurationError, match="another user"):
            WorkerKeyPair.load_or_create(path)


def test_a_hand_off_binding_covers_run_machine_fence_flow_and_inputs() -> None:
    machine = WorkerKeyPair.generate()
    inputs = {"amount": 10, "lines": [1, 2], "to": "ACME"}
    binding = handoff_binding("r1", "m1", 7, "invoice", inputs)
    # The same inputs in another key order bind the same (they travel as JSON).
    assert handoff_binding("r1", "m1", 7, "invoice", dict(reversed(inputs.items()))) == binding
    blob = seal_to(machine.public_key_b64, b"secret", binding)
    assert machine.open(blob, binding) == b"secret"
    for other in (
        handoff_binding("r2", "m1", 7, "invoice", inputs),
        handoff_binding("r1", "m2", 7, "invoice", inputs),
        handoff_binding("r1", "m1", 8, "invoice", inputs),
        handoff_binding("r1", "m1", 7, "payroll", inputs),
        handoff_binding("r1", "m1", 7, "invoice", {**inputs, "amount": 11}),
        handoff_binding("r1", "m1", 7, "invoice", {}),
        "r1",
    ):
        with pytest.raises(SealedDataError):
            machine.open(blob, other)
