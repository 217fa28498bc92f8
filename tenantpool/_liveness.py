"""Whether a connection is still usable, told without a round trip; what a user gets if not.

When the server ends a backend (``pg_terminate_backend``, a shutdown, ``idle_session_timeout``)
it sends a FATAL ErrorResponse, then closes the socket. asyncpg reads the two apart: in between,
an idle connection has taken the FATAL (its protocol now waits for a ReadyForQuery that never
comes) but is not closed yet, and nothing in asyncpg's Python-visible state says so. Its next
query fails with ``InternalClientError: cannot switch to state ...; another operation (2) is in
progress``. A connection's bytes pass through a ``Watch`` on their way to asyncpg: it notes a
FATAL, and the pool hands out no connection that got one. Bytes the loop has not read yet need
no look: asyncpg reads them as the next query's error, which the scope turns into
``TenantUnavailable`` like any connection lost mid-scope.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from ._errors import TenantPoolError, TenantUnavailable

__all__ = ["LOST_RETRY_AFTER", "Watch", "lost", "usable", "watch"]

# An ErrorResponse's non-localized severity field (``V``, PostgreSQL 9.6+) with the NULs around
# it. A row that happens to hold these bytes costs a connection, closed at its next checkout.
_FATAL = b"\x00VFATAL\x00"
# The server sends nothing after a FATAL, and its field ``V`` comes second, a few bytes into
# the message: it lies within the message's length of the end of whichever read holds it. The
# look covers that much of each read (server messages of a FATAL run to a few hundred bytes),
# so a large result costs no more than a small one.
_TAIL = 2048

# The next checkout opens a connection of its own, or meets the target's backoff if the server
# is down: a short pause is enough.
LOST_RETRY_AFTER = 0.1


class Watch(asyncio.Protocol):
    """Stands between a connection's transport and asyncpg's protocol; notes a FATAL."""

    __slots__ = ("fatal", "protocol")

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.fatal = False

    def data_received(self, data: bytes) -> None:
        if data.find(_FATAL, -_TAIL) >= 0:
            self.fatal = True
        self.protocol.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self.protocol.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()


def watch(raw: asyncpg.Connection) -> None:
    """Put a ``Watch`` in front of a newly opened connection's protocol."""
    transport = raw._transport  # type: ignore[attr-defined]
    protocol = raw._protocol  # type: ignore[attr-defined]
    # Left alone when the transport does not hand bytes straight to asyncpg's protocol.
    if transport.get_protocol() is protocol:
        transport.set_protocol(Watch(protocol))


def usable(raw: asyncpg.Connection) -> bool:
    """Whether an idle connection can be handed out; one that took a FATAL is terminated."""
    if raw.is_closed():
        return False
    seen = raw._transport.get_protocol()  # type: ignore[attr-defined]
    if type(seen) is Watch and seen.fatal:
        raw.terminate()  # the server has ended the backend already
        return False
    return True


def lost(raw: asyncpg.Connection, tenant: str, exc: Exception) -> TenantUnavailable | None:
    """What to raise instead of ``exc``, a call's failure on a scope's connection, when it came
    of the connection being lost under the call; ``None`` when it did not."""
    if not raw.is_closed() or isinstance(exc, TenantPoolError):
        return None
    return TenantUnavailable(
        f"the connection of tenant {tenant!r} was lost mid-scope ({type(exc).__name__}: {exc});"
        " whether its last statement took effect is unknown",
        retry_after=LOST_RETRY_AFTER,
    )
