"""Where a request names its tenant: a header, a subdomain, a path prefix, or any callable."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeAlias

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Scope

__all__ = [
    "RequestFinder",
    "ScopeFinder",
    "TenantSource",
    "from_header",
    "from_path_prefix",
    "from_request",
    "from_scope",
    "from_subdomain",
]

RequestFinder: TypeAlias = Callable[[Request], str | Awaitable[str | None] | None]
ScopeFinder: TypeAlias = Callable[[Scope], str | Awaitable[str | None] | None]


class TenantSource:
    """Where ``TenantMiddleware`` looks for a request's tenant id; subclass it for other places.

    ``find`` returns the id as the request gives it (the middleware validates it), or ``None``
    when the request names no tenant; it may raise ``InvalidTenant``, or an ``HTTPException``
    (say, 401 for a bad token), which the middleware turns into a JSON response.
    """

    description = "the request"  # shown in the 400 a tenant route answers when none is found

    async def find(self, scope: Scope) -> str | None:
        raise NotImplementedError

    def route(self, scope: Scope, tenant: str) -> Scope:
        """The scope the application sees once ``tenant`` is known; the same by default."""
        return scope

    def __repr__(self) -> str:
        return f"<TenantSource {self.description}>"


class _Header(TenantSource):
    def __init__(self, name: str) -> None:
        self.name = name
        self.description = f"the {name} header"

    async def find(self, scope: Scope) -> str | None:
        values = Headers(scope=scope).getlist(self.name)
        if not values:
            return None
        # Two copies may be read differently by a proxy and by us: refuse rather than pick one,
        # saying why (an InvalidTenant would be answered as a malformed id).
        if len(values) > 1:
            raise HTTPException(
                400, f"the {self.name} header is given {len(values)} times; send it once"
            )
        return values[0]


class _Subdomain(TenantSource):
    def __init__(self, base_domain: str) -> None:
        base = base_domain.strip(".").lower()
        if not base:
            raise ValueError("base_domain must not be empty")
        self.base = base
        self.description = f"a subdomain of {base}"

    async def find(self, scope: Scope) -> str | None:
        host = Headers(scope=scope).get("host", "").lower()
        if host.startswith("["):  # an IPv6 literal names no tenant
            return None
        host = host.partition(":")[0].rstrip(".")
        if not host.endswith("." + self.base):
            return None
        # "a.b.example.com" yields "a.b", which validation rejects: only one level names a tenant.
        return host[: -len(self.base) - 1]


class _PathPrefix(TenantSource):
    def __init__(self, prefix: str) -> None:
        prefix = prefix.strip("/")
        self.prefix = f"/{prefix}" if prefix else ""
        self.description = f"the path {self.prefix}/{{tenant}}/..."

    def _route_path(self, scope: Scope) -> str:
        # Starlette routes on the path below root_path; so do we, to work under a Mount too.
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        return path[len(root) :] if root and path.startswith(root) else path

    async def find(self, scope: Scope) -> str | None:
        head = self.prefix + "/"
        path = self._route_path(scope)
        if not path.startswith(head):
            return None
        tenant = path[len(head) :].partition("/")[0]
        return tenant or None

    def route(self, scope: Scope, tenant: str) -> Scope:
        # Moving the prefix into root_path, as Mount does, lets routes be declared without it
        # and makes url_for() keep it.
        root = scope.get("root_path", "") + f"{self.prefix}/{tenant}"
        return {**scope, "root_path": root}


class _FromRequest(TenantSource):
    def __init__(self, finder: RequestFinder) -> None:
        self.finder = finder
        self.description = getattr(finder, "__name__", repr(finder))

    async def find(self, scope: Scope) -> str | None:
        found = self.finder(Request(scope))
        if found is None or isinstance(found, str):
            return found
        return await found


class _FromScope(TenantSource):
    def __init__(self, finder: ScopeFinder) -> None:
        self.finder = finder
        self.description = getattr(finder, "__name__", repr(finder))

    async def find(self, scope: Scope) -> str | None:
        found = self.finder(scope)
        if found is None or isinstance(found, str):
            return found
        return await found


def from_header(name: str = "X-Tenant-ID") -> TenantSource:
    """The tenant id is the value of the header ``name``; no header, no tenant."""
    return _Header(name)


def from_subdomain(base_domain: str) -> TenantSource:
    """``acme.example.com`` is tenant ``acme`` for ``base_domain="example.com"``.

    The host itself, and hosts outside ``base_domain``, name no tenant.
    """
    return _Subdomain(base_domain)


def from_path_prefix(prefix: str) -> TenantSource:
    """``{prefix}/acme/notes`` is tenant ``acme``; the application sees the path ``/notes``.

    The tenant segment moves into ``root_path``, so routes are declared without it. Paths
    outside ``{prefix}/`` name no tenant. With ``prefix=""`` every path's first segment is a
    tenant id, ``/health`` included.
    """
    return _PathPrefix(prefix)


def from_request(finder: RequestFinder) -> TenantSource:
    """``finder(request)``, sync or async, returns the tenant id or ``None`` (a JWT claim, say)."""
    return _FromRequest(finder)


def from_scope(finder: ScopeFinder) -> TenantSource:
    """``finder(scope)``, sync or async, reads the tenant id from the raw ASGI scope."""
    return _FromScope(finder)
