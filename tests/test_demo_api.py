"""The demo over HTTP, as a real process (``python -m demo_api``) against the test cluster."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import select
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from _demo import REPO_ROOT, DemoDatabase, DemoProcess, run_sync
from _postgres import PostgresCluster, quote_ident

from demo_api._local_postgres import free_port
from demo_api._registry import ISOLATIONS

pytestmark = pytest.mark.anyio

README = REPO_ROOT / "README.md"


@pytest.fixture(scope="module")
def demo_db(pg: PostgresCluster) -> Iterator[DemoDatabase]:
    db = DemoDatabase(pg).create()
    try:
        yield db
    finally:
        run_sync(db.drop())


@pytest.fixture(scope="module")
def demo(demo_db: DemoDatabase) -> Iterator[DemoProcess]:
    with DemoProcess(demo_db.env) as proc:
        yield proc
    assert proc.returncode == 0, proc.output


@pytest.fixture
async def client(demo: DemoProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=demo.base_url, timeout=30) as client:
        yield client


def new_id(label: str) -> str:
    return f"{label}-{secrets.token_hex(3)}"


async def create_tenant(client: httpx.AsyncClient, tenant: str, isolation: str) -> None:
    response = await client.post("/tenants", json={"id": tenant, "isolation": isolation})
    assert response.status_code == 201, response.text


# -- the four models -------------------------------------------------------------------------


async def test_four_models_concurrent_writes_each_tenant_sees_exactly_its_own_notes(
    client: httpx.AsyncClient,
) -> None:
    # Two tenants per model: rls and schema tenants share the app role's pool, so a shared
    # connection carries one tenant's state, then another's.
    tenants = {new_id(f"{iso}-{n}"): iso for iso in ISOLATIONS for n in (1, 2)}
    await asyncio.gather(*(create_tenant(client, t, iso) for t, iso in tenants.items()))

    per_tenant = 10

    async def post(tenant: str, n: int) -> dict[str, Any]:
        response = await client.post(
            "/notes", headers={"X-Tenant-ID": tenant}, json={"body": f"{tenant} note {n}"}
        )
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    created = await asyncio.gather(
        *(post(t, n) for n in range(per_tenant) for t in tenants)  # interleaved tenants
    )
    for note in created:
        assert note["tenant"] in tenants
        assert note["body"].startswith(note["tenant"] + " note ")
        assert isinstance(note["id"], int)

    for tenant in tenants:
        response = await client.get("/notes", headers={"X-Tenant-ID": tenant})
        assert response.status_code == 200
        notes = response.json()
        assert sorted(n["body"] for n in notes) == sorted(
            f"{tenant} note {n}" for n in range(per_tenant)
        )
        assert {n["tenant"] for n in notes} == {tenant}
        assert [n["id"] for n in notes] == sorted(n["id"] for n in notes)

    # One pool for all rls and schema tenants, one each for the others.
    pools: dict[str, set[str]] = {}
    for tenant, isolation in tenants.items():
        detail = (await client.get(f"/tenants/{tenant}")).json()
        assert detail["id"] == tenant
        assert detail["isolation"] == isolation
        assert detail["pool"] is not None and detail["pool"]["name"] == detail["target"]["pool"]
        pools.setdefault(detail["target"]["pool"], set()).add(isolation)
    assert sorted(map(sorted, pools.values())) == sorted(
        [["rls", "schema"], ["database"], ["database"], ["role"], ["role"]]
    )


async def test_each_model_creates_what_it_claims(
    client: httpx.AsyncClient, pg: PostgresCluster, demo_db: DemoDatabase
) -> None:
    prefix, db = demo_db.prefix, demo_db.control_db
    tenants = {iso: new_id(f"Claim-{iso}") for iso in ISOLATIONS}
    for isolation, tenant in tenants.items():
        await create_tenant(client, tenant, isolation)
        response = await client.post(
            "/notes", headers={"X-Tenant-ID": tenant}, json={"body": "mine"}
        )
        assert response.status_code == 201

    def name(tenant: str) -> str:
        return f"{prefix}_t_{tenant.lower().replace('-', '_')}"

    # The app role can be subject to row-level security; the tables force it.
    app = await pg.fetch(
        "SELECT rolsuper, rolbypassrls, rolcreatedb, rolcreaterole FROM pg_roles"
        " WHERE rolname = $1",
        f"{prefix}_app",
    )
    assert [tuple(r) for r in app] == [(False, False, False, False)]
    forced = await pg.fetch(
        "SELECT n.nspname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = 'notes' AND n.nspname IN ($1, $2)",
        f"{prefix}_rls",
        f"{prefix}_role",
        database=db,
    )
    assert sorted(tuple(r) for r in forced) == [
        (f"{prefix}_rls", True, True),
        (f"{prefix}_role", True, True),
    ]
    policies = {
        r["schemaname"]: r["qual"]
        for r in await pg.fetch(
            "SELECT schemaname, qual FROM pg_policies WHERE schemaname IN ($1, $2)",
            f"{prefix}_rls",
            f"{prefix}_role",
            database=db,
        )
    }
    assert "current_setting('app.tenant_id'" in policies[f"{prefix}_rls"]
    assert "CURRENT_USER" in policies[f"{prefix}_role"]

    # rls: a row tagged with the tenant id in the shared table, no objects of its own.
    rows = await pg.fetch(
        f"SELECT tenant_id, body FROM {quote_ident(prefix + '_rls')}.notes WHERE tenant_id = $1",
        tenants["rls"],
        database=db,
    )
    assert [tuple(r) for r in rows] == [(tenants["rls"], "mine")]
    # schema: a schema of its own holding its notes.
    schema = name(tenants["schema"])
    assert await pg.fetchval(f"SELECT body FROM {quote_ident(schema)}.notes", database=db) == "mine"
    # database: a database of its own, which only the app role (and the owner) may enter.
    database = name(tenants["database"])
    assert await pg.fetchval("SELECT body FROM notes", database=database) == "mine"
    may_connect = await pg.fetch(
        "SELECT coalesce(pg_get_userbyid(nullif(a.grantee, 0)), 'PUBLIC') AS grantee"
        " FROM pg_database d, aclexplode(d.datacl) a"
        " WHERE d.datname = $1 AND a.privilege_type = 'CONNECT'",
        database,
    )
    assert sorted(r["grantee"] for r in may_connect) == sorted([pg.superuser, f"{prefix}_app"])
    # role: a login role of its own, owning its rows in the shared table.
    role = name(tenants["role"])
    attrs = await pg.fetch(
        "SELECT rolcanlogin, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1", role
    )
    assert [tuple(r) for r in attrs] == [(True, False, False)]
    rows = await pg.fetch(
        f"SELECT owner, body FROM {quote_ident(prefix + '_role')}.notes WHERE owner = $1",
        role,
        database=db,
    )
    assert [tuple(r) for r in rows] == [(role, "mine")]


async def test_role_model_holds_against_injected_sql(
    client: httpx.AsyncClient, pg: PostgresCluster, demo_db: DemoDatabase
) -> None:
    """A role tenant's own login cannot be talked out of its identity by SQL it runs."""
    mine, other = new_id("inj-a"), new_id("inj-b")
    for tenant in (mine, other):
        await create_tenant(client, tenant, "role")
        await client.post("/notes", headers={"X-Tenant-ID": tenant}, json={"body": tenant})
    prefix = demo_db.prefix
    role = f"{prefix}_t_{mine.replace('-', '_')}"
    password = await pg.fetchval(
        f"SELECT password FROM {quote_ident(prefix + '_control')}.secrets WHERE role = $1",
        role,
        database=demo_db.control_db,
    )
    conn = await asyncpg.connect(pg.dsn(role, password, demo_db.control_db))
    try:
        # What an injection would try: drop any role, pretend to be another tenant.
        await conn.execute("RESET ROLE; SET SESSION AUTHORIZATION DEFAULT")
        await conn.execute("SELECT set_config('app.tenant_id', $1, false)", other)
        rows = await conn.fetch(f"SELECT owner, body FROM {quote_ident(prefix + '_role')}.notes")
        assert [tuple(r) for r in rows] == [(role, mine)]
        for forbidden in (
            f"SELECT * FROM {quote_ident(prefix + '_control')}.secrets",
            f"SELECT * FROM {quote_ident(prefix + '_rls')}.notes",
            f"SET ROLE {quote_ident(prefix + '_app')}",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(forbidden)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                f"INSERT INTO {quote_ident(prefix + '_role')}.notes (owner, body)"
                " VALUES ($1, 'forged')",
                f"{prefix}_t_{other.replace('-', '_')}",
            )
    finally:
        await conn.close()


async def test_two_concurrent_posts_of_one_id_one_201_one_409(client: httpx.AsyncClient) -> None:
    for isolation in ISOLATIONS:
        tenant = new_id(f"twice-{isolation}")
        responses = await asyncio.gather(
            *(
                client.post("/tenants", json={"id": tenant, "isolation": isolation})
                for _ in range(3)
            )
        )
        assert sorted(r.status_code for r in responses) == [201, 409, 409], isolation
        for response in responses:
            if response.status_code == 409:
                assert response.json() == {"detail": f"tenant {tenant!r} already exists"}
        # Usable afterwards: the losers did not undo the winner's objects.
        response = await client.post(
            "/notes", headers={"X-Tenant-ID": tenant}, json={"body": "after the race"}
        )
        assert response.status_code == 201, response.text


async def test_ids_differing_only_by_case_or_dash_are_refused(client: httpx.AsyncClient) -> None:
    base = f"case_{secrets.token_hex(3)}"
    await create_tenant(client, base, "schema")
    for clash in (base.upper(), base.replace("_", "-"), base.capitalize()):
        response = await client.post("/tenants", json={"id": clash, "isolation": "rls"})
        assert response.status_code == 409
        assert base in response.json()["detail"]


# -- bad requests -------------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        # POST /tenants: a bad id or isolation is a 400, any other shape problem a 422
        ("POST", "/tenants", JSON, {"id": "bad id", "isolation": "rls"}, 400),
        ("POST", "/tenants", JSON, {"id": "-dash-first", "isolation": "rls"}, 400),
        ("POST", "/tenants", JSON, {"id": "x" * 64, "isolation": "rls"}, 400),
        ("POST", "/tenants", JSON, {"id": "trailing\n", "isolation": "rls"}, 400),
        ("POST", "/tenants", JSON, {"id": "", "isolation": "rls"}, 400),
        ("POST", "/tenants", JSON, {"id": 5, "isolation": "rls"}, 400),
        ("POST", "/tenants", JSON, {"isolation": "rls"}, 400),
        ("POST", "/tenants", JSON, {"id": "fine", "isolation": "sharded"}, 400),
        ("POST", "/tenants", JSON, {"id": "fine", "isolation": "RLS"}, 400),
        ("POST", "/tenants", JSON, {"id": "fine"}, 400),
        ("POST", "/tenants", JSON, {"id": "bad id", "isolation": "sharded"}, 400),
        ("POST", "/tenants", JSON, {"id": "fine", "isolation": "rls", "extra": 1}, 422),
        ("POST", "/tenants", JSON, [1, 2], 422),
        ("POST", "/tenants", JSON, "not json", 422),
        # the tenant header
        ("GET", "/notes", {}, None, 400),
        ("POST", "/notes", JSON, {"body": "x"}, 400),
        ("GET", "/notes", {"X-Tenant-ID": "bad id!"}, None, 400),
        ("GET", "/notes", {"X-Tenant-ID": ""}, None, 400),
        ("POST", "/notes", {**JSON, "X-Tenant-ID": "x" * 64}, {"body": "x"}, 400),
        ("GET", "/notes", {"X-Tenant-ID": "nobody-here"}, None, 404),
        ("POST", "/notes", {**JSON, "X-Tenant-ID": "nobody-here"}, {"body": "x"}, 404),
        ("GET", "/tenants/nobody-here", {}, None, 404),
        ("GET", "/tenants/bad%20id", {}, None, 400),
        # note bodies
        ("POST", "/notes", {**JSON, "X-Tenant-ID": "{known}"}, {"body": ""}, 422),
        ("POST", "/notes", {**JSON, "X-Tenant-ID": "{known}"}, {}, 422),
        ("POST", "/notes", {**JSON, "X-Tenant-ID": "{known}"}, {"body": 5}, 422),
        # no such route or method
        ("GET", "/nothing-here", {}, None, 404),
        ("DELETE", "/notes", {}, None, 405),
    ],
)
async def test_bad_requests_get_json_errors(
    client: httpx.AsyncClient,
    known_tenant: str,
    method: str,
    path: str,
    headers: dict[str, str],
    body: object,
    status: int,
) -> None:
    headers = {k: v.replace("{known}", known_tenant) for k, v in headers.items()}
    content = None
    if body is not None:
        content = body if isinstance(body, str) else json.dumps(body)
    response = await client.request(method, path, headers=headers, content=content)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "detail" in response.json()


async def test_note_bodies_postgresql_cannot_store_are_422s(
    client: httpx.AsyncClient, known_tenant: str
) -> None:
    headers = {**JSON, "X-Tenant-ID": known_tenant}
    # Valid JSON that text columns refuse: a NUL, and a lone surrogate.
    for raw, reason in ((r'{"body": "a\u0000b"}', "NUL"), (r'{"body": "a\ud800b"}', "unicode")):
        response = await client.post("/notes", headers=headers, content=raw)
        assert response.status_code == 422, response.text
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "body"]
        assert reason in error["msg"]
    assert (await client.get("/notes", headers=headers)).status_code == 200


async def test_a_body_failing_validation_checks_out_no_connection(
    client: httpx.AsyncClient, known_tenant: str
) -> None:
    headers = {**JSON, "X-Tenant-ID": known_tenant}
    ok = await client.post("/notes", headers=headers, json={"body": "warm"})
    assert ok.status_code == 201
    before = (await client.get("/api/stats")).json()["checkouts"]
    for body in ({"body": ""}, {}, {"body": 5}, {"body": "x" * 10_001}, {"body": "a\u0000"}):
        response = await client.post("/notes", headers=headers, json=body)
        assert response.status_code == 422, response.text
    assert (await client.get("/api/stats")).json()["checkouts"] == before
    ok = await client.post("/notes", headers=headers, json={"body": "counted"})
    assert (await client.get("/api/stats")).json()["checkouts"] == before + 1


async def test_the_tenant_header_given_twice_is_a_400_saying_so(
    client: httpx.AsyncClient, known_tenant: str
) -> None:
    headers = [("X-Tenant-ID", known_tenant), ("X-Tenant-ID", known_tenant)]
    response = await client.get("/notes", headers=headers)
    assert response.status_code == 400
    assert response.json() == {"detail": "the X-Tenant-ID header is given 2 times; send it once"}


def raw_request(demo: DemoProcess, head: str, body: Iterator[bytes]) -> tuple[bytes, int]:
    """Send ``head`` then ``body``'s chunks until the server answers; (the answer, bytes sent).

    A raw socket, because a client such as httpx insists on sending the whole body first.
    """
    sent = 0
    with socket.create_connection(("127.0.0.1", demo.port), timeout=30) as sock:
        sock.sendall(head.encode())
        for chunk in body:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < 100_000:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
    return answer, sent


TWENTY_MB = 20 * 1024 * 1024


def test_a_20_mb_body_is_refused_with_413_unread(demo: DemoProcess, known_tenant: str) -> None:
    post = f"POST /notes HTTP/1.1\r\nHost: x\r\nX-Tenant-ID: {known_tenant}\r\n"
    post += "Content-Type: application/json\r\nConnection: close\r\n"
    chunk = b"x" * 65536
    # Declared: refused before any of it is read.
    answer, _ = raw_request(
        demo, post + f"Content-Length: {TWENTY_MB}\r\n\r\n", iter([b'{"body": "'])
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert json.loads(body) == {"detail": "request body larger than 262144 bytes"}
    # Chunked, no length given: refused once past the limit, long before the 20 MB are sent.
    chunks = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(TWENTY_MB // len(chunk)))
    answer, sent = raw_request(demo, post + "Transfer-Encoding: chunked\r\n\r\n", chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert len(answer) < 1000  # not echoed
    assert sent < TWENTY_MB


async def test_get_tenants_lists_every_tenant_with_its_model_and_pool(
    client: httpx.AsyncClient,
) -> None:
    mine = {new_id(f"list-{iso}"): iso for iso in ISOLATIONS}
    for tenant, isolation in mine.items():
        await create_tenant(client, tenant, isolation)
    response = await client.get("/tenants")
    assert response.status_code == 200
    listed = {t["id"]: t for t in response.json()}
    for tenant, isolation in mine.items():
        item = listed[tenant]
        assert item["isolation"] == isolation
        detail = (await client.get(f"/tenants/{tenant}")).json()
        assert item["pool"] == detail["target"]["pool"]
        assert item["created_at"] == detail["created_at"]
    created = [t["created_at"] for t in response.json()]
    assert created == sorted(created)


@pytest.fixture(scope="module")
def known_tenant(demo: DemoProcess) -> str:
    tenant = new_id("known")
    response = httpx.post(
        f"{demo.base_url}/tenants", json={"id": tenant, "isolation": "rls"}, timeout=30
    )
    assert response.status_code == 201
    return tenant


async def test_existing_id_is_409(client: httpx.AsyncClient, known_tenant: str) -> None:
    for isolation in ISOLATIONS:
        response = await client.post("/tenants", json={"id": known_tenant, "isolation": isolation})
        assert response.status_code == 409
        assert response.json() == {"detail": f"tenant {known_tenant!r} already exists"}


# -- observability ----------------------------------------------------------------------------


async def test_health_metrics_stats_and_tenant_details(
    client: httpx.AsyncClient, known_tenant: str
) -> None:
    await client.post("/notes", headers={"X-Tenant-ID": known_tenant}, json={"body": "x"})
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] in ("ok", "degraded")

    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert re.search(r"^tenantpool_max_connections 12(\.0)?$", metrics.text, re.M)
    assert re.search(r'^tenantpool_connections\{state="idle"\} \d+(\.0)?$', metrics.text, re.M)
    assert re.search(r"^tenantpool_checkouts_total [1-9]\d*(\.0)?$", metrics.text, re.M)

    stats = (await client.get("/api/stats")).json()
    assert stats["cap"] == 12
    assert stats["status"] == health.json()["status"]
    assert stats["total"] == sum(p["size"] for p in stats["pools"]) <= 12
    assert stats["in_use"] + stats["idle"] <= stats["total"]

    detail = (await client.get(f"/tenants/{known_tenant}")).json()
    assert detail["isolation"] == "rls"
    assert detail["target"]["settings"] == {"app.tenant_id": known_tenant}
    assert detail["target"]["pool"] in {p["name"] for p in stats["pools"]}


async def test_no_password_in_any_response(
    client: httpx.AsyncClient, demo_db: DemoDatabase, pg: PostgresCluster
) -> None:
    tenant = new_id("secretive")
    await create_tenant(client, tenant, "role")
    await client.post("/notes", headers={"X-Tenant-ID": tenant}, json={"body": "x"})
    passwords = [*await demo_db.secrets(), pg.superuser_password]
    assert len(passwords) >= 3
    bodies = [
        (await client.get(path)).text
        for path in ("/", "/api/stats", "/health", "/metrics", f"/tenants/{tenant}")
    ]
    bodies.append((await client.get("/notes", headers={"X-Tenant-ID": tenant})).text)
    for body in bodies:
        for password in passwords:
            assert password not in body


# -- the README's curl lines --------------------------------------------------------------------


def readme_commands() -> list[tuple[str, str | None]]:
    """Each ``curl`` line of the README, with the ``# -> ...`` line that follows it."""
    lines = README.read_text().splitlines()
    found: list[tuple[str, str | None]] = []
    for i, line in enumerate(lines):
        if line.startswith("curl "):
            following = lines[i + 1] if i + 1 < len(lines) else ""
            expected = following[len("# -> ") :] if following.startswith("# -> ") else None
            found.append((line, expected))
    return found


def replay(line: str, base_url: str) -> httpx.Response:
    """Do what ``curl`` would for ``line`` (the flags the README uses, nothing else)."""
    args = shlex.split(line)
    assert args[0] == "curl"
    method, headers, data, url = None, {}, None, None
    it = iter(args[1:])
    for arg in it:
        if arg == "-s":
            continue
        if arg == "-X":
            method = next(it)
        elif arg == "-H":
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            data = next(it)
        elif not arg.startswith("-") and url is None:
            url = arg
        else:
            raise AssertionError(f"the test does not know curl's {arg!r}: teach replay()")
    assert url is not None and url.startswith("localhost:8000/")
    if method is None:
        method = "POST" if data is not None else "GET"
    url = base_url + url[len("localhost:8000") :]
    return httpx.request(method, url, headers=headers, content=data, timeout=30)


def matches(actual: object, expected: object) -> bool:
    """``expected`` as in the README: ``"..."`` stands for any value."""
    if expected == "...":
        return True
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and actual.keys() == expected.keys()
            and all(matches(actual[k], v) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(matches(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return actual == expected


def test_readme_curl_lines_work(pg: PostgresCluster) -> None:
    """The README's commands, replayed against a fresh demo: same requests, same answers."""
    commands = readme_commands()
    assert len(commands) >= 3
    assert all(expected is not None for _, expected in commands)
    db = DemoDatabase(pg).create()
    try:
        with DemoProcess(db.env) as demo:
            for line, expected in commands:
                response = replay(line, demo.base_url)
                assert expected is not None
                # "# -> 422 {...}": an error, and its status; else a success.
                status, _, body = expected.partition(" ")
                if status.isdigit():
                    assert response.status_code == int(status), (line, response.text)
                    expected = body
                else:
                    assert response.status_code < 300, (line, response.text)
                assert matches(response.json(), json.loads(expected)), (line, response.text)
    finally:
        run_sync(db.drop())


# -- failing to start -------------------------------------------------------------------------


def test_bad_settings_or_an_unreachable_server_end_the_demo_with_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"exited with 2:\ndemo_api: PORT must be an integer"):
        DemoProcess({"PORT": "eighty"}).start()
    url = f"postgresql://someone:hunter2-secret@127.0.0.1:{free_port()}/db"
    with pytest.raises(RuntimeError, match=r"exited with [13]:") as failed:
        DemoProcess({"DATABASE_URL": url}).start()
    assert "Application startup failed" in str(failed.value)
    assert "hunter2-secret" not in str(failed.value)


# -- restart ------------------------------------------------------------------------------------


def test_restart_keeps_tenants_and_notes_and_logs_no_secret(pg: PostgresCluster) -> None:
    db = DemoDatabase(pg).create()
    tenants = {new_id(iso): iso for iso in ISOLATIONS}
    try:
        with DemoProcess(db.env) as first:
            for tenant, isolation in tenants.items():
                url = first.base_url
                created = httpx.post(
                    f"{url}/tenants", json={"id": tenant, "isolation": isolation}, timeout=30
                )
                assert created.status_code == 201
                note = httpx.post(
                    f"{url}/notes", headers={"X-Tenant-ID": tenant}, json={"body": "kept"}
                )
                assert note.status_code == 201
        assert first.returncode == 0, first.output

        with DemoProcess(db.env) as second:
            for tenant in tenants:
                url = second.base_url
                notes = httpx.get(f"{url}/notes", headers={"X-Tenant-ID": tenant}).json()
                assert [(n["body"], n["tenant"]) for n in notes] == [("kept", tenant)]
                more = httpx.post(
                    f"{url}/notes", headers={"X-Tenant-ID": tenant}, json={"body": "more"}
                )
                assert more.status_code == 201
            again = httpx.post(
                f"{url}/tenants", json={"id": next(iter(tenants)), "isolation": "rls"}
            )
            assert again.status_code == 409
        assert second.returncode == 0, second.output

        passwords = [*run_sync(db.secrets()), pg.superuser_password]
        assert len(passwords) == 2 + 1  # the app role, the role tenant, the superuser
        for output in (first.output, second.output):
            assert "tenant" in output  # the log is there, and says things
            for password in passwords:
                assert password not in output
    finally:
        run_sync(db.drop())


# -- the dashboard in a real browser ---------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="demo-chromium-") as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (on Debian: apt-get install chromium)"
)
def test_dashboard_shows_live_figures_in_chromium(demo: DemoProcess, known_tenant: str) -> None:
    httpx.post(f"{demo.base_url}/notes", headers={"X-Tenant-ID": known_tenant}, json={"body": "x"})
    # The sparklines draw the server's samples, one a second: wait for two.
    deadline = time.monotonic() + 60
    while len(httpx.get(f"{demo.base_url}/api/stats").json()["history"]) < 2:
        assert time.monotonic() < deadline, "no samples of the rates"
        time.sleep(0.1)
    stats = httpx.get(f"{demo.base_url}/api/stats").json()
    tenants = httpx.get(f"{demo.base_url}/tenants").json()
    assert stats["pools"] and tenants
    # The page's script runs within the virtual time budget, before the DOM is dumped.
    result = chromium("--virtual-time-budget=3000", "--dump-dom", f"{demo.base_url}/")
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'data-loaded="true"' in dom, dom[-2000:]
    assert f'<div class="value" id="cap">{stats["cap"]}</div>' in dom
    assert re.search(r'<span id="status" class="badge (ok|degraded)">(ok|degraded)</span>', dom)
    for pool in stats["pools"]:
        row = re.search(rf'<tr data-pool="{re.escape(pool["name"])}">(.*?)</tr>', dom)
        assert row is not None, pool["name"]
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
        assert cells[0] == pool["name"]
        # Its size may have moved since (a reset, an idle close): the shape, and the maximum.
        assert re.fullmatch(rf"\d+ / {pool['max_size']}", cells[5]), cells[5]
        serving = [t for t in tenants if t["pool"] == pool["name"]]
        for isolation in {t["isolation"] for t in serving}:
            assert f'<span class="iso {isolation}">{isolation}</span>' in cells[1]
        assert cells[1].endswith(f"{len(serving)} tenant" + ("" if len(serving) == 1 else "s"))
    # Every tenant, with its isolation model and pool.
    assert f'<span id="tenant-count">{len(tenants)}</span>' in dom
    row = re.search(rf'<tr data-tenant="{re.escape(known_tenant)}">(.*?)</tr>', dom)
    assert row is not None
    known = next(t for t in tenants if t["id"] == known_tenant)
    assert row.group(1) == (
        f'<td class="name">{known_tenant}</td><td><span class="iso rls">rls</span></td>'
        f'<td class="name">{known["pool"]}</td>'
    )
    # The last minute, drawn: a point per sample, and the current rate.
    points = re.search(r'<polyline id="rate-line" points="([^"]*)"', dom)
    assert points is not None and len(points.group(1).split()) >= 2
    assert re.search(r'<div class="value" id="rate">\d+</div>', dom)
    assert re.search(r'<span id="checkouts">[1-9]\d*</span>', dom)

    with tempfile.TemporaryDirectory() as out:
        shot = Path(out) / "dashboard.png"
        result = chromium(
            "--virtual-time-budget=3000",
            f"--screenshot={shot}",
            "--window-size=1100,640",
            f"{demo.base_url}/",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
