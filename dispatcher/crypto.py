"""Secrets at rest and in transit, with ``cryptography`` only (no I/O but key files).

- :class:`SecretBox` encrypts what the dispatcher stores (stored passwords, token caches) with
  AES-256-GCM. Keys come from ``settings.secret_keys`` (``"kid:base64key,kid2:base64key"``): the
  first one encrypts, every one decrypts, so keys can be rotated. The text form carries the key
  id, and the associated data binds a blob to a context (the connection id): a blob copied to
  another connection does not open.
- :func:`seal_to` / :class:`Sealer` / :class:`WorkerKeyPair` seal a secret to one machine's
  worker (ephemeral X25519 + HKDF-SHA256 + AES-GCM) and bind it to associated data, so that
  neither the broker, nor another machine, nor another run can use it.
- :func:`handoff_binding` is that associated data for an assignment: run id, machine id,
  fencing token, flow id and a digest of the inputs. A worker computes it from the assignment
  it received, so an assignment whose flow or inputs were swapped does not open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dispatcher.errors import ConfigurationError, SealedDataError

if TYPE_CHECKING:
    from dispatcher.settings import Settings

_BOX_PREFIX = "sb1"
_SEAL_PREFIX = "sx1"
_NONCE_BYTES = 12
_KEY_BYTES = 32
_KID = re.compile(r"^[A-Za-z0-9_\-]{1,32}$")
_HKDF_INFO = b"rundispatch sealed hand-off v1"
_AGREED_KEYS = 64
_BINDING_VERSION = "rundispatch hand-off binding v2"


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SecretBox:
    """AES-256-GCM with key ids: ``sb1.<kid>.<base64url(nonce || ciphertext)>``."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigurationError("a SecretBox needs at least one key")
        self._ciphers: dict[str, AESGCM] = {}
        for kid, key in keys:
            if not _KID.match(kid):
                raise ConfigurationError(f"secret key id {kid!r} must match {_KID.pattern}")
            if len(key) != _KEY_BYTES:
                raise ConfigurationError(f"secret key {kid!r} must be {_KEY_BYTES} bytes")
            if kid in self._ciphers:
                raise ConfigurationError(f"secret key id {kid!r} appears twice")
            self._ciphers[kid] = AESGCM(key)
        self.primary_kid = keys[0][0]

    @classmethod
    def parse(cls, spec: str) -> SecretBox:
        """Build a box from ``"kid:base64key,kid2:base64key"`` (the first key encrypts)."""
        keys: list[tuple[str, bytes]] = []
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            kid, sep, encoded = item.partition(":")
            if not sep:
                raise ConfigurationError("each secret key is written 'kid:base64key'")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigurationError(f"secret key {kid!r} is not valid base64") from None
            keys.append((kid.strip(), key))
        return cls(keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        """The box for ``settings.secret_keys``; refuses to start without a key."""
        spec = settings.secret_keys.get_secret_value()
        if not spec.strip():
            raise ConfigurationError(
                "RUNDISPATCH_SECRET_KEYS is empty: set it to 'kid:base64key' with a 32-byte key "
                "(for example 'k1:' + SecretBox.generate_key()); secrets are never stored in clear"
            )
        return cls.parse(spec)

    @staticmethod
    def generate_key() -> str:
        """A new random 32-byte key, base64 encoded, for ``secret_keys`` (demos and tests)."""
        return base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode("ascii")

    def seal(self, plaintext: bytes, context: str) -> str:
        """Encrypt ``plaintext`` with the primary key, bound to ``context``."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        aad = self._aad(self.primary_kid, context)
        ciphertext = self._ciphers[self.primary_kid].encrypt(nonce, plaintext, aad)
        return f"{_BOX_PREFIX}.{self.primary_kid}.{_b64e(nonce + ciphertext)}"

    def open(self, sealed: str, context: str) -> bytes:
        """Decrypt a blob made by :meth:`seal` with the same ``context`` and any known key."""
        _, kid, body = _split(sealed, _BOX_PREFIX)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SealedDataError(f"sealed with key id {kid!r}, which is not configured")
        try:
            raw = _b64d(body)
            return cipher.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._aad(kid, context))
        except (InvalidTag, ValueError, binascii.Error):
            raise SealedDataError("sealed data does not open with this key and context") from None

    def seal_text(self, plaintext: str, context: str) -> str:
        """:meth:`seal` for text (UTF-8)."""
        return self.seal(plaintext.encode("utf-8"), context)

    def open_text(self, sealed: str, context: str) -> str:
        """:meth:`open` for text (UTF-8)."""
        return self.open(sealed, context).decode("utf-8")

    def needs_rotation(self, sealed: str) -> bool:
        """Whether ``sealed`` was made with another key than the primary one."""
        return _split(sealed, _BOX_PREFIX)[1] != self.primary_kid

    @staticmethod
    def _aad(kid: str, context: str) -> bytes:
        return f"{_BOX_PREFIX}|{kid}|{context}".encode()


def _split(sealed: str, expected_prefix: str) -> tuple[str, str, str]:
    parts = sealed.split(".")
    if len(parts) != 3 or parts[0] != expected_prefix:
        raise SealedDataError(f"not a {expected_prefix} sealed value")
    return parts[0], parts[1], parts[2]


def _derive_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=ephemeral + recipient, info=_HKDF_INFO
    )
    return hkdf.derive(shared)


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def inputs_digest(inputs: Mapping[str, Any]) -> str:
    """SHA-256 of the inputs' canonical JSON (sorted keys, no spaces): the same dict gives the
    same digest on both sides whatever order its keys travelled in."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def handoff_binding(
    run_id: str, machine_id: str, fence: int, flow_id: str, inputs: Mapping[str, Any]
) -> str:
    """The associated data of a run's sealed secret: the run, the machine, the fencing token
    of this hand-off, the flow and the digest of the inputs (a JSON array: unambiguous)."""
    return json.dumps(
        [_BINDING_VERSION, run_id, machine_id, fence, flow_id, inputs_digest(inputs)],
        separators=(",", ":"),
    )


def rabbit_password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` of ``password`` (a random 4-byte salt), for
    a definitions file: nobody reading the file learns the password."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def seal_to(public_key_b64: str, plaintext: bytes, aad: str) -> str:
    """Encrypt ``plaintext`` so only the holder of the private key can open it, for ``aad``.

    Each call uses a fresh ephemeral X25519 key; ``aad`` (:func:`handoff_binding`) is
    authenticated, so a sealed blob replayed into another run or another assignment does not
    open. :class:`Sealer` does the same with one ephemeral key per recipient for a few minutes.
    """
    ephemeral_b64, aead = _ephemeral_to(public_key_b64)
    return _seal_with(ephemeral_b64, aead, plaintext, aad)


def _ephemeral_to(public_key_b64: str) -> tuple[str, AESGCM]:
    """A fresh ephemeral key and the AES-GCM key it agrees with ``public_key_b64``."""
    try:
        recipient_raw = _b64d(public_key_b64)
        recipient = X25519PublicKey.from_public_bytes(recipient_raw)
    except (ValueError, binascii.Error):
        raise SealedDataError("not a valid X25519 public key") from None
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = _raw_public(ephemeral.public_key())
    key = _derive_key(ephemeral.exchange(recipient), ephemeral_raw, recipient_raw)
    return _b64e(ephemeral_raw), AESGCM(key)


def _seal_with(ephemeral_b64: str, aead: AESGCM, plaintext: bytes, aad: str) -> str:
    nonce = secrets.token_bytes(_NONCE_BYTES)
    ciphertext = aead.encrypt(nonce, plaintext, aad.encode("utf-8"))
    return f"{_SEAL_PREFIX}.{ephemeral_b64}.{_b64e(nonce + ciphertext)}"


class Sealer:
    """:func:`seal_to` for a dispatcher: one ephemeral key per recipient for ``reuse_s``.

    The X25519 agreement is the costly part of sealing (~90 µs here, against ~5 µs for the
    AES-GCM that follows), and a dispatcher seals a secret to the same few workers for every
    run. So the agreed key is kept per recipient and replaced after ``reuse_s``: blobs keep the
    same format and bindings (the binding is authenticated, every nonce is random, and a worker
    opens them as before), and an AES key encrypts at most the hand-offs of one process to one
    worker for a few minutes. What that gives up is per-run forward secrecy inside the window:
    whoever reads this process's memory could open the hand-offs of the last minutes, which
    are passwords and tokens this process holds in memory anyway.
    """

    def __init__(
        self,
        reuse_s: float = 300.0,
        max_recipients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reuse_s = reuse_s
        self.max_recipients = max_recipients
        self.clock = clock
        self._keys: dict[str, tuple[float, str, AESGCM]] = {}

    def __call__(self, public_key_b64: str, plaintext: bytes, aad: str) -> str:
        now = self.clock()
        cached = self._keys.get(public_key_b64)
        if cached is None or cached[0] <= now:
            if len(self._keys) >= self.max_recipients:
                self._keys = {k: v for k, v in self._keys.items() if v[0] > now}
                if len(self._keys) >= self.max_recipients:
                    self._keys.clear()
            cached = (now + self.reuse_s, *_ephemeral_to(public_key_b64))
            self._keys[public_key_b64] = cached
        return _seal_with(cached[1], cached[2], plaintext, aad)


class WorkerKeyPair:
    """A machine worker's X25519 key pair: the public half is registered with its machine."""

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._private = private_key
        self._public_raw = _raw_public(private_key.public_key())
        # Keys agreed with recent ephemeral keys (a dispatcher reuses one for a few minutes).
        self._agreed: dict[str, AESGCM] = {}

    @classmethod
    def generate(cls) -> WorkerKeyPair:
        """A new random key pair (kept in memory only)."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load_or_create(
        cls,
        path: str | Path,
        *,
        protect: Callable[[Path], None] | None = None,
        check: Callable[[Path], None] | None = None,
    ) -> WorkerKeyPair:
        """Load the key pair at ``path``, or create it there readable by its owner only (0600).

        Creation is atomic (hard link of a finished temporary file), so two workers starting at
        once agree on one key. A key file others can access, or that belongs to another user, is
        refused, as ssh does: a flow run as another user cannot read it. ``protect`` and
        ``check`` replace the POSIX mode bits where they mean nothing (Windows ACLs,
        ``workers.keyfile``): ``protect`` restricts the new file, ``check`` raises
        ``ConfigurationError`` for a file others can read.
        """
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            pair = cls.generate()
            temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(pair._private_pem())
                if protect is not None:
                    protect(temporary)
                os.link(temporary, path)
            except FileExistsError:
                pass  # another worker created it first: load theirs below
            finally:
                temporary.unlink(missing_ok=True)
        if check is not None:
            check(path)
        else:
            status = path.stat()
            if status.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigurationError(
                    f"worker key file {path} is accessible by others: chmod 600"
                )
            if hasattr(os, "getuid") and status.st_uid != os.getuid():
                raise ConfigurationError(f"worker key file {path} belongs to another user")
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"worker key file {path} cannot be read: {exc}") from None
        if not isinstance(private, X25519PrivateKey):
            raise ConfigurationError(f"worker key file {path} does not hold an X25519 key")
        return cls(private)

    @property
    def public_key_b64(self) -> str:
        """The public key to register with the machine (base64url, 32 raw bytes)."""
        return _b64e(self._public_raw)

    def open(self, sealed: str, aad: str) -> bytes:
        """Decrypt a blob made by :func:`seal_to` for this key pair and the same ``aad``."""
        _, ephemeral_b64, body = _split(sealed, _SEAL_PREFIX)
        try:
            aead = self._agreed.get(ephemeral_b64)
            if aead is None:
                ephemeral_raw = _b64d(ephemeral_b64)
                ephemeral = X25519PublicKey.from_public_bytes(ephemeral_raw)
                shared = self._private.exchange(ephemeral)
                aead = AESGCM(_derive_key(shared, ephemeral_raw, self._public_raw))
                if len(self._agreed) >= _AGREED_KEYS:
                    self._agreed.pop(next(iter(self._agreed)))
                self._agreed[ephemeral_b64] = aead
            raw = _b64d(body)
            return aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], aad.encode("utf-8"))
        except (InvalidTag, ValueError, binascii.Error):
            raise SealedDataError("sealed data is not for this machine or this run") from None

    def _private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
