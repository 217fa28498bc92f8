"""FastAPI and Starlette integration (``pip install tenantpool[fastapi]``).

``TenantMiddleware`` names each request's tenant; ``manager_lifespan`` runs the manager with
the application; the dependencies (``RequestConnection``, ``EndpointConnection``,
``TransactionConnection``, ``CurrentTenant``, ``Health``, ``PoolManager``) and
``tenant_scope`` hand out the tenant's connection; ``install_error_handlers`` maps
tenantpool's errors to HTTP. Prometheus metrics live in ``tenantpool.fastapi.metrics``
(``pip install tenantpool[prometheus]``), so that this module does not need
prometheus_client.
"""

from ._context import RequestTenant, current_request
from ._dependencies import (
    CurrentTenant,
    EndpointConnection,
    PoolManager,
    RequestConnection,
    TransactionConnection,
    current_tenant,
    pool_manager,
    request_connection,
    tenant_connection,
    tenant_scope,
    tenant_transaction,
)
from ._errors import error_response, install_error_handlers
from ._health import Health, health_endpoint, health_report
from ._lifespan import manager_lifespan
from ._middleware import TenantMiddleware
from ._sources import (
    TenantSource,
    from_header,
    from_path_prefix,
    from_request,
    from_scope,
    from_subdomain,
)

__all__ = [
    "CurrentTenant",
    "EndpointConnection",
    "Health",
    "PoolManager",
    "RequestConnection",
    "RequestTenant",
    "TenantMiddleware",
    "TenantSource",
    "TransactionConnection",
    "current_request",
    "current_tenant",
    "error_response",
    "from_header",
    "from_path_prefix",
    "from_request",
    "from_scope",
    "from_subdomain",
    "health_endpoint",
    "health_report",
    "install_error_handlers",
    "manager_lifespan",
    "pool_manager",
    "request_connection",
    "tenant_connection",
    "tenant_scope",
    "tenant_transaction",
]
