"""A connection the server has ended is closed at once; what a user gets if it was in use.

When the server ends a backend (``pg_terminate_backend``, a shutdown, ``idle_session_timeout``)
it sends a FATAL ErrorResponse, then closes the socket. asyncpg learns of the end only from the
socket's EOF: in between, an idle connection has taken the FATAL (its protocol now waits for a
ReadyForQuery that never comes) but is not closed, and its next query fails with
``InternalClientError: cannot switch to state ...; another operation (2) is in progress``. A
connection's bytes pass through a ``Watch`` on their way to asyncpg: a read that ends with a
FATAL ends the connection there, so asyncpg reports it closed, and the pool drops it as it drops
any closed connection, with no look of its own at checkout. Bytes the loop has not read yet
need no look either: asyncpg reads them as the next query's error.

A call that fails because its connection was lost raises ``TenantUnavailable``, asyncpg's error
chained (``raise_if_lost``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from ._errors import TenantPoolError, TenantUnavailable

__all__ = ["LOST_RETRY_AFTER", "Watch", "raise_if_lost", "watch"]

# An ErrorResponse's non-localized severity field (``V``, PostgreSQL 9.6+) with the NULs around
# it: the NUL ending field ``S``, the localized severity, which comes first.
_FATAL = b"\x00VFATAL\x00"
# The server sends nothing after a FATAL: it ends the read that brings it. The look covers the
# end of each read (a FATAL's message runs to a few hundred bytes), so a large result costs no
# more than a small one.
_TAIL = 2048
# Longest localized severity word looked back over for the message's start (UTF-8 bytes).
_SEVERITY = 48

# The next checkout opens a connection of its own, or meets the target's backoff if the server
# is down: a short pause is enough.
LOST_RETRY_AFTER = 0.1


class Watch(asyncio.Protocol):
    """Stands between a connection's transport and asyncpg's protocol; ends the connection
    when the server's FATAL arrives."""

    __slots__ = ("ended", "protocol", "transport")

    def __init__(self, protocol: Any, transport: asyncio.Transport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.ended = False

    def data_received(self, data: bytes) -> None:
        self.protocol.data_received(data)
        at = data.find(_FATAL, -_TAIL)
        if at >= 0 and _ends_with_error(data, at):
            # asyncpg has the server's error (a query it ended reports it); now the end.
            self.connection_lost(None)
            self.transport.abort()

    def eof_received(self) -> bool | None:
        result: bool | None = self.protocol.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended:  # once: ended on a FATAL, then again by the transport
            self.ended = True
            self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()


def _ends_with_error(data: bytes, at: int) -> bool:
    """Whether the severity field at ``at`` belongs to an ErrorResponse that ends ``data``:
    ``E``, its length, field ``S`` and its value, then ``at``. A row that merely holds the same
    bytes does not end a read with a message of the right length."""
    for start in range(at - 6, max(at - 6 - _SEVERITY, -1), -1):
        if (
            data[start] == 0x45  # E
            and data[start + 5] == 0x53  # S
            and int.from_bytes(data[start + 1 : start + 5], "big") == len(data) - start - 1
        ):
            return True
    return False


def watch(raw: asyncpg.Connection) -> None:
    """Put a ``Watch`` in front of a newly opened connection's protocol."""
    transport = raw._transport  # type: ignore[attr-defined]
    protocol = raw._protocol  # type: ignore[attr-defined]
    # Left alone when the transport does not hand bytes straight to asyncpg's protocol.
    if transport.get_protocol() is protocol:
        transport.set_protocol(Watch(protocol, transport))


def raise_if_lost(raw: asyncpg.Connection, tenant: str, exc: Exception) -> None:
    """Raise ``TenantUnavailable`` from ``exc``, a call's failure on a scope's connection, if
    it came of the connection being lost under the call; else return (the caller re-raises)."""
    if raw.is_closed() and not isinstance(exc, TenantPoolError):
        raise TenantUnavailable(
            f"the connection of tenant {tenant!r} was lost mid-scope"
            f" ({type(exc).__name__}: {exc}); whether its last statement took effect is unknown",
            retry_after=LOST_RETRY_AFTER,
        ) from exc
