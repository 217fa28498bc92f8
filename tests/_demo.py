"""Helpers for the demo's tests: the demo as a real process, and a fresh place for it to live."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from _postgres import PostgresCluster, quote_ident, unique_name

from demo_api._local_postgres import free_port

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent


class DemoProcess:
    """``python -m demo_api`` on a free port, its output in a file; ``stop()`` sends SIGTERM."""

    def __init__(self, env: Mapping[str, str], *, cwd: Path | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._env = {
            **os.environ,
            # The child imports this checkout's tenantpool and demo_api, not an installed one.
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_LEVEL": "info",
            **env,
        }
        self._cwd = cwd
        self._out = tempfile.TemporaryFile("w+")
        self._final_output = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = 60.0) -> DemoProcess:
        """Start the demo and wait until ``/health`` answers 200."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "demo_api"],
            env=self._env,
            cwd=self._cwd or REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                output = self.output
                self.close()
                raise RuntimeError(f"the demo exited with {self.proc.returncode}:\n{output}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                output = self.output
                self.close()
                raise RuntimeError(f"the demo did not become healthy:\n{output}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def output(self) -> str:
        """Everything the demo wrote to stdout and stderr so far."""
        if self._out.closed:
            return self._final_output
        self._out.flush()
        self._out.seek(0)
        return self._out.read()

    def close(self) -> None:
        """Kill the demo if it still runs; keep its output, close the file."""
        self.kill()
        if not self._out.closed:
            self._final_output = self.output
            self._out.close()

    def __enter__(self) -> DemoProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            self.close()


class DemoDatabase:
    """A control database and an object-name prefix of its own on the test cluster.

    ``drop()`` removes the control database and everything the demo made under the prefix.
    """

    def __init__(self, pg: PostgresCluster) -> None:
        self.pg = pg
        self.prefix = "d" + secrets.token_hex(4)
        self.control_db = unique_name("demo_control")

    def create(self) -> DemoDatabase:
        self.pg.create_database_sync(self.control_db)
        return self

    @property
    def url(self) -> str:
        """The superuser's URL to the control database: the demo's ``DATABASE_URL``."""
        return self.pg.dsn(database=self.control_db)

    @property
    def env(self) -> dict[str, str]:
        return {"DATABASE_URL": self.url, "DEMO_PREFIX": self.prefix, "MAX_CONNECTIONS": "12"}

    async def drop(self) -> None:
        like = self.prefix.replace("_", "\\_") + "\\_%"
        for row in await self.pg.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", like
        ):
            await self.pg.drop_database(row["datname"])
        await self.pg.drop_database(self.control_db)
        for row in await self.pg.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", like):
            await self.pg.execute(f"DROP ROLE IF EXISTS {quote_ident(row['rolname'])}")

    async def secrets(self) -> list[str]:
        """Every password the demo generated (the app role's and the role tenants')."""
        rows = await self.pg.fetch(
            f"SELECT password FROM {quote_ident(self.prefix + '_control')}.secrets",
            database=self.control_db,
        )
        return [row["password"] for row in rows]


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh loop in a worker thread (from sync fixtures)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
