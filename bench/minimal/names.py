"""Names and service addresses of the minimal baseline and the raw loop.

Every Redis key is ``<ns>:*`` and every queue ``<ns>.*``; :func:`bench.minimal.runner.cleanup`
deletes them. The service addresses come from the same ``RUNDISPATCH_*`` variables as the
product's settings, read here directly so that nothing of the product is imported.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def amqp_url() -> str:
    return os.environ.get("RUNDISPATCH_AMQP_URL") or DEFAULT_AMQP


def redis_url() -> str:
    return os.environ.get("RUNDISPATCH_REDIS_URL") or DEFAULT_REDIS


def new_namespace(prefix: str = "minimal") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class MinimalNames:
    ns: str

    def key(self, part: str) -> str:
        return f"{self.ns}:{part}"

    @property
    def requests(self) -> str:
        return f"{self.ns}.requests"

    @property
    def outcomes(self) -> str:
        return f"{self.ns}.outcomes"

    def machine_queue(self, machine: str) -> str:
        return f"{self.ns}.m.{machine}"

    @property
    def finished(self) -> str:
        return self.key("finished")

    @property
    def stack_in(self) -> str:
        return f"{self.ns}.stack.in"

    @property
    def stack_out(self) -> str:
        return f"{self.ns}.stack.out"

    def queues(self, machines: int) -> list[str]:
        return [
            self.requests,
            self.outcomes,
            self.stack_in,
            self.stack_out,
            *(self.machine_queue(str(m)) for m in range(machines)),
        ]

    @property
    def pattern(self) -> str:
        return f"{self.ns}:*"
