"""The HTTP side of the one port: probes, metrics, the read-only usage API, and the WebSocket
handshake's authentication.

The role a peer authenticated as is decided once, at the handshake, and kept for its
connection (as websockets' ``basic_auth`` keeps ``connection.username``).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from orchestrator.api import RETRY_AFTER_DB_S, UsageApi
from orchestrator.config import ServeSettings
from orchestrator.metrics import Metrics


@dataclass(frozen=True, slots=True)
class Peer:
    """Who authenticated at the handshake: ``daemon``, ``client`` or ``any`` (insecure mode,
    no tokens configured), and the token it presented (None in insecure mode)."""

    role: Literal["daemon", "client", "any"]
    token: str | None = None


def bearer_role(headers: Headers, settings: ServeSettings) -> Peer | None:
    """The peer an ``Authorization: Bearer`` header authenticates, or None (refused: 401).

    The scheme is matched case-insensitively, as HTTP authentication schemes are (RFC 9110
    section 11.1). A peer without a token is let in only in insecure mode with no token
    configured at all, which ``ServeSettings.validate`` allows only on loopback.
    """
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return Peer("any") if settings.insecure and not settings.has_tokens and not value else None
    raw = token.strip().encode()
    peer = None
    # Compare against every token so timing does not tell which list matched.
    for candidate in settings.all_daemon_tokens:
        if hmac.compare_digest(raw, candidate.encode()):
            peer = Peer("daemon", candidate)
    for candidate in settings.client_tokens:
        if hmac.compare_digest(raw, candidate.encode()):
            peer = Peer("client", candidate)
    return peer


class HttpFront:
    """Answers /healthz, /readyz, /metrics and /api/v1/, and authenticates /ws handshakes."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: Metrics,
        unready_reason: Callable[[], str | None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.unready_reason = unready_reason
        self.peers: weakref.WeakKeyDictionary[ServerConnection, Peer] = weakref.WeakKeyDictionary()
        # Set once the database answers (the API reads through it).
        self.api: UsageApi | None = None

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """websockets' ``process_request`` hook: an HTTP answer, or None to upgrade."""
        path, _, query = request.path.partition("?")
        if path.startswith("/api/"):
            return await self._api(connection, request, path, query)
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            why = self.unready_reason()
            if why is None:
                return connection.respond(HTTPStatus.OK, "ready\n")
            response = connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {why}\n")
            response.headers["Retry-After"] = str(RETRY_AFTER_DB_S)
            return response
        if path == "/metrics":
            if not metrics_allowed(request.headers, self.settings):
                response = connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
                response.headers["WWW-Authenticate"] = 'Bearer realm="tally"'
                return response
            response = connection.respond(
                HTTPStatus.OK, generate_latest(self.metrics.registry).decode()
            )
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = CONTENT_TYPE_LATEST
            return response
        if path != "/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        peer = bearer_role(request.headers, self.settings)
        if peer is None:
            self.metrics.frames_rejected.labels("unauthorized").inc()
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="tally"'
            return response
        self.peers[connection] = peer
        return None

    async def _api(
        self, connection: ServerConnection, request: Request, path: str, query: str
    ) -> Response:
        """The usage API: a client token (or insecure mode) only."""
        peer = bearer_role(request.headers, self.settings)
        if peer is None:
            response = json_response(
                connection, HTTPStatus.UNAUTHORIZED, {"error": "a client token is required"}
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="tally"'
            return response
        if peer.role == "daemon":
            return json_response(
                connection, HTTPStatus.FORBIDDEN, {"error": "a daemon token cannot read the API"}
            )
        if self.api is None:
            response = json_response(
                connection, HTTPStatus.SERVICE_UNAVAILABLE, {"error": "not ready"}
            )
            response.headers["Retry-After"] = str(RETRY_AFTER_DB_S)
            return response
        answer = await self.api.answer(path, query)
        response = connection.respond(answer.status, "")
        # Headers is a multidict: assigning adds a header, so replace the text body's ones.
        for name in ("Content-Length", "Content-Type"):
            del response.headers[name]
        response.headers["Content-Length"] = str(len(answer.body))
        response.headers["Content-Type"] = "application/json"
        for name, value in answer.headers:
            response.headers[name] = value
        return dataclasses.replace(response, body=answer.body)


def metrics_allowed(headers: Headers, settings: ServeSettings) -> bool:
    """Whether a scrape may read /metrics: always when no metrics token is configured, else
    only with ``Authorization: Bearer`` and a metrics token or a client token."""
    if not settings.metrics_tokens:
        return True
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    raw = token.strip().encode()
    allowed = False
    for candidate in (*settings.metrics_tokens, *settings.client_tokens):
        allowed |= hmac.compare_digest(raw, candidate.encode())
    return allowed


def json_response(connection: ServerConnection, status: HTTPStatus, body: object) -> Response:
    """An HTTP answer with a JSON body."""
    response = connection.respond(status, json.dumps(body, separators=(",", ":")) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response
