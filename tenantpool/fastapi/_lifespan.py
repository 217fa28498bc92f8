"""``manager_lifespan``: the manager starts with the application, closes with it, rides in state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeAlias, TypeVar, overload

from .._manager import TenantPoolManager
from ._context import STATE_KEY

__all__ = ["manager_lifespan"]

AppT = TypeVar("AppT")
State: TypeAlias = dict[str, Any]
AppLifespan: TypeAlias = Callable[[AppT], AbstractAsyncContextManager[Mapping[str, Any] | None]]
ManagerOrFactory: TypeAlias = TenantPoolManager | Callable[[], TenantPoolManager]


@overload
def manager_lifespan(
    manager: ManagerOrFactory,
) -> Callable[[object], AbstractAsyncContextManager[State]]: ...


@overload
def manager_lifespan(
    manager: ManagerOrFactory, lifespan: AppLifespan[AppT]
) -> Callable[[AppT], AbstractAsyncContextManager[State]]: ...


def manager_lifespan(
    manager: ManagerOrFactory, lifespan: AppLifespan[Any] | None = None
) -> Callable[[Any], AbstractAsyncContextManager[State]]:
    """A lifespan that starts ``manager``, runs ``lifespan`` inside it, and closes it after.

    ``FastAPI(lifespan=manager_lifespan(manager))`` or, keeping an application's own lifespan,
    ``manager_lifespan(manager, app_lifespan)``: the manager is started before the app's
    startup code and closed after its shutdown code, and the state both yield is merged.
    Endpoints find the manager as ``request.state.tenantpool_manager``; the middleware and the
    dependencies find it there by themselves.

    ``manager`` may be a factory (``lambda: TenantPoolManager(...)``) called at each startup:
    a closed manager cannot be started again, and a factory lets the application be run
    more than once (as tests do).
    """

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[State]:
        current = manager if isinstance(manager, TenantPoolManager) else manager()
        async with current:
            if lifespan is None:
                yield {STATE_KEY: current}
                return
            async with lifespan(app) as app_state:
                yield {**(app_state or {}), STATE_KEY: current}

    return run
