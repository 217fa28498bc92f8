"""The public surface: __all__ is sorted and honest, the error tree matches the contract."""

from __future__ import annotations

import importlib.resources

import tenantpool
from tenantpool import (
    InvalidTenant,
    ManagerClosed,
    NoCurrentConnection,
    PoolTimeout,
    TenantPoolError,
    TenantUnavailable,
    UnknownTenant,
)


def test_all_is_sorted_and_every_name_exists() -> None:
    assert list(tenantpool.__all__) == sorted(tenantpool.__all__)
    for name in tenantpool.__all__:
        assert hasattr(tenantpool, name), name


def test_all_lists_every_public_name() -> None:
    public = {
        name
        for name, value in vars(tenantpool).items()
        if not name.startswith("_") and not isinstance(value, type(tenantpool))
    }
    assert public == set(tenantpool.__all__)


def test_contract_names_are_exported() -> None:
    for name in [
        "TenantPoolManager",
        "Target",
        "PoolSettings",
        "TenantPoolError",
        "UnknownTenant",
        "InvalidTenant",
        "NoCurrentConnection",
        "PoolTimeout",
        "TenantUnavailable",
        "ManagerClosed",
    ]:
        assert name in tenantpool.__all__


def test_error_tree() -> None:
    for error in (
        UnknownTenant,
        InvalidTenant,
        NoCurrentConnection,
        PoolTimeout,
        TenantUnavailable,
        ManagerClosed,
        tenantpool.ConnectionReleased,
    ):
        assert issubclass(error, TenantPoolError)
        assert error.__doc__ and error.__doc__.startswith("Raised when")
    assert issubclass(UnknownTenant, LookupError)
    assert issubclass(InvalidTenant, ValueError)
    assert issubclass(PoolTimeout, TimeoutError)
    assert PoolTimeout("x", retry_after=1.5).retry_after == 1.5
    assert TenantUnavailable("x", retry_after=2.0).retry_after == 2.0


def test_package_is_typed() -> None:
    assert importlib.resources.files("tenantpool").joinpath("py.typed").is_file()
