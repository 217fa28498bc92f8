"""The demo's settings, read from the environment."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tenantpool import redact_dsn

__all__ = ["DemoSettings", "SettingsError"]

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,15}")


class SettingsError(ValueError):
    """Raised when an environment variable holds a value the demo cannot use."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo can be told; ``from_env()`` reads it from environment variables.

    ==================== ================ ==================================================
    variable             default          meaning
    ==================== ================ ==================================================
    ``HOST``             ``127.0.0.1``    address to serve HTTP on
    ``PORT``             ``8000``         port to serve HTTP on
    ``DATABASE_URL``     (unset)          a PostgreSQL superuser, or a role with CREATEDB
                                          and CREATEROLE owning the URL's database; unset:
                                          the demo runs a PostgreSQL server of its own
    ``MAX_CONNECTIONS``  ``20``           the cap on connections across all tenants' pools
    ``LOG_LEVEL``        ``info``         critical, error, warning, info or debug
    ``DEMO_DATA_DIR``    ``./demo-data``  where the demo's own server keeps its data
    ``DEMO_PREFIX``      ``demo``         prefix of every role, database and schema the demo
                                          creates (to run several demos on one server)
    ==================== ================ ==================================================
    """

    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = field(default=None, repr=False)
    max_connections: int = 20
    log_level: str = "info"
    data_dir: Path = Path("demo-data")
    prefix: str = "demo"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise SettingsError(f"PORT must be between 1 and 65535, got {self.port}")
        if self.max_connections < 1:
            raise SettingsError(f"MAX_CONNECTIONS must be at least 1, got {self.max_connections}")
        if self.log_level not in _LOG_LEVELS:
            raise SettingsError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}")
        if not _PREFIX.fullmatch(self.prefix):
            raise SettingsError(
                "DEMO_PREFIX must be 1-16 lower-case letters, digits or '_', starting with a letter"
            )
        if self.database_url is not None:
            parts = urlsplit(self.database_url)
            if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
                raise SettingsError(
                    "DATABASE_URL must be a URL: postgresql://user:password@host:port/database"
                )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DemoSettings:
        """Read the settings from ``env`` (default: ``os.environ``); empty values are unset."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def integer(name: str, default: int) -> int:
            value = get(name)
            if value is None:
                return default
            try:
                return int(value)
            except ValueError:
                raise SettingsError(f"{name} must be an integer, got {value!r}") from None

        return cls(
            host=get("HOST") or cls.host,
            port=integer("PORT", cls.port),
            database_url=get("DATABASE_URL"),
            max_connections=integer("MAX_CONNECTIONS", cls.max_connections),
            log_level=(get("LOG_LEVEL") or cls.log_level).lower(),
            data_dir=Path(get("DEMO_DATA_DIR") or cls.data_dir),
            prefix=get("DEMO_PREFIX") or cls.prefix,
        )

    def __repr__(self) -> str:
        url = None if self.database_url is None else redact_dsn(self.database_url)
        return (
            f"DemoSettings(host={self.host!r}, port={self.port}, database_url={url!r}, "
            f"max_connections={self.max_connections}, log_level={self.log_level!r}, "
            f"data_dir={str(self.data_dir)!r}, prefix={self.prefix!r})"
        )
