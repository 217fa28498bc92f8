"""What a tenant connects to (``Target``), how its pool behaves (``PoolSettings``), redaction."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["PoolSettings", "SessionState", "StateScope", "Target", "redact_dsn", "server_address"]

StateScope = Literal["session", "transaction"]

# The session state a checkout applies: ordered (setting, value) pairs for set_config().
SessionState = tuple[tuple[str, str], ...]

# PostgreSQL truncates identifiers longer than NAMEDATALEN - 1 bytes; reject them rather than
# letting two long names silently collapse into one.
_MAX_IDENTIFIER_BYTES = 63
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)*")
# Applied through dedicated fields, so that reset and setup handle them deliberately.
_RESERVED_SETTINGS = frozenset({"role", "search_path", "session_authorization"})
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How one target's pool behaves; all times are in seconds."""

    min_size: int = 0
    max_size: int = 10
    acquire_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float | None = 300.0
    max_age: float | None = 3600.0
    max_age_jitter: float = 0.1
    keepalive_interval: float | None = 60.0
    # "transaction": each scope is one transaction carrying the tenant's state transaction-
    # locally, and nothing is left on the server session (safe behind transaction poolers).
    state_scope: StateScope = "session"

    def __post_init__(self) -> None:
        if self.state_scope not in ("session", "transaction"):
            raise ValueError(
                f"state_scope must be 'session' or 'transaction', got {self.state_scope!r}"
            )
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")
        if self.max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {self.max_size}")
        if self.min_size > self.max_size:
            raise ValueError(
                f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})"
            )
        for name in ("acquire_timeout", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("idle_timeout", "max_age", "keepalive_interval"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if not 0.0 <= self.max_age_jitter < 1.0:
            raise ValueError(f"max_age_jitter must be in [0, 1), got {self.max_age_jitter}")


def _check_identifier(kind: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string")
    if "\x00" in value:
        raise ValueError(f"{kind} must not contain NUL characters")
    if len(value.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ValueError(f"{kind} must be at most {_MAX_IDENTIFIER_BYTES} bytes: {value!r}")


def quote_identifier(name: str) -> str:
    """Quote ``name`` as a PostgreSQL identifier, whatever characters it holds."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True, eq=True)
class Target:
    """Where and as whom a tenant connects, and the session state its checkouts carry."""

    dsn: str
    schema: str | None = None
    role: str | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    pool: PoolSettings | None = None
    max_in_use: int | None = None
    session_state: SessionState = field(init=False, repr=False, compare=False)
    # Identifies the pool: the DSN with its credentials, digested so that no dict key, debugger
    # or locals-printing traceback shows a password.
    pool_key: bytes = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        role: str | None = None,
        settings: Mapping[str, str] | None = None,
        pool: PoolSettings | None = None,
        max_in_use: int | None = None,
    ) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise ValueError("dsn must be a non-empty string")
        if schema is not None:
            _check_identifier("schema", schema)
        if role is not None:
            _check_identifier("role", role)
        frozen_settings = MappingProxyType(dict(settings or {}))
        for name, value in frozen_settings.items():
            if not isinstance(name, str) or not _SETTING_NAME.fullmatch(name):
                raise ValueError(f"invalid setting name: {name!r}")
            if name.lower() in _RESERVED_SETTINGS:
                raise ValueError(f"set {name!r} through Target's own field, not settings")
            if not isinstance(value, str) or "\x00" in value:
                raise ValueError(f"setting {name!r} must be a string without NUL characters")
        if pool is not None and not isinstance(pool, PoolSettings):
            raise TypeError("pool must be a PoolSettings")
        if max_in_use is not None and (
            not isinstance(max_in_use, int) or isinstance(max_in_use, bool) or max_in_use < 1
        ):
            raise ValueError(f"max_in_use must be an int >= 1 or None, got {max_in_use!r}")
        object.__setattr__(self, "dsn", dsn)
        object.__setattr__(self, "schema", schema)
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "settings", frozen_settings)
        object.__setattr__(self, "pool", pool)
        object.__setattr__(self, "max_in_use", max_in_use)
        # Settings first, role last: the login user may set what the tenant's role may not.
        state = [(name, frozen_settings[name]) for name in sorted(frozen_settings)]
        if schema is not None:
            state.append(("search_path", quote_identifier(schema)))
        if role is not None:
            state.append(("role", role))
        object.__setattr__(self, "session_state", tuple(state))
        object.__setattr__(self, "pool_key", hashlib.blake2b(dsn.encode(), digest_size=20).digest())

    def __repr__(self) -> str:
        parts = [repr(redact_dsn(self.dsn))]
        if self.schema is not None:
            parts.append(f"schema={self.schema!r}")
        if self.role is not None:
            parts.append(f"role={self.role!r}")
        if self.settings:
            parts.append(f"settings={dict(self.settings)!r}")
        if self.pool is not None:
            parts.append(f"pool={self.pool!r}")
        if self.max_in_use is not None:
            parts.append(f"max_in_use={self.max_in_use}")
        return f"Target({', '.join(parts)})"


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with every password removed, for names, logs and errors."""
    parts = urlsplit(dsn)
    if not parts.scheme or not dsn.startswith(f"{parts.scheme}://"):
        # A libpq key=value string: drop the password pair, quoted or not.
        return re.sub(r"\s*password\s*=\s*('(?:[^'\\]|\\.)*'|\S*)", "", dsn).strip()
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, v) for k, v in pairs if k.lower() not in _SECRET_QUERY_KEYS])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def server_address(dsn: str) -> str:
    """Where ``dsn`` connects (hosts and ports), without user, database or options.

    Pools whose DSNs share it share a server: when one of them finds the server back after an
    outage, the others need not wait out their own backoff.
    """
    parts = urlsplit(dsn)
    if not parts.scheme or not dsn.startswith(f"{parts.scheme}://"):
        pairs = re.findall(r"\b(host|hostaddr|port)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)", dsn)
        found = dict(pairs)
        return f"{found.get('hostaddr') or found.get('host', '')}:{found.get('port', '')}"
    hosts = parts.netloc.rsplit("@", 1)[-1]
    query = {k.lower(): v for k, v in parse_qsl(parts.query)}
    if "host" in query or "port" in query:
        hosts = f"{query.get('host', hosts)}:{query.get('port', '')}"
    return hosts
