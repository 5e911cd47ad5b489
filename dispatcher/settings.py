"""One typed, frozen settings object, read from ``RUNDISPATCH_*`` environment variables.

Built once at start-up (``Settings()``) and passed down; nothing reads the environment at import
time. A settings file can be given with ``RUNDISPATCH_SETTINGS_FILE`` (a ``KEY=VALUE`` env file).
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the dispatcher and the workers. Times are in seconds."""

    model_config = SettingsConfigDict(
        env_prefix="RUNDISPATCH_", frozen=True, extra="ignore", env_file_encoding="utf-8"
    )

    # One URL, or the URLs of a cluster's nodes, comma-separated (the connection follows them).
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
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

    # Throughput knobs.
    prefetch: int = Field(default=200, ge=1)
    batch_size: int = Field(default=100, ge=1)

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
    log_level: str = "INFO"
    log_format: str = Field(default="text", pattern=r"^(text|json)$")

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
        env_file = os.environ.get("RUNDISPATCH_SETTINGS_FILE")
        if env_file:
            return cls(_env_file=env_file, **overrides)
        return cls(**overrides)
