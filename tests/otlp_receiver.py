"""A real OTLP/HTTP receiver for tests: a small HTTP server whose bodies are decoded with
``opentelemetry-proto``, as a Collector decodes them."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def value_of(v: AnyValue) -> Any:
    """A protobuf AnyValue as a Python value."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value_of(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(kvs: Any) -> dict[str, Any]:
    """Protobuf KeyValues as a dict."""
    return {kv.key: value_of(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


@dataclass
class Span:
    """A received span, decoded."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start: int
    end: int
    status_code: int
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass
class Point:
    """A received metric data point: its metric, attributes, start time, value and the
    resource that sent it."""

    metric: str
    attributes: dict[str, Any]
    start: int
    time: int
    value: float
    resource: dict[str, Any] = field(default_factory=dict)


@dataclass
class Received:
    """Everything the receiver decoded, and the headers of each request."""

    spans: list[Span] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    # Requests answered 413 (over max_trace_body) and 503 (while unavailable), span requests
    # pushed back (answered ``busy_status`` while they held spans), and empty span requests.
    too_large: int = 0
    unavailable: int = 0
    pushed_back: int = 0
    empty: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _spans(request: ExportTraceServiceRequest) -> list[Span]:
    out = []
    for rs in request.resource_spans:
        resource = attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=s.kind,
                        start=s.start_time_unix_nano,
                        end=s.end_time_unix_nano,
                        status_code=s.status.code,
                        attributes=attrs(s.attributes),
                        resource=resource,
                    )
                )
    return out


def _points(request: ExportMetricsServiceRequest) -> list[Point]:
    out = []
    for rm in request.resource_metrics:
        resource = attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                for dp in getattr(m, kind).data_points:
                    value = dp.sum if kind == "histogram" else dp.as_double or dp.as_int
                    out.append(
                        Point(
                            m.name,
                            attrs(dp.attributes),
                            dp.start_time_unix_nano,
                            dp.time_unix_nano,
                            value,
                            resource,
                        )
                    )
    return out


class Receiver:
    """An OTLP/HTTP endpoint on loopback: /v1/traces and /v1/metrics.

    ``max_trace_body``: a /v1/traces body longer than this many bytes (as sent) is read and
    answered 413, as a Collector behind a request-size limit answers. Set ``unavailable``
    to answer every request 503 (a collector that is down), until it is cleared. Set
    ``busy_status`` (e.g. 503 or 429) to answer it to every /v1/traces request that holds
    spans while still taking empty ones, as a Collector whose memory limiter or queue is full
    does, until it is cleared.
    """

    def __init__(self, port: int = 0, max_trace_body: int | None = None) -> None:
        self.received = Received()
        self.max_trace_body = max_trace_body
        self.unavailable = False
        self.busy_status: int | None = None
        received = self.received
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _refuse(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                limit = receiver.max_trace_body
                if receiver.unavailable:
                    with received.lock:
                        received.unavailable += 1
                    self._refuse(503)
                    return
                if self.path == "/v1/traces" and limit is not None and len(body) > limit:
                    with received.lock:
                        received.too_large += 1
                    self._refuse(413)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with received.lock:
                    received.headers.append(dict(self.headers))
                    if self.path == "/v1/traces":
                        req = ExportTraceServiceRequest()
                        req.ParseFromString(body)
                        spans = _spans(req)
                        busy = receiver.busy_status
                        if not spans:
                            received.empty += 1
                        elif busy is not None:
                            received.pushed_back += 1
                            self._refuse(busy)
                            return
                        received.spans.extend(spans)
                        answer = ExportTraceServiceResponse().SerializeToString()
                    elif self.path == "/v1/metrics":
                        mreq = ExportMetricsServiceRequest()
                        mreq.ParseFromString(body)
                        received.points.extend(_points(mreq))
                        answer = ExportMetricsServiceResponse().SerializeToString()
                    else:
                        self.send_error(404)
                        return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[Span]:
        with self.received.lock:
            return list(self.received.spans)

    def points(self) -> list[Point]:
        with self.received.lock:
            return list(self.received.points)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
