"""A TCP proxy in front of PostgreSQL that can lose the reply to a worker's claim.

The worker connects through it; everything is passed on unchanged until the test arms it.
Armed, it waits for the claim connection (the one whose statements say ``SKIP LOCKED``) to
send an Execute whose reply holds rows (a claim that claimed jobs), then drops that reply and
closes both sides. PostgreSQL flushes a reply only at ReadyForQuery, after the implicit
transaction committed: the claim happened, its client never hears of it.

SSL is refused on the client side (the proxy must read the statements); the upstream may be
TCP or a Unix socket (an embedded server listens only there).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

from sqlalchemy.engine import URL

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
#: An Execute of the unnamed portal with no row limit: ``E``, length 9, "", 0.
EXECUTE = b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"


def _has_rows(reply: bytes) -> bool:
    """Whether a reply holds a DataRow (``D``) message: the claim claimed something."""
    at = 0
    while at + 5 <= len(reply):
        kind = reply[at : at + 1]
        (length,) = struct.unpack("!i", reply[at + 1 : at + 5])
        if kind == b"D":
            return True
        at += 1 + length
    return False


@dataclass
class Proxy:
    upstream: URL
    host: str = "127.0.0.1"
    port: int = 0
    claimer_seen: asyncio.Event = field(default_factory=asyncio.Event)
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    _armed: bool = False
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self) -> str:
        """The upstream URL (user, password, database), pointed at the proxy."""
        query = {k: v for k, v in self.upstream.query.items() if k != "host"}
        url = self.upstream.set(host=self.host, port=self.port, query=query)
        return url.render_as_string(hide_password=False)

    def arm(self) -> None:
        """Lose the reply to the next claim."""
        self._armed = True

    async def close(self) -> None:
        """Stop accepting, and end every connection by closing its sockets (not by
        cancelling the tasks that serve them: asyncio would log each as an error)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        socket_dir = self.upstream.query.get("host")
        if isinstance(socket_dir, tuple):
            socket_dir = socket_dir[0]
        port = self.upstream.port or 5432
        if socket_dir and str(socket_dir).startswith("/"):
            return await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
        return await asyncio.open_connection(self.upstream.host or "127.0.0.1", port)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(c_writer)
        s_writer: asyncio.StreamWriter | None = None
        try:
            # The startup packet: answer SSL / GSS requests with "no" ourselves.
            while True:
                head = await c_reader.readexactly(8)
                length, code = struct.unpack("!ii", head)
                if length == 8 and code in (SSL_REQUEST, GSSENC_REQUEST):
                    c_writer.write(b"N")
                    await c_writer.drain()
                    continue
                startup = head + await c_reader.readexactly(length - 8)
                break
            s_reader, s_writer = await self._open_upstream()
            self._writers.add(s_writer)
            s_writer.write(startup)
            state = {"claimer": False, "cut_next_reply": False}

            async def to_server() -> None:
                while chunk := await c_reader.read(65536):
                    if b"SKIP LOCKED" in chunk and not state["claimer"]:
                        state["claimer"] = True
                        self.claimer_seen.set()
                    if state["claimer"] and self._armed and EXECUTE in chunk:
                        self._armed = False
                        state["cut_next_reply"] = True
                    s_writer.write(chunk)
                    await s_writer.drain()

            async def to_client() -> None:
                while chunk := await s_reader.read(65536):
                    if state["cut_next_reply"]:
                        if _has_rows(chunk):
                            self.cut.set()
                            return  # the reply is lost; both sides are closed below
                        state["cut_next_reply"] = False  # nothing claimed: wait for the next
                        self._armed = True
                    c_writer.write(chunk)
                    await c_writer.drain()

            pumps = [asyncio.create_task(to_server()), asyncio.create_task(to_client())]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for writer in (c_writer, s_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            self._tasks.discard(task)
