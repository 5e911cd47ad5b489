"""The error tree. One root, split by what the caller must do.

::

    DispatchError
    ├── PermanentError            do not retry: reject, dead-letter or fail the run
    │   ├── InvalidMessage        a message that is not what the contract says (dead-letter)
    │   ├── RunFailure            the run ends with ``code`` (token, secret, ... failures)
    │   ├── NotFound              an unknown run, machine, connection ... (CLI / client)
    │   └── ConfigurationError    bad settings or fleet file
    └── TransientError            retry later: broker or store unavailable, identity provider busy
"""

from __future__ import annotations

from typing import Any

from dispatcher.codes import ErrorCode


class DispatchError(Exception):
    """Root of every error the dispatcher raises on purpose."""


class PermanentError(DispatchError):
    """Retrying will not help."""


class TransientError(DispatchError):
    """Retrying later may succeed."""


class InvalidMessage(PermanentError):
    """A message that breaks the AMQP contract; ``reason`` goes into the dead-letter header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RunFailure(PermanentError):
    """The run cannot go on and ends with ``code`` (never carries a secret in its text)."""

    def __init__(self, code: ErrorCode, message: str, detail: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail


class RetryableRunError(TransientError):
    """A step of a run failed for now (vault or identity provider busy): retry within deadline."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class NotFound(PermanentError):
    """An id that names nothing."""


class ConfigurationError(PermanentError):
    """Settings or a fleet file that cannot be used."""
