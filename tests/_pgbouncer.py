"""A real PgBouncer (the ``pgbouncer`` binary) in front of the test cluster.

It listens on a free loopback port and offers the cluster's ``postgres`` database twice: as
``postgres`` in transaction pooling, the mode that breaks session state, and as
``postgres_session`` in session pooling. Users must be known when it starts (its auth file holds
their passwords in plain text, which PgBouncer needs to log in to the server with SCRAM).

PgBouncer refuses to run as root; as root it runs as the ``postgres`` OS user, as the server does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from _postgres import PostgresCluster

from demo_api._local_postgres import SERVER_OS_USER, ensure_os_user, free_port

__all__ = ["PgBouncer", "PgBouncerMissing", "find_pgbouncer"]

SESSION_DATABASE = "postgres_session"


class PgBouncerMissing(RuntimeError):
    """No ``pgbouncer`` binary on this machine."""


def find_pgbouncer() -> str:
    for candidate in (os.environ.get("TENANTPOOL_PGBOUNCER"), shutil.which("pgbouncer")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    for candidate in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise PgBouncerMissing(
        "pgbouncer is not installed (Debian: apt-get install pgbouncer;"
        " or point TENANTPOOL_PGBOUNCER at the binary)"
    )


class PgBouncer:
    """One PgBouncer process; ``settings`` override its ``[pgbouncer]`` section."""

    def __init__(
        self,
        pg: PostgresCluster,
        users: Mapping[str, str],
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.pg = pg
        self.users = dict(users)
        self.settings = {
            "pool_mode": "transaction",
            "default_pool_size": "2",
            "max_client_conn": "2000",
            "auth_type": "scram-sha-256",
            **(settings or {}),
        }
        self.port = 0
        self.base_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def dsn(self, user: str, password: str, *, session: bool = False) -> str:
        database = SESSION_DATABASE if session else "postgres"
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> str:
        assert self.base_dir is not None
        with contextlib.suppress(OSError):
            return (self.base_dir / "pgbouncer.log").read_text(errors="replace")
        return ""

    def start(self, timeout: float = 30.0) -> PgBouncer:
        binary = find_pgbouncer()
        self.base_dir = Path(tempfile.mkdtemp(prefix="tenantpool-pgbouncer-"))
        self.port = free_port()
        server = f"host={self.pg.host} port={self.pg.port} dbname=postgres"
        ini = [
            "[databases]",
            f"postgres = {server}",
            f"{SESSION_DATABASE} = {server} pool_mode=session",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            f"auth_file = {self.base_dir / 'users.txt'}",
            f"logfile = {self.base_dir / 'pgbouncer.log'}",
            "ignore_startup_parameters = extra_float_digits",
            *(f"{key} = {value}" for key, value in self.settings.items()),
        ]
        (self.base_dir / "pgbouncer.ini").write_text("\n".join(ini) + "\n")
        (self.base_dir / "users.txt").write_text(
            "".join(f'"{user}" "{password}"\n' for user, password in self.users.items())
        )
        cmd = [binary, str(self.base_dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            user = ensure_os_user(SERVER_OS_USER)
            for path in (self.base_dir, *self.base_dir.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
            cmd = ["runuser", "-u", user.pw_name, "--", *cmd]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self._accepting():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = self.log
                self.stop()
                raise RuntimeError(f"pgbouncer did not start:\n{log[-2000:]}")
            time.sleep(0.05)
        return self

    def _accepting(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # The process group: under runuser, pgbouncer is runuser's child.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
