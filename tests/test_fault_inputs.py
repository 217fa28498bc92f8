"""Bad DSNs and hostile setting values: a clear error at once, no hang, no secret, no leak."""

from __future__ import annotations

import logging

import anyio
import pytest
from _postgres import PostgresCluster
from _support import drained

from tenantpool import PoolSettings, Target, TenantPoolError, TenantPoolManager, TenantUnavailable

pytestmark = pytest.mark.anyio

SECRET = "S3cret-pw-14"
FAST = PoolSettings(max_size=1, connect_timeout=2.0, acquire_timeout=3.0)


def bad_dsns(pg: PostgresCluster) -> dict[str, str]:
    """Bad DSNs by name; ``{s}`` stands for the password."""
    here = f"127.0.0.1:{pg.port}"
    return {
        "empty": "",
        "not a URL": "host=localhost user=x",
        "other scheme": "mysql://u:{s}@h/db",
        "bare scheme": "postgresql://",
        "port not a number": f"postgresql://u:{{s}}@127.0.0.1:{pg.port}x/db",
        "unresolvable host": "postgresql://u:{s}@no-such-host.invalid:5432/db",
        "not an address": "postgresql://u:{s}@256.256.256.256:5432/db",
        "refused port": "postgresql://u:{s}@127.0.0.1:1/db",
        "wrong password": f"postgresql://{pg.superuser}:{{s}}@{here}/postgres",
        "unknown user": f"postgresql://nobody_14:{{s}}@{here}/postgres",
        # The right password, to a database that does not exist: that password is the secret.
        "unknown database": pg.dsn(database="no_such_db_14"),
        "ssl the server refuses": f"postgresql://u:{{s}}@{here}/db?sslmode=require",
        "missing socket dir": "postgresql:///db?host=/nonexistent-14&password={s}",
        "NUL in password": "postgresql://u:{s}\x00x@127.0.0.1:1/db",
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "not a URL",
        "other scheme",
        "bare scheme",
        "port not a number",
        "unresolvable host",
        "not an address",
        "refused port",
        "wrong password",
        "unknown user",
        "unknown database",
        "ssl the server refuses",
        "missing socket dir",
        "NUL in password",
    ],
)
async def test_a_bad_dsn_is_refused_clearly_and_never_shows_its_password(
    pg: PostgresCluster, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = bad_dsns(pg)[case].replace("{s}", SECRET)
    secret = pg.superuser_password if case == "unknown database" else SECRET
    assert (secret and secret in dsn) or case in ("empty", "not a URL", "bare scheme")
    caplog.set_level(logging.DEBUG)
    try:
        target = Target(dsn)
    except ValueError as exc:  # refused where it is written
        assert secret not in str(exc)
        return
    assert secret not in repr(target)
    async with TenantPoolManager({"a": target}, pool=FAST) as manager:
        with anyio.fail_after(30):
            with pytest.raises(TenantUnavailable) as info:
                async with manager.with_connection("a"):
                    pass
        assert info.value.retry_after > 0
        await drained(manager)
        stats = manager.stats()
        assert stats.in_use == 0
        shown = f"{info.value!r} {info.value} {stats} {(await manager.health()).as_dict()}"
        assert secret not in shown
    assert secret not in caplog.text


# Values no setting should ever run as SQL, and the corners of the protocol: quotes,
# backslashes, dollar quotes, newlines, non-ASCII, and a value of 100 kB.
HOSTILE = [
    "'; DROP TABLE canary; --",
    "\\'; SELECT pg_sleep(100); --",
    "$$; SELECT 1; $$",
    "line\nbreak\r\tand tab",
    "ünïcödé ☃ 𝄞",
    '" OR "1"="1',
    "x" * 100_000,
]


@pytest.mark.parametrize("state_scope", ["session", "transaction"])
async def test_hostile_values_round_trip_exactly_and_bad_ones_fail_only_their_checkout(
    pg: PostgresCluster, state_scope: str
) -> None:
    dsn = pg.dsn()
    resolver = {f"h{i}": Target(dsn, settings={"app.value": v}) for i, v in enumerate(HOSTILE)}
    # A real setting given a value it rejects: the checkout fails with a clear error.
    resolver["bad"] = Target(dsn, settings={"work_mem": "'; DROP TABLE canary; --"})
    resolver["ok"] = Target(dsn, settings={"app.value": "fine"})
    pool = PoolSettings(max_size=1, acquire_timeout=10, state_scope=state_scope)
    async with TenantPoolManager(resolver, pool=pool) as manager:
        for i, value in enumerate(HOSTILE):
            async with manager.with_connection(f"h{i}") as conn:
                assert await conn.fetchval("SELECT current_setting('app.value')") == value
            with pytest.raises(TenantPoolError, match="work_mem"):
                async with manager.with_connection("bad"):
                    pass
            async with manager.with_connection("ok") as conn:
                assert await conn.fetchval("SELECT current_setting('app.value')") == "fine"
                assert await conn.fetchval("SHOW work_mem") == "4MB"
        await drained(manager)
        assert manager.stats().in_use == 0
