"""Tenant ids are validated before any lookup; mappings, sync and async resolvers all work."""

from __future__ import annotations

import pytest

from tenantpool import (
    InvalidTenant,
    ManagerClosed,
    Target,
    TenantPoolError,
    TenantPoolManager,
    UnknownTenant,
    validate_tenant_id,
)
from tenantpool._tenant import TenantResolver

pytestmark = pytest.mark.anyio

TARGET = Target("postgresql://x@127.0.0.1:1/app")


@pytest.mark.parametrize("tenant", ["a", "A", "0", "acme", "acme-1_x", "a" * 63, "9-_"])
def test_valid_tenant_ids_pass(tenant: str) -> None:
    assert validate_tenant_id(tenant) == tenant


@pytest.mark.parametrize(
    "tenant",
    [
        "",
        "-acme",
        "_acme",
        "a" * 64,
        "acme\n",
        "ac me",
        "acme;",
        "a.b",
        "acmé",
        "a/b",
        "a\x00",
        7,
        None,
        b"acme",
    ],
)
def test_invalid_tenant_ids_raise_invalid_tenant(tenant: object) -> None:
    with pytest.raises(InvalidTenant) as info:
        validate_tenant_id(tenant)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TenantPoolError)


async def test_invalid_tenant_is_rejected_before_the_resolver_runs() -> None:
    calls: list[str] = []

    def resolver(tenant: str) -> Target | None:
        calls.append(tenant)
        return TARGET

    async with TenantPoolManager(resolver) as manager:
        for bad in ["", "x" * 64, "acme'; DROP TABLE t; --", "acme\n"]:
            with pytest.raises(InvalidTenant):
                async with manager.with_connection(bad):
                    pass
            with pytest.raises(InvalidTenant):
                await manager.resolve(bad)
    assert calls == []


async def test_mapping_sync_and_async_resolvers() -> None:
    mapping = {"acme": TARGET}

    def sync(tenant: str) -> Target | None:
        return mapping.get(tenant)

    async def async_(tenant: str) -> Target | None:
        return mapping.get(tenant)

    for source in (mapping, sync, async_):
        resolver = TenantResolver(source)
        assert await resolver.resolve("acme") is TARGET
        with pytest.raises(UnknownTenant) as info:
            await resolver.resolve("globex")
        assert isinstance(info.value, LookupError)
        assert "globex" in str(info.value)


async def test_resolver_returning_a_wrong_type_is_a_clear_type_error() -> None:
    resolver = TenantResolver(lambda tenant: "postgresql://x@db/app")
    with pytest.raises(TypeError, match="expected a Target"):
        await resolver.resolve("acme")


def test_resolver_must_be_mapping_or_callable() -> None:
    with pytest.raises(TypeError):
        TenantResolver(42)  # type: ignore[arg-type]


async def test_unknown_tenant_through_the_manager() -> None:
    async with TenantPoolManager({"acme": TARGET}) as manager:
        with pytest.raises(UnknownTenant):
            async with manager.with_connection("globex"):
                pass
        assert manager.stats().pools == {}


async def test_checkout_before_start_and_after_close_raise_manager_closed() -> None:
    manager = TenantPoolManager({"acme": TARGET})
    with pytest.raises(ManagerClosed, match="not started"):
        async with manager.with_connection("acme"):
            pass
    await manager.start()
    await manager.close()
    with pytest.raises(ManagerClosed, match="closed"):
        async with manager.with_connection("acme"):
            pass
    with pytest.raises(ManagerClosed):
        await manager.start()


def test_default_tenant_is_validated() -> None:
    with pytest.raises(InvalidTenant):
        TenantPoolManager({}, default_tenant="bad id")


def test_manager_arguments_are_validated() -> None:
    for bad in (
        {"max_total_connections": 0},
        {"reap_interval": 0},
        {"forget_after": -1},
        {"close_timeout": -1},
        {"reconnect_delay": 0},
        {"reconnect_delay": 2.0, "reconnect_delay_max": 1.0},
    ):
        with pytest.raises(ValueError):
            TenantPoolManager({}, **bad)  # type: ignore[arg-type]
