"""A local HTTP server answering in a provider's real wire format, from a script of responses."""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Scripted:
    """One scripted answer: a JSON body, an SSE event list (optionally cut short), a status."""

    status: int = 200
    body: dict[str, Any] | None = None
    events: list[tuple[str, dict[str, Any]]] | None = None
    cut_after: int | None = None
    ndjson: list[dict[str, Any]] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class FakeProvider:
    """Serves the scripted answers in order and records every request body."""

    def __init__(self, script: list[Scripted]) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def next(self, body: dict[str, Any]) -> Scripted:
        with self.lock:
            self.requests.append(body)
            if not self.script:
                return Scripted(status=500, body={"error": "script exhausted"})
            return self.script.pop(0)


def _handler(provider: FakeProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            answer = provider.next(body)
            if answer.ndjson is not None:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Connection", "close")
                self.end_headers()
                for i, line in enumerate(answer.ndjson):
                    if answer.cut_after is not None and i >= answer.cut_after:
                        break
                    self.wfile.write(json.dumps(line).encode() + b"\n")
                    self.wfile.flush()
                self.close_connection = True
                return
            if answer.events is None:
                data = json.dumps(answer.body or {}).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("request-id", "req_fake")
                for k, v in answer.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i, (event, payload) in enumerate(answer.events):
                if answer.cut_after is not None and i >= answer.cut_after:
                    break
                line = f"data: {json.dumps(payload)}\n\n"
                if event:
                    line = f"event: {event}\n" + line
                self.wfile.write(line.encode())
                self.wfile.flush()
            self.close_connection = True

    return Handler


@contextmanager
def serving(provider: FakeProvider) -> Iterator[str]:
    """Serve on 127.0.0.1:0; yield the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(provider))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def run_offer(
    executor: Any, name: str, model: str, spec: dict[str, Any], limits: Any = None
) -> tuple[list[Any], Any]:
    """Run one offered job through the real runner; return its job:generation frames and result.

    The executor's SDK client is closed afterwards, on the loop that opened it.
    """
    from daemon.runner import run_job
    from shared import protocol as p

    offer = p.JobOffer(
        id=p.new_id(),
        timestamp=p.now_ms(),
        payload=p.OfferPayload(
            job_id=p.new_id(),
            attempt=1,
            executor=name,
            model=model,
            spec=spec,
            limits=limits or p.Limits(),
        ),
    )
    frames: list[Any] = []

    async def emit(frame: Any) -> None:
        frames.append(frame)

    result = await run_job(executor, offer, emit)
    close = getattr(getattr(executor, "client", None), "close", None)
    closing = close() if close is not None else None
    if inspect.isawaitable(closing):
        await closing
    return [f for f in frames if isinstance(f, p.JobGeneration)], result


def cache_buckets(payload: Any) -> tuple[Any, ...]:
    """(input, cache read, cache creation, output) of a frame payload, UNSET kept."""
    return (
        payload.input_tokens,
        payload.cache_read_input_tokens,
        payload.cache_creation_input_tokens,
        payload.output_tokens,
    )
