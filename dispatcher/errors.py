"""The error tree. One root, split by what the caller must do; every exception the product
raises on purpose is one of these.

::

    DispatchError
    ├── PermanentError              do not retry: reject, dead-letter or fail the run
    │   ├── InvalidMessage          a message that is not what the contract says (dead-letter)
    │   ├── RunFailure              the run ends with ``code`` (token, secret, ... failures)
    │   ├── NotFound                an unknown run, machine, connection ... (CLI / client)
    │   ├── ConfigurationError      bad settings or fleet file
    │   ├── SealedDataError         a sealed secret that does not open (key, context, tampering)
    │   ├── SignInFailed            a sign-in gave no tokens for the connection's account
    │   └── InExclusiveUse          another connection holds a lock (a machine's lease)
    └── TransientError              retry later
        ├── Unavailable             a service cannot be reached: hold the work, try again
        │   ├── StoreUnavailable    Redis
        │   └── BrokerUnavailable   RabbitMQ
        └── RetryableRunError       a step of a run failed for now: retry within its deadline
            └── IdentityProviderBusy    the identity provider could not answer now

Adapters translate their libraries' exceptions into this tree (a Redis connection error is a
``StoreUnavailable``), so the one place that decides what happens to a delivery (the consumer
adapter) decides from the tree alone: ``Unavailable`` is held and retried, ``InvalidMessage`` is
dead-lettered, anything else goes back to the queue.
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
    """A message that breaks the AMQP contract. ``reason`` goes into the dead-letter header,
    ``reason_class`` (a closed vocabulary: ``invalid_json``, ``schema``, ``oversize`` ...)
    into the dead-letter metric."""

    def __init__(self, reason: str, reason_class: str = "schema") -> None:
        super().__init__(reason)
        self.reason = reason
        self.reason_class = reason_class


class RunFailure(PermanentError):
    """The run cannot go on and ends with ``code`` (never carries a secret in its text)."""

    def __init__(self, code: ErrorCode, message: str, detail: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail


class NotFound(PermanentError):
    """An id that names nothing."""


class ConfigurationError(PermanentError):
    """Settings or a fleet file that cannot be used."""


class SealedDataError(PermanentError):
    """A sealed blob that does not open: wrong key, wrong context, or tampered with."""


class SignInFailed(PermanentError):
    """The sign-in did not produce tokens for the connection's account (nothing was stored)."""


class InExclusiveUse(PermanentError):
    """RabbitMQ refused a lock (an exclusive queue) that another connection holds: for a
    machine's lease, another worker serves that machine."""


class Unavailable(TransientError):
    """A service the work needs cannot be reached now (connection refused, reset, timed out)."""


class StoreUnavailable(Unavailable):
    """Redis cannot be reached."""


class BrokerUnavailable(Unavailable):
    """RabbitMQ cannot be reached."""


class RetryableRunError(TransientError):
    """A step of a run failed for now (vault or identity provider busy): retry within deadline."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class IdentityProviderBusy(RetryableRunError):
    """The identity provider could not answer now; ``retry_after_s`` is its hint, if any."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(ErrorCode.IdentityProviderUnavailable, message, retry_after_s)
