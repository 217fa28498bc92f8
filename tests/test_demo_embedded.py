"""``python -m demo_api`` without ``DATABASE_URL``: its own PostgreSQL, kept in a data folder."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _demo import DemoProcess


@pytest.fixture
def data_folder() -> Iterator[Path]:
    # Not pytest's tmp_path: as root the server runs as the postgres OS user, who cannot
    # enter /tmp/pytest-of-root (mode 0700).
    base = Path(tempfile.mkdtemp(prefix="demo-embedded-"))
    base.chmod(0o755)
    try:
        yield base / "demo-data"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def processes_using(folder: Path) -> list[int]:
    """Processes whose command line names ``folder`` (the postmaster is started with -D)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if str(folder) in cmdline and "State:\tZ" not in status:
            found.append(int(entry.name))
    return found


def wait_until_gone(pid: int, folder: Path, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while processes_using(folder) or _alive(pid):
        assert time.monotonic() < deadline, f"left running: {processes_using(folder)}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def postmaster_pid(folder: Path) -> int:
    return int((folder / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[0])


def test_own_server_keeps_tenants_and_notes_and_stops_with_the_demo(data_folder: Path) -> None:
    env = {"DATABASE_URL": "", "DEMO_DATA_DIR": str(data_folder)}
    with DemoProcess(env) as first:
        url = first.base_url
        for tenant, isolation in (("acme", "rls"), ("hooli", "role")):
            created = httpx.post(
                f"{url}/tenants", json={"id": tenant, "isolation": isolation}, timeout=30
            )
            assert created.status_code == 201, created.text
            note = httpx.post(
                f"{url}/notes", headers={"X-Tenant-ID": tenant}, json={"body": f"{tenant}'s"}
            )
            assert note.status_code == 201, note.text
        server = postmaster_pid(data_folder)
        assert processes_using(data_folder)
        # A second demo on the folder is refused, and leaves the first one's server alone.
        intruder = DemoProcess(env)
        with pytest.raises(RuntimeError, match="another demo is running on"):
            intruder.start()
        assert httpx.get(f"{url}/notes", headers={"X-Tenant-ID": "acme"}).status_code == 200
        assert postmaster_pid(data_folder) == server
        assert first.stop(signal.SIGTERM) == 0, first.output
    wait_until_gone(server, data_folder)
    assert not (data_folder / "postgres" / "data" / "postmaster.pid").exists()

    credentials = data_folder / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    password = json.loads(credentials.read_text())["password"]

    with DemoProcess(env) as second:  # the same folder: the same cluster and credentials
        for tenant in ("acme", "hooli"):
            notes = httpx.get(f"{second.base_url}/notes", headers={"X-Tenant-ID": tenant})
            assert notes.status_code == 200, notes.text
            assert [n["body"] for n in notes.json()] == [f"{tenant}'s"]
        server = postmaster_pid(data_folder)
        assert second.stop(signal.SIGINT) == 0, second.output  # Ctrl-C
    wait_until_gone(server, data_folder)
    assert json.loads(credentials.read_text())["password"] == password
    for output in (first.output, second.output):
        assert password not in output
    assert "creating a PostgreSQL cluster" in first.output
    assert "creating a PostgreSQL cluster" not in second.output
