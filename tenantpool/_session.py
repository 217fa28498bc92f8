"""The SQL that makes a connection clean and gives it a tenant's session state.

Two paths, each one round trip:

* ``reset`` runs after a scope that used the connection, off the caller's path. It throws away
  everything user code could have left behind and re-applies the session state the connection
  carried, so the next checkout of the same tenant needs no round trip at all. It is a
  simple-query script, which cannot take bind parameters, so values reach it through
  :func:`quote_literal`; no raw input is ever interpolated.
* ``apply`` runs at checkout when an idle connection carries another tenant's state (or none):
  one parametrised ``set_config`` statement that resets the old settings and applies the new.

Per transaction (``state_scope="transaction"``) neither runs: ``begin`` opens each scope's
transaction with the state set transaction-locally, in one simple-query round trip, and the
scope's commit or rollback is all the cleaning there is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from asyncpg import connect_utils

from ._errors import TenantPoolError
from ._settings import SessionState

__all__ = [
    "GUARD",
    "PreparedStatementsLeft",
    "adopt_init_session",
    "apply_state",
    "baseline_of",
    "begin",
    "begin_script",
    "canceller",
    "drop_statement_caches",
    "forget_client_state",
    "guard_name",
    "quote_literal",
    "reset_script",
    "settle",
    "use_statement_cache",
]

logger = logging.getLogger("tenantpool")

# Order matters: SET SESSION AUTHORIZATION DEFAULT before RESET ROLE and RESET ALL, because
# ``role`` and ``session_authorization`` are exempt from RESET ALL; the tenant's settings come
# last, in the guard's SELECT (below), which also drops advisory locks. DISCARD TEMP /
# SEQUENCES instead of DISCARD ALL: DISCARD ALL also deallocates asyncpg's cached statements,
# and it cannot run in the implicit transaction of a multi-statement query.
_CLEAN = (
    "CLOSE ALL;"
    "UNLISTEN *;"
    "SET SESSION AUTHORIZATION DEFAULT;"
    "RESET ROLE;"
    "RESET ALL;"
    "DISCARD TEMP;"
    "DISCARD SEQUENCES;"
)
# Statements user code PREPAREd in SQL must go, asyncpg's own must stay. Deallocating them
# takes a DO block (~80 us of server time), so the usual script only checks: the guard divides
# by zero, failing the whole script, exactly when such a statement exists. The guard is the
# script's one SELECT: it also drops advisory locks and sets the session state (baseline and
# tenant settings), as parameters, so that its plan is made once per connection (planning
# costs more than running it) and the script runs one SELECT, not two (each costs about as
# much as all the utility statements together). There is one guard per number of settings,
# prepared on a connection when first needed, under names no user code picks by accident.
# User code that deallocates one (DEALLOCATE ALL, DISCARD ALL) has likely dropped asyncpg's
# statements too: the reset then fails and the connection, its state unknown, is closed.
GUARD = "tenantpool_guard_" + secrets.token_hex(6)
_DEALLOCATE_SQL_PREPARED = (
    "DO $tenantpool$DECLARE s record; BEGIN"
    " FOR s IN SELECT name FROM pg_catalog.pg_prepared_statements WHERE from_sql LOOP"
    " EXECUTE 'DEALLOCATE ' || pg_catalog.quote_ident(s.name); END LOOP; END$tenantpool$;"
)
# The reset script fails with one of these when the guard found statements to deallocate, or
# when a guard exists though the connection was thought not to have it (PREPARE outlives the
# rollback of a script that failed later on); the deallocating path then runs.
PreparedStatementsLeft = (asyncpg.DivisionByZeroError, asyncpg.DuplicatePreparedStatementError)


def guard_name(settings: int) -> str:
    """The name of the reset's guard for ``settings`` session settings (see ``GUARD``)."""
    return f"{GUARD}_{settings}"


def quote_literal(value: str) -> str:
    """Quote ``value`` as a string literal, safe whatever ``standard_conforming_strings`` is."""
    if "\x00" in value:
        raise ValueError("PostgreSQL strings cannot contain NUL characters")
    quoted = value.replace("'", "''")
    if "\\" in quoted:
        # E'' reads backslashes as escapes in every server configuration, so double them.
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


def _prepare_guard(settings: int) -> str:
    types = ", ".join(["text"] * (2 * settings))
    calls = "".join(
        f" pg_catalog.set_config(${2 * i + 1}, ${2 * i + 2}, false)," for i in range(settings)
    )
    return (
        f"PREPARE {guard_name(settings)}{f'({types})' if types else ''} AS SELECT"
        f" pg_catalog.pg_advisory_unlock_all(),{calls} 1 / (NOT EXISTS (SELECT FROM"
        " pg_catalog.pg_prepared_statements WHERE from_sql AND NOT"
        f" pg_catalog.starts_with(name, '{GUARD}')))::int;"
    )


def reset_script(
    state: SessionState | None,
    *,
    in_transaction: bool,
    guard_ready: bool,
    deallocate: bool,
    baseline: SessionState = (),
) -> str:
    """The script that cleans a connection and, if ``state`` is known, re-applies it.

    Without ``deallocate`` it raises ``PreparedStatementsLeft`` if user code left SQL-level
    prepared statements; run it again with ``deallocate=True`` then. Both leave the guard for
    this number of settings prepared (the script prepares it unless ``guard_ready``; the
    deallocating path drops every other guard). ``baseline`` (what the manager's ``init`` set,
    see ``adopt_init_session``) is restored after ``RESET ALL``, before ``state``.
    """
    return _script(baseline + state if state else baseline, in_transaction, guard_ready, deallocate)


# Cached: every dirty release of a tenant's connection needs the same text. Bounded, because
# a service may see far more tenants over time than it serves at once.
@functools.lru_cache(maxsize=4096)
def _script(settings: SessionState, in_transaction: bool, ready: bool, deallocate: bool) -> str:
    script = "ROLLBACK;" if in_transaction else ""
    if deallocate:
        script += _DEALLOCATE_SQL_PREPARED
    script += _CLEAN
    # Prepared and run after RESET ALL: its names resolve under the default search_path, never
    # under one the scope set, where an operator of the user's could neutralise the check
    # (pg_catalog's functions are qualified; its operators and casts are not). Run last, the
    # guard also keeps one plan: the search_path it runs under is the same every time.
    if deallocate or not ready:
        script += _prepare_guard(len(settings))
    args = ", ".join(f"{quote_literal(name)}, {quote_literal(value)}" for name, value in settings)
    return script + f"EXECUTE {guard_name(len(settings))}{f'({args})' if args else ''};"


@functools.cache  # keyed by the number of settings: a handful of entries
def _apply_sql(count: int) -> str:
    calls = ", ".join(
        f"pg_catalog.set_config(${2 * i + 1}, ${2 * i + 2}, false)" for i in range(count)
    )
    return f"SELECT {calls}"


async def apply_state(
    raw: asyncpg.Connection, old: SessionState, new: SessionState, *, budget: float
) -> None:
    """Move a clean connection from session state ``old`` to ``new`` in one round trip."""
    # set_config(name, NULL, false) is RESET name: back to the role's / database's default.
    # The select list runs left to right: the old role goes first, so that the new settings are
    # applied as the login user (as on a fresh connection) and the new role comes last.
    new_names = {name for name, _ in new}
    base = dict(_baselines.get(raw, ()))  # what init set: restored rather than RESET
    args: list[str | None] = []
    for name, _ in sorted(old, key=lambda pair: pair[0] != "role"):
        if name == "role" or name not in new_names:
            args += (name, base.get(name))
    for name, value in new:
        args += (name, value)
    if args:
        await raw.execute(_apply_sql(len(args) // 2), *args, timeout=budget)
        use_statement_cache(raw, new)


# What the manager's init left in each connection's session: the baseline every reset restores.
_baselines: weakref.WeakKeyDictionary[asyncpg.Connection, SessionState] = (
    weakref.WeakKeyDictionary()
)
# Built-in settings init set (source 'session'), then the role it switched to, applied last.
# Custom (dotted) settings are placeholders that pg_settings does not list: they are not kept.
_READ_BASELINE = (
    "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings"
    " WHERE source = 'session' AND name NOT IN ('role', 'session_authorization')"
    " UNION ALL SELECT 'role', current_user WHERE current_user <> session_user"
)


async def adopt_init_session(raw: asyncpg.Connection, *, budget: float) -> None:
    """After the manager's ``init`` ran on a new connection: keep what it set in the session.

    Every reset runs ``RESET ALL``; the settings ``init`` set (``SET statement_timeout``,
    ``SET default_transaction_read_only``, ``SET ROLE``...) are read once here and re-applied
    after it, so every checkout sees them, not just the first. A connection whose ``init``
    left a transaction open is refused: handed out, its scope's ``conn.transaction()`` would
    fail and its writes would be rolled back at release.
    """
    if raw.is_in_transaction():
        logger.warning(
            "tenantpool: init left a transaction open; the new connection is closed, not used"
        )
        raise TenantPoolError(
            "init left a transaction open (commit or roll it back inside init);"
            " the connection was closed"
        )
    rows = await raw.fetch(_READ_BASELINE, timeout=budget)
    if rows:
        _baselines[raw] = tuple((row[0], row[1]) for row in rows)


def baseline_of(raw: asyncpg.Connection) -> SessionState:
    """The session state ``init`` gave ``raw``, restored by every reset; ``()`` without one."""
    return _baselines.get(raw, ())


# Statement caches a connection keeps, one per search_path it served, most recent last.
_MAX_CACHES = 8
_caches: weakref.WeakKeyDictionary[asyncpg.Connection, dict[str | None, Any]] = (
    weakref.WeakKeyDictionary()
)


def use_statement_cache(raw: asyncpg.Connection, state: SessionState) -> None:
    """Give ``raw`` the statement cache of ``state``'s search_path, now the session's.

    asyncpg caches prepared statements by query text. The server re-plans one when the
    search_path changes, and refuses when the result's columns differ ("cached plan must not
    change result type": two tenant schemas whose tables differ, say mid-migration); asyncpg
    retries that outside a transaction, but inside one it fails. So each search_path gets a
    cache of its own, and a tenant never runs a statement prepared under another's schema.
    """
    path = None
    for name, value in state:
        if name == "search_path":
            path = value
    con: Any = raw
    caches = _caches.get(raw)
    if caches is None:
        if path is None or not con._stmt_cache.get_max_size():
            # Never left the default search_path, or no cache: the common case costs a lookup.
            return
        caches = _caches[raw] = {None: con._stmt_cache}
    if caches.get(path) is con._stmt_cache:
        return
    # The cache being left stays for when this search_path comes back.
    _watch(raw, con._stmt_cache)
    cache = caches.pop(path, None)
    if cache is None:
        current = con._stmt_cache
        cache = type(current)(
            loop=con._loop,
            max_size=current.get_max_size(),
            on_remove=None,
            max_lifetime=current.get_max_lifetime(),
        )
    _watch(raw, cache)
    caches[path] = cache  # most recent last
    con._stmt_cache = cache
    while len(caches) > _MAX_CACHES:
        oldest = next(iter(caches))
        caches.pop(oldest).clear()


def drop_statement_caches(raw: asyncpg.Connection) -> None:
    """Forget every statement asyncpg cached on ``raw``, of every search_path: each is prepared
    again on its next use (and closed on the server, which is harmless if already gone)."""
    con: Any = raw
    for cache in list(_caches.get(raw, {}).values()):
        cache.clear()
    con._stmt_cache.clear()


def canceller(raw: asyncpg.Connection) -> Callable[[float], Awaitable[None]]:
    """What cancels the query ``raw``'s backend runs, still usable once ``raw`` is terminated.

    Terminating the socket alone leaves the server running the query until it next writes.
    This sends the CancelRequest asyncpg sends when a query's task is cancelled, over a
    connection of its own; the backend's key is taken now, while ``raw`` still has it.
    """
    con: Any = raw
    protocol = con._protocol
    if protocol is None:
        return _nothing_to_cancel
    key = {
        "addr": con._addr,
        "params": con._params,
        "backend_pid": protocol.backend_pid,
        "backend_secret": protocol.backend_secret,
    }

    async def cancel(budget: float) -> None:
        # A server that does not answer in time, or refuses: nothing more can be done.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(budget):
                send: Any = connect_utils._cancel  # type: ignore[attr-defined]
                await send(loop=asyncio.get_running_loop(), **key)

    return cancel


async def _nothing_to_cancel(budget: float) -> None:
    return None


def _watch(raw: asyncpg.Connection, cache: Any) -> None:
    # A statement leaving a cache is closed on the server unless in use; asyncpg's own check
    # looks at the current cache only, which would keep one dropped from another forever.
    cache._on_remove = functools.partial(_statement_dropped, weakref.ref(raw), cache)


def _statement_dropped(ref: weakref.ref[asyncpg.Connection], cache: Any, stmt: Any) -> None:
    con: Any = ref()
    if con is None or stmt.refs or not stmt.name:
        return
    if not cache.has((stmt.query, stmt.record_class, stmt.ignore_custom_codec)):
        stmt.mark_closed()
        con._stmts_to_close.add(stmt)


def forget_client_state(raw: asyncpg.Connection) -> None:
    """Drop what a scope left in asyncpg's client-side connection state.

    asyncpg keeps listeners, query loggers and the open transaction on the Python object, and
    offers no public call to clear them without a round trip; its own pool clears the same
    attributes. Bumping ``_pool_release_ctr`` makes every prepared statement, cursor and
    transaction object created during the scope refuse further use.
    """
    con: Any = raw
    con._listeners.clear()
    con._log_listeners.clear()
    con._termination_listeners.clear()
    con._query_loggers.clear()
    con._top_xact = None
    con._pool_release_ctr += 1


async def settle(raw: asyncpg.Connection, *, budget: float) -> None:
    """Wait until a query cancelled mid-flight has been acknowledged by the server.

    Until then the transaction status asyncpg reports is stale. asyncpg's protocol does this
    wait before any new query too, but we must know the status before building the script.
    """
    protocol: Any = getattr(raw, "_protocol", None)
    if protocol is not None and protocol._is_cancelling():
        await protocol._wait_for_cancellation(budget)


# -- state_scope="transaction": the tenant's state lives and dies with the scope's transaction


@functools.lru_cache(maxsize=4096)
def begin_script(state: SessionState) -> str:
    """``BEGIN`` and ``state`` set transaction-locally: one simple-query round trip.

    Nothing in it outlives the transaction, so behind a transaction pooler no other client can
    find it on the server connection afterwards.
    """
    calls = ", ".join(
        f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, true)"
        for name, value in state
    )
    return f"BEGIN; SELECT {calls};" if calls else "BEGIN;"


async def begin(raw: asyncpg.Connection, state: SessionState, *, budget: float) -> None:
    """Open a scope's transaction on ``raw`` carrying ``state``."""
    await raw.execute(begin_script(state), timeout=budget)
    use_statement_cache(raw, state)  # when the user turned asyncpg's cache back on
    # asyncpg's transaction() refuses to start inside a transaction it did not open itself;
    # told one is open, it nests as a savepoint, which is what user code inside a scope means.
    # The scope's release (forget_client_state) clears it again.
    con: Any = raw
    con._top_xact = raw.transaction()
