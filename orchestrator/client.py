"""A Python client for applications: submit jobs, watch them, wait for their totals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from shared import protocol as p
from shared.errors import AuthError, TallyError

TERMINAL = p.TERMINAL_JOB_STATES


class ClientError(TallyError):
    """The orchestrator answered a request with an ``error`` frame."""


class RefusedError(ClientError):
    """The orchestrator refused the request's content (a bad spec, an unknown executor): a
    usage error, exit 2, and nothing of it was written."""

    exit_code = 2


REFUSALS = frozenset({"invalid_spec", "unknown_executor", "invalid_request", "invalid_frame"})


class TallyClient:
    """One client connection to ``tally serve``.

    Usage::

        async with TallyClient("ws://127.0.0.1:8420/ws", token) as client:
            ids = await client.submit([p.JobSpec(executor="simulated")])
            finals = await client.wait(ids)
    """

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.token = token
        self._ws: ClientConnection | None = None
        self._replies: dict[str, asyncio.Future[p.ServerFrame]] = {}
        self._updates: asyncio.Queue[p.JobUpdate] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TallyClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            self._ws = await connect(
                self.url,
                additional_headers=headers,
                max_size=None,
                open_timeout=10,
                compression=None,
            )
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise AuthError(f"{self.url} refused the client token") from None
            raise TallyError(f"{self.url}: {exc}") from exc
        except OSError as exc:
            raise TallyError(f"cannot connect to {self.url}: {exc}") from exc
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            await self._ws.close()

    async def _read(self) -> None:
        assert self._ws is not None
        async for data in self._ws:
            frame = p.decode_server_frame(data)
            if isinstance(frame, p.JobUpdate):
                self._updates.put_nowait(frame)
                continue
            future = self._replies.pop(frame.id, None)
            if future is not None and not future.done():
                future.set_result(frame)
        for future in self._replies.values():
            if not future.done():
                future.set_exception(TallyError("connection closed"))

    async def _request(self, frame: p.ClientFrame) -> p.ServerFrame:
        assert self._ws is not None, "use `async with TallyClient(...)`"
        future: asyncio.Future[p.ServerFrame] = asyncio.get_running_loop().create_future()
        self._replies[frame.id] = future
        await self._ws.send(p.encode(frame).decode())
        reply = await future
        if isinstance(reply, p.Error):
            kind = RefusedError if reply.payload.code in REFUSALS else ClientError
            raise kind(
                f"{reply.payload.code}: {reply.payload.message}"
                + (f" (at {reply.payload.path})" if isinstance(reply.payload.path, str) else "")
            )
        return reply

    async def submit(
        self, jobs: Sequence[p.JobSpec], allow_unknown_executor: bool = False
    ) -> list[str]:
        """Submit jobs; returns their ids (the existing id for a repeated idempotency key).

        Refused (:class:`RefusedError`) for a bad spec or, unless allowed, an executor no
        registered daemon offers.
        """
        ids: list[str] = []
        for start in range(0, len(jobs), 1000):
            chunk = p.SubmitPayload(
                jobs=list(jobs[start : start + 1000]),
                allow_unknown_executor=allow_unknown_executor,
            )
            reply = await self._request(p.make(p.JobSubmit, chunk))
            assert isinstance(reply, p.JobSubmitted)
            ids.extend(reply.payload.job_ids)
        return ids

    async def watch(self, job_ids: Sequence[str]) -> None:
        """Start receiving ``job:update`` frames for these jobs."""
        assert self._ws is not None
        for start in range(0, len(job_ids), 5000):
            await self._ws.send(
                p.encode(
                    p.make(p.JobWatch, p.WatchPayload(job_ids=list(job_ids[start : start + 5000])))
                ).decode()
            )

    async def cancel(self, job_id: str) -> None:
        """Ask for a job to be cancelled wherever it runs."""
        assert self._ws is not None
        await self._ws.send(
            p.encode(p.make(p.ClientCancel, p.ClientCancelPayload(job_id=job_id))).decode()
        )

    async def updates(self) -> AsyncIterator[p.UpdatePayload]:
        """Every update received, as it arrives."""
        while True:
            yield (await self._updates.get()).payload

    async def wait(
        self, job_ids: Sequence[str], timeout: float | None = None
    ) -> dict[str, p.UpdatePayload]:
        """Watch jobs until all are finished; return the final update of each."""
        wanted = {j.lower() for j in job_ids}
        finals: dict[str, p.UpdatePayload] = {}
        await self.watch(list(wanted))
        async with asyncio.timeout(timeout):
            async for update in self.updates():
                if update.job_id in wanted and update.status in TERMINAL:
                    finals[update.job_id] = update
                    if len(finals) == len(wanted):
                        return finals
        return finals
