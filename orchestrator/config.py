"""The orchestrator's settings: one frozen object built by the CLI and passed down."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared.errors import ConfigError
from shared.limits import MIN_FRAME_BYTES
from shared.output import DEFAULT_MAX_OUTPUT_BYTES


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class OtlpSettings:
    """``tally serve --otlp-*``."""

    # The OTLP/HTTP base URL (/v1/traces and /v1/metrics are appended); None: the SDK reads
    # OTEL_EXPORTER_OTLP_ENDPOINT and the per-signal variables itself.
    endpoint: str | None = None
    label_prefix: str = "tally.label."
    # Attempts decided longer ago than this when first seen are skipped, not sent.
    backlog_hours: float = 24.0
    batch: int = 256
    poll_interval: float = 1.0
    # Seconds between metric exports; None: OTEL_METRIC_EXPORT_INTERVAL (the SDK's 60 s).
    metrics_interval: float | None = None
    max_backoff: float = 30.0


OTLP_DEFAULTS = OtlpSettings()

# The SDK's own variables that name an endpoint: with one of them set, the export is on
# without --otlp-endpoint.
OTEL_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def otlp_settings(
    endpoint: str | None, label_prefix: str, backlog_hours: float
) -> OtlpSettings | None:
    """The export's settings, or None when neither --otlp-endpoint nor the SDK's endpoint
    variables ask for it; ConfigError for a bad URL or a missing ``otel`` extra."""
    if endpoint is None and not any(os.environ.get(v) for v in OTEL_ENDPOINT_VARIABLES):
        return None
    if endpoint is not None:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ConfigError(
                f"--otlp-endpoint {endpoint!r}: expected an http:// or https:// URL "
                "(the OTLP/HTTP base, e.g. http://collector:4318)"
            )
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        raise ConfigError("the OTLP export needs the otel extra: pip install 'tally-ledger[otel]'")
    if any(ch.isspace() for ch in label_prefix):
        raise ConfigError(f"--otlp-label-prefix {label_prefix!r}: no spaces allowed")
    return OtlpSettings(endpoint=endpoint, label_prefix=label_prefix, backlog_hours=backlog_hours)


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
    label_cap: int = 200
    writer_stall_timeout: float = 30.0
    client_idle_timeout: float = 300.0
    # (daemon id, token): a bound token may register only as its ids, and an id bound to
    # tokens only with one of them.
    daemon_token_bindings: tuple[tuple[str, str], ...] = ()
    snapshot_interval: float = 2.0
    drain_timeout: float = 10.0
    pool_size: int = 8
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    # Log one usage event per recorded call and result after each commit (--log-format json).
    usage_events: bool = False
    # The OTLP export; None: off.
    otlp: OtlpSettings | None = None
    # Seconds before a job held by a budget is looked at again (sooner at its reset).
    budget_recheck: float = 5.0
    # maxTurns offered to a job without its own (across its attempts); 0: none.
    default_max_turns: int = 100
    # The usage API reads through its own pool, never the one leases and accepts use: at most
    # api_max_concurrent requests are answered at once, the others wait api_queue_timeout
    # seconds for a turn and then get 503; each answer holds at most api_max_rows rows per
    # list, and its statements stop after api_statement_timeout seconds.
    # One connection and two turns: on a 2-core host two report backends took both cores and
    # offers expired unaccepted (`tally bench api`, bench/RESULTS.md).
    api_pool_size: int = 1
    api_max_concurrent: int = 2
    api_queue_timeout: float = 5.0
    api_max_rows: int = 5000
    api_statement_timeout: float = 10.0
    # Tokens that may read /metrics (client tokens may too); none: /metrics is open.
    metrics_tokens: tuple[str, ...] = ()
    # The budgets' clock: their periods are taken at this instant (tests move it).
    budget_clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    orchestrator_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    )

    @property
    def all_daemon_tokens(self) -> tuple[str, ...]:
        """Every token a daemon may present: unbound ones and bound ones."""
        return (*self.daemon_tokens, *(token for _, token in self.daemon_token_bindings))

    @property
    def api_deadline(self) -> float:
        """Seconds the usage API may take for one answer at most: its wait for a turn, its
        statements, and a margin to encode and send it (the HTTP side allows this long)."""
        return self.api_queue_timeout + self.api_statement_timeout + 10.0

    @property
    def has_tokens(self) -> bool:
        """Whether any token is configured (then every peer must present one)."""
        return bool(self.all_daemon_tokens or self.client_tokens)

    def validate(self) -> ServeSettings:
        """Raise ConfigError naming the flag for any unsafe or inconsistent setting."""
        self._validate_tokens()
        if self.label_cap < 1:
            raise ConfigError("--label-cap must be at least 1")
        if self.max_frame_bytes < MIN_FRAME_BYTES:
            # A daemon fits its frames under this limit; below the floor a result might not fit.
            raise ConfigError(f"--max-frame-bytes must be at least {MIN_FRAME_BYTES}")
        self._validate_tls()
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError("--heartbeat-timeout must be longer than --heartbeat-interval")
        if self.lease_timeout < self.heartbeat_timeout:
            raise ConfigError("--lease-timeout must be at least --heartbeat-timeout")
        return self

    def _validate_tokens(self) -> None:
        """Who may connect: tokens (or --insecure on loopback), each in one role only."""
        if self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"--insecure is only allowed on a loopback address, not {self.host!r}"
            )
        if not self.has_tokens and not self.insecure:
            raise ConfigError(
                "no tokens configured: set --daemon-token and --client-token "
                "(TALLY_DAEMON_TOKENS, TALLY_CLIENT_TOKENS), or use --insecure on loopback"
            )
        daemon_tokens = set(self.all_daemon_tokens)
        if daemon_tokens & set(self.client_tokens):
            raise ConfigError("a token may not be both a daemon token and a client token")
        if set(self.daemon_tokens) & {token for _, token in self.daemon_token_bindings}:
            raise ConfigError("a daemon token may not be both bound to a daemon id and unbound")
        if any(len(t) < 16 for t in (*daemon_tokens, *self.client_tokens, *self.metrics_tokens)):
            raise ConfigError("tokens must be at least 16 characters long")
        if daemon_tokens & set(self.metrics_tokens):
            raise ConfigError("a token may not be both a daemon token and a metrics token")
        if set(self.client_tokens) & set(self.metrics_tokens):
            # A client token reads /metrics already; one listed as a metrics token would
            # also open the API to whoever holds "the scrape token".
            raise ConfigError("a token may not be both a client token and a metrics token")

    def _validate_tls(self) -> None:
        """The certificate and key: both or neither, and loadable."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key must be given together")
        for path, flag in ((self.tls_cert, "--tls-cert"), (self.tls_key, "--tls-key")):
            if path is not None and not path.is_file():
                raise ConfigError(f"{flag} {path}: no such file")
        if self.tls_cert is not None and self.tls_key is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"--tls-cert {self.tls_cert} / --tls-key {self.tls_key}: cannot load the "
                    f"certificate and key ({exc})"
                ) from None


Tokens = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]


# One spelling of every default: the CLI's flags read them from here.
DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(ServeSettings) if f.default is not MISSING
}


def parse_daemon_tokens(values: tuple[str, ...]) -> Tokens:
    """Split ``--daemon-token`` values into unbound tokens and ``ID=TOKEN`` bindings.

    A value is a binding when it holds ``=`` and what follows the first one is a whole token
    (16 characters or more); a plain token that itself contains ``=`` early (base64 padding
    sits at the end, so it does not) belongs in ``--daemon-tokens-file``.
    """
    plain: list[str] = []
    bound: list[tuple[str, str]] = []
    for value in values:
        daemon_id, sep, token = value.partition("=")
        if sep and daemon_id and len(token) >= 16:
            bound.append((daemon_id, token))
        else:
            plain.append(value)
    return tuple(plain), tuple(bound)


def read_daemon_tokens_file(path: Path) -> Tokens:
    """A tokens file: one ``TOKEN`` or ``DAEMON_ID TOKEN`` per line, ``#`` comments."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--daemon-tokens-file {path}: {exc.strerror or exc}") from None
    plain: list[str] = []
    bound: list[tuple[str, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) == 1:
            plain.append(parts[0])
        elif len(parts) == 2:
            bound.append((parts[0], parts[1]))
        else:
            raise ConfigError(
                f"--daemon-tokens-file {path}:{number}: expected TOKEN or DAEMON_ID TOKEN"
            )
    return tuple(plain), tuple(bound)
