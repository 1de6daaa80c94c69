"""A TCP proxy for tests: forwards loopback links to a target and breaks them on demand.

Put between ``tallyd`` and ``tally serve`` (``tallyd --orchestrator ws://127.0.0.1:PORT/ws``)
it plays a hostile network: :meth:`TcpProxy.reset` aborts every current link with a TCP RST
on both sides (``SO_LINGER`` 0, then close), :meth:`TcpProxy.refuse` resets every new link at
once for a while, and :meth:`TcpProxy.cut` does both. It listens on port 0 of 127.0.0.1 and
connects only to the target it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close a link so that the peer sees a reset, not an orderly end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forwards every link accepted on :attr:`port` to ``target_host:target_port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host, self.target_port = target_host, target_port
        self.port = 0
        self.links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.accepted = 0  # links forwarded
        self.refused = 0  # links reset at once while refusing
        self.resets = 0  # links reset by reset()
        self._refuse_until = 0.0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on a free loopback port; return it."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    @property
    def url(self) -> str:
        """The WebSocket URL of an orchestrator behind this proxy."""
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def refusing(self) -> bool:
        """Whether new links are reset at once now."""
        return asyncio.get_running_loop().time() < self._refuse_until

    def reset(self) -> int:
        """Abort every current link with a reset on both sides; return how many."""
        links, self.links = list(self.links), set()
        for downstream, upstream in links:
            _rst(downstream)
            _rst(upstream)
        self.resets += len(links)
        return len(links)

    def refuse(self, seconds: float) -> None:
        """Reset every new link at once for ``seconds`` from now."""
        self._refuse_until = asyncio.get_running_loop().time() + seconds

    def cut(self, seconds: float) -> int:
        """Reset every current link and refuse new ones for ``seconds``; return links reset."""
        self.refuse(seconds)
        return self.reset()

    async def close(self) -> None:
        """Stop listening and reset every link."""
        if self._server is not None:
            self._server.close()
        self.reset()
        for task in list(self._pipes):
            task.cancel()
        if self._pipes:
            await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.refused += 1
            _rst(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _rst(writer)
            return
        link = (writer, up_writer)
        self.links.add(link)
        self.accepted += 1
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst, link))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        # One side ended (or was reset): end the whole link the same way.
        if link in self.links:
            self.links.discard(link)
            for w in link:
                w.transport.abort()
