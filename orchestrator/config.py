"""The orchestrator's settings: one frozen object built by the CLI and passed down."""

from __future__ import annotations

import ipaddress
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigError


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Everything ``tally serve`` needs, validated once."""

    database_url: str
    host: str = "127.0.0.1"
    port: int = 8420
    daemon_tokens: tuple[str, ...] = ()
    client_tokens: tuple[str, ...] = ()
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_frame_bytes: int = 1 << 20
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 15.0
    offer_timeout: float = 10.0
    lease_timeout: float = 30.0
    reap_interval: float = 1.0
    requeue_backoff: float = 1.0
    batch_max_rows: int = 1000
    writer_connections: int = 2
    batch_max_delay: float = 0.005
    max_unacked_per_daemon: int = 2000
    model_label_cap: int = 200
    snapshot_interval: float = 2.0
    drain_timeout: float = 10.0
    pool_size: int = 8
    orchestrator_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    )

    def validate(self) -> ServeSettings:
        """Raise ConfigError naming the flag for any unsafe or inconsistent setting."""
        if not self.daemon_tokens and not self.client_tokens:
            if not self.insecure:
                raise ConfigError(
                    "no tokens configured: set --daemon-token and --client-token "
                    "(TALLY_DAEMON_TOKENS, TALLY_CLIENT_TOKENS), or use --insecure on loopback"
                )
            if not is_loopback(self.host):
                raise ConfigError(
                    f"--insecure is only allowed on a loopback address, not {self.host!r}"
                )
        if set(self.daemon_tokens) & set(self.client_tokens):
            raise ConfigError("a token may not be both a daemon token and a client token")
        if any(len(t) < 16 for t in (*self.daemon_tokens, *self.client_tokens)):
            raise ConfigError("tokens must be at least 16 characters long")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key must be given together")
        for path, flag in ((self.tls_cert, "--tls-cert"), (self.tls_key, "--tls-key")):
            if path is not None and not path.is_file():
                raise ConfigError(f"{flag} {path}: no such file")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError("--heartbeat-timeout must be longer than --heartbeat-interval")
        if self.lease_timeout < self.heartbeat_timeout:
            raise ConfigError("--lease-timeout must be at least --heartbeat-timeout")
        return self
