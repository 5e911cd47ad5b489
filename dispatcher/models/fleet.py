"""The fleet: environment, groups, machines, connections (SPEC §2), and the fleet file."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dispatcher.models.base import SafeId, Strict, TenantId, Text


class Target(Strict):
    """A connection's target: exactly one of ``machine_id`` or ``group_id``."""

    machine_id: SafeId | None = None
    group_id: SafeId | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if (self.machine_id is None) == (self.group_id is None):
            raise ValueError("a target names exactly one of machine_id or group_id")
        return self

    @property
    def key(self) -> str:
        """Queue key of the target: ``m:<id>`` or ``g:<id>``."""
        if self.machine_id is not None:
            return f"m:{self.machine_id}"
        return f"g:{self.group_id}"


class Environment(Strict):
    tenant_id: TenantId


class Group(Strict):
    group_id: SafeId
    name: Text


class OsKind(StrEnum):
    windows_client = "windows_client"
    windows_server = "windows_server"


class JoinType(StrEnum):
    entra_joined = "entra_joined"
    hybrid_joined = "hybrid_joined"
    ad_joined = "ad_joined"
    workgroup = "workgroup"


class Machine(Strict):
    """A registered machine's configuration (its live state comes from its worker)."""

    machine_id: SafeId
    name: Text
    group_id: SafeId | None = None
    os: OsKind = OsKind.windows_server
    join_type: JoinType = JoinType.entra_joined
    allowed_registration_tenants: tuple[TenantId, ...] = ()
    max_unattended_runs: int = Field(default=1, ge=1, le=10)
    maintenance: bool = False


class ConnectionKind(StrEnum):
    credentials = "credentials"
    sign_in = "sign_in"


class SecretRef(Strict):
    """Where a credentials connection's password lives when it is not stored here."""

    provider: Literal["azure_key_vault", "cyberark"]
    vault_url: Annotated[str, Field(min_length=1, max_length=1024)]
    secret_name: Text | None = None  # azure_key_vault
    app_id: Text | None = None  # cyberark
    safe: Text | None = None  # cyberark
    object: Text | None = None  # cyberark


class Connection(Strict):
    """A desktop-flow connection. ``password_sealed`` is the stored password, encrypted."""

    connection_id: SafeId
    owner: Text
    kind: ConnectionKind
    target: Target
    username: Text | None = None
    password_sealed: str | None = None
    secret_ref: SecretRef | None = None
    account: Text | None = None
    tenant_id: TenantId | None = None

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Connection:
        if self.kind is ConnectionKind.credentials and not self.username:
            raise ValueError("a credentials connection needs a username")
        if self.kind is ConnectionKind.sign_in and (not self.account or not self.tenant_id):
            raise ValueError("a sign_in connection needs an account and a tenant_id")
        return self

    @property
    def session_user(self) -> str:
        """The Windows or Entra user whose session the runs of this connection use."""
        return (self.account if self.kind is ConnectionKind.sign_in else self.username) or ""


class Submitter(BaseModel):
    """A submitter (a cloud-flow environment) and the owners it may submit runs for; its
    broker identity comes from ``submitters register``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
    acts_for: tuple[str, ...] = Field(min_length=1)


class FleetFile(BaseModel):
    """A fleet file (SPEC §4): environment, groups, machines, connections, submitters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: Environment
    groups: tuple[Group, ...] = ()
    machines: tuple[Machine, ...] = ()
    connections: tuple[dict[str, Any], ...] = ()
    submitters: tuple[Submitter, ...] = ()
