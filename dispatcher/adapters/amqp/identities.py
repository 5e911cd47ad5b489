"""Broker identities through RabbitMQ's management HTTP API (httpx): create or rotate a
principal's user with its permissions and topic permissions, delete it.

The admin endpoint and credentials come from ``RUNDISPATCH_BROKER_ADMIN_URL``
(``http://user:password@host:15672``); the management plugin must be enabled
(``rabbitmq-plugins enable rabbitmq_management``).
"""

from __future__ import annotations

from types import TracebackType
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from dispatcher.core.principals import Principal
from dispatcher.errors import BrokerUnavailable, ConfigurationError, NotFound
from dispatcher.names import Names


def vhost_of(amqp_url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when it names none); of a cluster's list of
    node URLs, the first names it (every node serves the same virtual hosts)."""
    path = urlsplit(amqp_url.split(",", maxsplit=1)[0].strip()).path
    return "/" if path in ("", "/") else path[1:].replace("%2F", "/").replace("%2f", "/")


def management_client(admin_url: str, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client of the management API at ``admin_url`` (``http://user:password@host:
    15672``), its credentials as basic auth rather than in the URL."""
    parts = urlsplit(admin_url)
    if not parts.scheme.startswith("http") or not parts.hostname:
        raise ConfigurationError("RUNDISPATCH_BROKER_ADMIN_URL must be an http(s) URL")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return httpx.AsyncClient(
        base_url=base, auth=(parts.username or "", parts.password or ""), timeout=timeout_s
    )


def checked(response: httpx.Response) -> httpx.Response:
    """A management API answer to a read (``doctor``, the bench): ``ConfigurationError`` when
    it refused the credentials, ``BrokerUnavailable`` for any other error status."""
    if response.status_code in (401, 403):
        raise ConfigurationError(
            "the RabbitMQ management API refused the credentials of "
            "RUNDISPATCH_BROKER_ADMIN_URL (a monitoring or administrator user is needed)"
        )
    if response.status_code >= 400:
        raise BrokerUnavailable(f"the RabbitMQ management API answered {response.status_code}")
    return response


class BrokerIdentities:
    """Users and permissions of one virtual host, through the management API."""

    def __init__(self, admin_url: str, vhost: str, timeout_s: float = 10.0) -> None:
        self.vhost = vhost
        self._client = management_client(admin_url, timeout_s)

    async def __aenter__(self) -> BrokerIdentities:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def put(self, principal: Principal, password: str, *, tags: str = "") -> None:
        """Create the principal's user (or replace its password: rotation) and set exactly its
        permissions and topic permissions (any other topic permission is removed). ``tags``:
        RabbitMQ's user tags (none for every principal; ``impersonator`` for the queue
        migration's mover, adapters/amqp/migrate.py)."""
        user = quote(principal.username, safe="")
        vhost = quote(self.vhost, safe="")
        await self._call("PUT", f"/api/users/{user}", {"password": password, "tags": tags})
        allowed = principal.permissions
        await self._call(
            "PUT",
            f"/api/permissions/{vhost}/{user}",
            {"configure": allowed.configure, "write": allowed.write, "read": allowed.read},
        )
        await self._call("DELETE", f"/api/topic-permissions/{vhost}/{user}", missing_ok=True)
        for topic in principal.topic_permissions:
            await self._call(
                "PUT",
                f"/api/topic-permissions/{vhost}/{user}",
                {"exchange": topic.exchange, "write": topic.write, "read": topic.read},
            )
        await self.close_connections(principal.username)

    async def delete(self, username: str) -> bool:
        """Delete a user (its permissions go with it) and close its connections; False when
        there was no such user."""
        deleted = await self._call(
            "DELETE", f"/api/users/{quote(username, safe='')}", missing_ok=True
        )
        await self.close_connections(username)
        return deleted

    async def delete_namespace(self, names: Names) -> int:
        """Delete every machine, submitter and operator identity of the namespace (demos,
        tests), and a ``queues migrate`` mover left by a migration cut short."""
        prefixes = (names.machine_user(""), names.submitter_user(""), names.operator_user(""))
        response = await self._request("GET", "/api/users", None)
        users = [
            u["name"]
            for u in response.json()
            if str(u["name"]).startswith(prefixes) or u["name"] == names.migration_user
        ]
        for user in users:
            await self.delete(user)
        return len(users)

    async def close_connections(self, username: str) -> None:
        """Close the user's open connections: a rotated or removed identity stops at once."""
        response = await self._request("GET", "/api/connections", None)
        for connection in response.json():
            if connection.get("user") == username:
                name = quote(str(connection["name"]), safe="")
                await self._call("DELETE", f"/api/connections/{name}", missing_ok=True)

    async def _call(
        self, method: str, path: str, body: object = None, *, missing_ok: bool = False
    ) -> bool:
        response = await self._request(method, path, body)
        if response.status_code == 404 and missing_ok:
            return False
        if response.status_code == 404:
            raise NotFound(f"the broker has no {path}")
        return True

    async def _request(self, method: str, path: str, body: object) -> httpx.Response:
        try:
            response = await self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(
                f"the RabbitMQ management API cannot be reached ({type(exc).__name__}); is the "
                "rabbitmq_management plugin enabled and RUNDISPATCH_BROKER_ADMIN_URL right?"
            ) from None
        if response.status_code in (401, 403):
            raise ConfigurationError(
                "the RabbitMQ management API refused the admin credentials of "
                "RUNDISPATCH_BROKER_ADMIN_URL (an administrator identity is needed)"
            )
        if response.status_code >= 400 and response.status_code != 404:
            raise ConfigurationError(
                f"the RabbitMQ management API answered {response.status_code} to {method} "
                f"/api/{path.split('/')[2]}/..."
            )
        return response
