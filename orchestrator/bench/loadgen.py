"""A protocol-speaking load generator: daemon connections that stream results and time acks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from shared import protocol as p


def register_frame(
    daemon_id: str,
    executors: list[str] | None = None,
    capacity: int = 0,
    inflight: list[tuple[str, str]] | None = None,
    protocol_version: str = p.PROTOCOL_VERSION,
) -> str:
    """A ``daemon:register`` frame as text (no executors and no slots: never offered jobs)."""
    return p.encode(
        p.make(
            p.DaemonRegister,
            p.RegisterPayload(
                daemon_id=daemon_id,
                hostname="loadgen",
                version="0",
                protocol_version=protocol_version,
                executors=[p.ExecutorInfo(name=n) for n in executors or []],
                max_concurrent_jobs=capacity,
                inflight=[p.InflightExecution(execution_id=e, job_id=j) for e, j in inflight or []],
            ),
        )
    ).decode()


def sample_result(execution_id: str, i: int) -> p.JobResult:
    """A realistic result with two per-model entries whose sums equal the totals."""
    a = p.ModelUsage(
        model="sim-small",
        input_tokens=100 + i % 7,
        output_tokens=50,
        cache_read_input_tokens=1000,
        cache_creation_input_tokens=0,
        cost_usd=0.00125,
        provider="simulated",
    )
    b = p.ModelUsage(
        model="sim-large",
        input_tokens=10,
        output_tokens=20 + i % 3,
        cache_read_input_tokens=0,
        cache_creation_input_tokens=500,
        cost_usd=0.0025,
        provider="simulated",
    )
    return p.make(
        p.JobResult,
        p.ResultPayload(
            success=True,
            cost_usd=0.00375,
            duration_ms=12.5,
            num_turns=2,
            input_tokens=a.input_tokens + b.input_tokens,
            output_tokens=a.output_tokens + b.output_tokens,
            cache_read_input_tokens=1000,
            cache_creation_input_tokens=500,
            cost_source="provider",
            stop_reason="end_turn",
            model_usage=[a, b],
        ),
        execution_id,
    )


@dataclass
class StreamStats:
    """What one connection saw."""

    sent: int = 0
    acked: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def stream_results(
    url: str,
    token: str,
    daemon_id: str,
    frames: list[p.JobResult | p.JobGeneration],
    window: int = 500,
) -> StreamStats:
    """Register as ``daemon_id`` and send frames, at most ``window`` unacknowledged at once."""
    stats = StreamStats()
    sent_at: dict[tuple[str, int | None], list[float]] = {}
    expected = len(frames)
    inflight = 0
    room = asyncio.Event()
    done = asyncio.Event()
    async with connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        max_size=None,
        compression=None,
        ping_interval=None,
    ) as ws:
        await ws.send(register_frame(daemon_id))
        registered = p.decode_server_frame(await ws.recv())
        assert isinstance(registered, p.DaemonRegistered), registered

        async def reader() -> None:
            nonlocal inflight
            async for data in ws:
                frame = p.decode_server_frame(data)
                if isinstance(frame, p.HeartbeatPing):
                    await ws.send(
                        p.encode(
                            p.make(p.HeartbeatPong, p.PongPayload(active_jobs=0), frame.id)
                        ).decode()
                    )
                    continue
                if isinstance(frame, p.Error):
                    stats.errors.append(f"{frame.payload.code}: {frame.payload.message}")
                elif isinstance(frame, p.JobAck):
                    seq = frame.payload.seq if isinstance(frame.payload.seq, int) else None
                    times = sent_at.get((frame.id, seq))
                    if times:
                        stats.latencies.append(time.perf_counter() - times.pop(0))
                    stats.acked += 1
                else:
                    continue
                inflight -= 1
                room.set()
                if stats.acked + len(stats.errors) >= expected:
                    done.set()
                    return

        # Framed (text, masked) before the clock matters: the generator stands in for daemons
        # on other hosts and should cost this machine little. Frames go out in one write per
        # window's worth of room, straight to the socket: each is a whole WebSocket frame.
        keys = [(f.id, f.payload.seq if isinstance(f, p.JobGeneration) else None) for f in frames]
        wire = [Frame(Opcode.TEXT, p.encode(f)).serialize(mask=True) for f in frames]

        def finished(_task: asyncio.Task[None]) -> None:
            # If the link dies, fail instead of waiting for acks that will never come.
            done.set()
            room.set()

        task = asyncio.create_task(reader())
        task.add_done_callback(finished)
        i = 0
        while i < expected and not task.done():
            if inflight >= window:
                room.clear()
                await room.wait()
                continue
            k = min(window - inflight, expected - i)
            now = time.perf_counter()
            for key in keys[i : i + k]:
                sent_at.setdefault(key, []).append(now)
            ws.transport.write(b"".join(wire[i : i + k]))
            inflight += k
            stats.sent += k
            i += k
            await asyncio.sleep(0)  # let the reader run between bursts
        await done.wait()
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        task.cancel()
    return stats
