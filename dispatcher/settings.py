"""One typed, frozen settings object, read from ``RUNDISPATCH_*`` environment variables.

Built once at start-up (``Settings()``) and passed down; nothing reads the environment at import
time. A settings file can be given with ``RUNDISPATCH_SETTINGS_FILE`` (a ``KEY=VALUE`` env file);
a key in it that is not a setting is an error (a typo must not be ignored silently).

:meth:`Settings.load` raises ``ConfigurationError`` naming each bad ``RUNDISPATCH_*`` variable
with what it accepts (never a secret's value).
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dispatcher.errors import ConfigurationError

PREFIX = "RUNDISPATCH_"
SETTINGS_FILE = "RUNDISPATCH_SETTINGS_FILE"
# What a pattern-checked setting accepts, in words.
ACCEPTS = {"namespace": "1 to 64 letters, digits, '_', '.' or '-'"}


class Settings(BaseSettings):
    """Every knob of the dispatcher and the workers. Times are in seconds."""

    model_config = SettingsConfigDict(
        env_prefix="RUNDISPATCH_", frozen=True, extra="ignore", env_file_encoding="utf-8"
    )

    # One URL, or the URLs of a cluster's nodes, comma-separated (the connection follows them).
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    # RabbitMQ's management API, with the admin identity's credentials in the URL: machines and
    # submitters get their own broker identities through it (``machines register``).
    broker_admin_url: SecretStr = SecretStr("http://guest:guest@127.0.0.1:15672")
    # Redis behind Sentinel: "host:port,host:port" of the Sentinels and the service they watch
    # (the password and database still come from redis_url; its host is then not used).
    redis_sentinels: str = ""
    redis_sentinel_service: str = "rundispatch"
    namespace: str = Field(default="rundispatch", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")

    # Limits (SPEC §3).
    queue_timeout_s: float = Field(default=6 * 3600, gt=0)
    sign_in_queue_timeout_s: float = Field(default=3600, gt=0)
    max_run_s: float = Field(default=24 * 3600, gt=0)
    # The longest run time limit a request may ask for (``max_run_s`` of the request): a request
    # asking for more is rejected at admission (InvalidRunRequest), never clamped silently.
    max_run_cap_s: float = Field(default=7 * 24 * 3600, gt=0)
    throttle_per_minute: int = Field(default=70, ge=1)
    queue_cap: int = Field(default=100_000, ge=1)
    max_group_size: int = Field(default=50, ge=1)
    max_request_bytes: int = Field(default=256 * 1024, ge=1024)
    # The largest outputs (JSON) and error text a run may report: a flow that returns more
    # ends ``failed`` with OutputsTooLarge (its outputs dropped, its error text cut).
    max_output_bytes: int = Field(default=64 * 1024, ge=1024)
    # A high-priority run counts as having waited this much longer than a normal one; a normal
    # run that has waited longer than this overtakes later high-priority runs (aging).
    priority_boost_s: float = Field(default=3600, gt=0)

    # Liveness.
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    offline_after_s: float = Field(default=15.0, gt=0)
    running_grace_s: float = Field(default=60.0, ge=0)
    # A run dispatched to an online machine that has not started it after this long (its
    # assignment was lost) goes back to its queue at its old position.
    start_timeout_s: float = Field(default=120.0, gt=0)

    # Housekeeping.
    sweep_interval_s: float = Field(default=0.5, gt=0)
    resweep_interval_s: float = Field(default=5.0, gt=0)
    outbox_relay_after_s: float = Field(default=5.0, gt=0)
    retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    # A consumer holds a delivery whose handling hit an outage (Redis or RabbitMQ cannot serve)
    # this long, retrying; then it publishes the message again to its queue and acks the held
    # delivery, so that an outage of any length never uses up the delivery limit.
    outage_hold_s: float = Field(default=60.0, gt=0)
    # The dead-letter queue keeps at most this many messages; past it the oldest are dropped.
    dead_letter_max: int = Field(default=100_000, ge=1)

    # Graceful stop (SIGTERM, service stop). A dispatcher stops consuming and finishes the
    # messages in hand within ``drain_s``; a worker stops taking assignments, lets running
    # flows finish for ``worker_grace_s``, then stops them (``WorkerStopped``) and reports.
    drain_s: float = Field(default=20.0, gt=0)
    worker_grace_s: float = Field(default=60.0, ge=0)
    # One live worker per machine (its lease: the exclusive consumer of the machine's replies
    # queue). A worker whose connection comes back to find the lease held elsewhere stops
    # after this long: a stale connection of its own is closed by RabbitMQ within its
    # heartbeat timeout (60 s), another worker's lease is not given back.
    worker_lease_wait_s: float = Field(default=90.0, gt=0)

    # Foresight (docs/forecast.md): what is kept of finished runs for the service model and the
    # capacity replay, how often the forecast chore runs, how deep it plays each queue.
    trace_retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    trace_max_records: int = Field(default=20_000, ge=100)  # per target, oldest dropped first
    forecast_interval_s: float = Field(default=1.0, gt=0)
    forecast_max_runs: int = Field(default=500, ge=1)  # queue head played forward per target
    forecast_half_life_s: float = Field(default=3 * 3600, gt=0)
    # fail_early: a run is ended only if even optimistically it misses deadline + this slack.
    fail_early_slack_s: float = Field(default=0.0, ge=0)
    fail_early_min_samples: float = Field(default=20.0, ge=1)

    # Throughput knobs.
    prefetch: int = Field(default=200, ge=1)
    # Each machine's assignment queue: quorum (replicated, with a delivery limit) or classic
    # (durable, a third of the broker memory; for fleets of thousands of machines per node:
    # bench/README.md "Machine queues: quorum or classic"). A queue keeps the type it was
    # declared with: changing this needs the machines' queues deleted (nothing queued in them).
    machine_queue_type: Literal["quorum", "classic"] = "quorum"
    batch_size: int = Field(default=100, ge=1)
    # Replicas: "all" consume every shared queue (capacity adds up; each replica's batches are
    # smaller, so a run costs ~1.2-1.45x the CPU with two); "one" has RabbitMQ deliver each
    # queue to one replica at a time, the others standing by until its connection closes (a
    # second replica costs ~nothing, adds no capacity). docs/operations.md, "Replicas". A
    # queue keeps the arguments it was declared with: switching needs its runs moved (same).
    active_replicas: Literal["all", "one"] = "all"

    # Secrets at rest: base64 32-byte keys, "kid:key,kid:key"; the first one encrypts.
    secret_keys: SecretStr = SecretStr("")

    # Identity provider (sign-in connections).
    authority_host: str = "https://login.microsoftonline.com"
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    idp_ca_file: str = ""
    token_scope: str = "https://service.flow.microsoft.com//.default"
    # An access token handed to a worker stays valid at least this long.
    token_validity_s: float = Field(default=600, gt=0)

    # Metrics.
    metrics_port: int = Field(default=9464, ge=-1, le=65535)  # -1: no metrics endpoint
    metrics_host: str = "127.0.0.1"

    # Logging.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def as_environment(self) -> dict[str, str]:
        """``RUNDISPATCH_*`` variables that give another process exactly these settings
        (tests, demos and benchmarks start dispatchers and workers with them)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            text = value.get_secret_value() if isinstance(value, SecretStr) else value
            env[f"RUNDISPATCH_{name.upper()}"] = str(text)
        return env

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Build the settings from the environment, an optional env file, and overrides."""
        env_file = os.environ.get(SETTINGS_FILE)
        try:
            if env_file:
                check_settings_file(env_file)
                return cls(_env_file=env_file, **overrides)
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigurationError(describe(exc)) from None


def variable(field: str) -> str:
    """The environment variable of a setting."""
    return f"{PREFIX}{field.upper()}"


def describe(error: ValidationError) -> str:
    """One line per bad setting: its variable, what is wrong, what it accepts."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        message = str(item["msg"])
        if field in ACCEPTS:
            message = f"expected {ACCEPTS[field]}"
        secret = Settings.model_fields.get(field) is not None and (
            Settings.model_fields[field].annotation is SecretStr
        )
        given = "" if secret or "input" not in item else f" (got {item['input']!r})"
        lines.append(f"{variable(field)}: {message}{given}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def check_settings_file(path: str) -> None:
    """Every key of the settings file is a setting (``ConfigurationError`` naming the others,
    with the closest known variable)."""
    if not os.path.isfile(path):
        raise ConfigurationError(f"{SETTINGS_FILE}: no such file: {path}")
    known = {variable(name) for name in Settings.model_fields}
    problems = []
    for key in dotenv_values(path):
        if key.upper() in known:
            continue
        close = difflib.get_close_matches(key.upper(), sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"{key}: not a setting{hint}")
    if problems:
        raise ConfigurationError(
            f"unknown keys in the settings file {path}:\n  " + "\n  ".join(problems)
        )
