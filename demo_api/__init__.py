"""tenantpool's demo: a multi-tenant notes service on FastAPI (``python -m demo_api``).

Modules, one concept each: ``_settings`` (environment), ``_local_postgres`` (running a
PostgreSQL server process, shared with the test suite), ``_embedded`` (the demo's own server
and its data folder), ``_credentials`` (passwords, DSNs), ``_registry`` (the tenant registry,
provisioning, the resolver), ``_models`` (pydantic), ``_limits`` (oversized bodies and a doubled
tenant header, refused before routing), ``_rates`` (the dashboard's last minute), ``_app`` (the
FastAPI application, wired with ``tenantpool.fastapi``), ``_dashboard`` (the page at ``/``).

``create_app(admin_dsn, prefix=..., max_connections=...)`` builds the application (for
benchmarks, or another server); importing the package itself imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DemoSettings", "create_app"]

if TYPE_CHECKING:
    from ._app import create_app
    from ._settings import DemoSettings


def __getattr__(name: str) -> Any:
    # Lazy, so that importing demo_api._local_postgres does not import FastAPI.
    if name == "create_app":
        from ._app import create_app

        return create_app
    if name == "DemoSettings":
        from ._settings import DemoSettings

        return DemoSettings
    raise AttributeError(f"module 'demo_api' has no attribute {name!r}")
