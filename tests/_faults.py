"""A TCP fault proxy between a manager and the test cluster (no pytest imports here).

``FaultProxy`` listens on a port of its own and forwards every connection to the server. Its
``mode`` says what the link does, for links already open and for new ones alike:

- ``pass``: bytes go through untouched.
- ``blackhole``: connections are accepted and kept, but no byte goes either way (a server
  that froze, a network partition). Bytes in flight are held, not lost, as TCP would
  retransmit them: when the mode changes they go through. Connections accepted meanwhile
  never reached the server; they are reset then.
- ``slow``: each chunk waits ``delay`` seconds before it is passed on.
- ``reset``: every open link is aborted with a TCP RST, and new ones are reset on accept.
- ``refuse``: the port stops listening, so connects are refused (a server that is down).

``hold_eof`` keeps the client's side open when the server closes its side: the client gets
the server's last bytes (a FATAL, say) but not its EOF, the state an idle connection is in
between the two under load. Counters say what the proxy did, for the tests' figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
from _support import ServerSampler

__all__ = ["FaultProxy", "FaultSampler", "Mode", "server_until"]

Mode = Literal["pass", "blackhole", "slow", "reset", "refuse"]

_CHUNK = 65536


class _Link:
    """One client connection and its upstream, with the two pumps between them."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            _reset(writer)
        for task in self.tasks:
            task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST rather than a FIN: SO_LINGER with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """``async with FaultProxy(dsn) as proxy``: ``proxy.dsn`` reaches ``dsn``'s server through
    the proxy; ``await proxy.set_mode(...)`` injects a fault, ``set_mode("pass")`` lifts it."""

    def __init__(self, dsn: str, *, delay: float = 0.05) -> None:
        parts = urlsplit(dsn)
        assert parts.hostname is not None and parts.port is not None, "a host:port DSN"
        self._dsn = parts
        self._upstream = (parts.hostname, parts.port)
        self.delay = delay
        self.hold_eof = False
        self.port = 0
        self._mode: Mode = "pass"
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._blackholed: list[asyncio.StreamWriter] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.accepted = 0
        self.resets = 0
        self.faults = 0  # mode changes to anything but "pass"

    @property
    def dsn(self) -> str:
        """The DSN with the proxy's address: same user, password, database and options."""
        parts = self._dsn
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def links(self) -> int:
        """Client connections open through the proxy now."""
        return len(self._links)

    @property
    def mode(self) -> Mode:
        return self._mode

    async def set_mode(self, mode: Mode) -> None:
        if mode not in ("pass", "blackhole", "slow", "reset", "refuse"):
            raise ValueError(f"unknown mode {mode!r}")
        previous, self._mode = self._mode, mode
        if mode != "pass":
            self.faults += 1
        if mode == "blackhole":
            self._flowing.clear()
        elif previous == "blackhole":
            self._flowing.set()
            for writer in self._blackholed:
                self.resets += 1
                _reset(writer)
            self._blackholed.clear()
        if mode == "reset":
            self.reset_all()
        if mode == "refuse" and previous != "refuse":
            await self._stop_listening()
        elif mode != "refuse" and previous == "refuse":
            await self._listen()

    def reset_all(self) -> None:
        """Abort every open link with a RST, whatever the mode."""
        for link in list(self._links):
            self.resets += 1
            link.abort()
        self._links.clear()
        for writer in self._blackholed:
            _reset(writer)
        self._blackholed.clear()

    async def __aenter__(self) -> FaultProxy:
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_listening()
        self.reset_all()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == "reset":
            self.resets += 1
            _reset(writer)
            return
        if self._mode == "blackhole":
            self._blackholed.append(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            _reset(writer)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link, to_client=False)),
            asyncio.create_task(self._pump(up_reader, writer, link, to_client=True)),
        ]

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        to_client: bool,
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                if self._mode == "slow":
                    await asyncio.sleep(self.delay)
                await self._flowing.wait()  # held while black-holed
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # With hold_eof the server's EOF is kept from the client until reset_all().
            if link in self._links and not (to_client and self.hold_eof):
                self._links.discard(link)
                for other in (link.client, link.upstream):
                    other.close()


class FaultSampler(ServerSampler):
    """``ServerSampler`` for faults: it reconnects when the server restarts under it (and
    samples nothing while it is down, when the server holds no backend either), and leaves
    out the backends in ``excluded``: those still authenticating when it starts (earlier
    tests' half-open connects, which wait out ``authentication_timeout``), and any a test adds.

    A backend the server was told to terminate lingers in ``pg_stat_activity`` a moment after
    its client saw the connection close and, within the cap, opened another: add its pid
    here before terminating it.
    """

    def __init__(self, superuser_dsn: str, role: str) -> None:
        super().__init__(superuser_dsn, role)
        self.excluded: set[int] = set()
        self._started = False

    async def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                await self._sample_once_connected()
            # InternalClientError: asyncpg on a connection the server killed (issue 14 item 6).
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
            ):
                self._ready.set()
                await asyncio.sleep(0.01)

    async def _sample_once_connected(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            query = await conn.prepare(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND pid <> pg_backend_pid() AND (usename = $1 OR usename IS NULL)"
                " AND pid <> ALL($2::int[])"
            )
            if not self._started:
                self._started = True
                self.excluded.update(
                    r["pid"]
                    for r in await conn.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
                        " AND usename IS NULL"
                    )
                )
            self._ready.set()
            while not self._stop.is_set():
                self.samples.append(await query.fetchval(self._role, list(self.excluded)))
                await asyncio.sleep(0.002)
        finally:
            conn.terminate()


async def server_until(condition: Callable[[], Awaitable[object]], limit: float = 30.0) -> None:
    """Poll an async ``condition`` (a query of the server's views) until it holds; fail after
    ``limit`` seconds. The server's state signals nothing a test could wait on."""
    with anyio.fail_after(limit):
        while not await condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)
