"""``python -m demo_api``: serve the demo (see ``DemoSettings`` for the environment variables).

Without ``DATABASE_URL`` the demo runs a PostgreSQL server of its own in ``DEMO_DATA_DIR``
and stops it on the way out: after Ctrl-C or SIGTERM, once the HTTP server has shut down,
and also when the signal comes while that server is still starting.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import uvicorn

from tenantpool import redact_dsn

from ._embedded import EmbeddedPostgres
from ._settings import DemoSettings, SettingsError

logger = logging.getLogger("demo_api")


class _Stop:
    """Records SIGINT/SIGTERM; tells a running uvicorn server to exit.

    uvicorn installs handlers of its own while it serves, and after a graceful shutdown
    raises the signal again for the handler it found, this one: so we always get to stop
    PostgreSQL, which a default SIGTERM handler (killing us at once) would prevent.
    """

    def __init__(self) -> None:
        self.requested = False
        self.server: uvicorn.Server | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True


def main() -> int:
    try:
        settings = DemoSettings.from_env()
    except SettingsError as exc:
        print(f"demo_api: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = _Stop()
    embedded: EmbeddedPostgres | None = None
    try:
        if settings.database_url is not None:
            dsn = settings.database_url
            logger.info("using the PostgreSQL server at %s", redact_dsn(dsn))
        else:
            embedded = EmbeddedPostgres(settings.data_dir)
            dsn = embedded.start()
        if stop.requested:
            return 0
        from ._app import create_app

        app = create_app(dsn, prefix=settings.prefix, max_connections=settings.max_connections)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                lifespan="on",
            )
        )
        stop.server = server
        logger.info("dashboard at http://%s:%d/", settings.host, settings.port)
        server.run()  # exits with 3 itself when the startup fails, having logged why
        if not server.started and not stop.requested:
            return 1
        return 0
    except Exception as exc:
        logger.error("%s: %s", type(exc).__name__, exc)
        return 1
    finally:
        if embedded is not None and embedded.stop():
            logger.info("PostgreSQL stopped")


if __name__ == "__main__":
    sys.exit(main())
