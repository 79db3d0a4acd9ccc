"""A real PgBouncer (Debian's ``pgbouncer``) in transaction pooling mode, for tests.

It listens on a free loopback port and forwards every database name to the test's PostgreSQL.
PgBouncer refuses to run as root, so as root it runs as an unprivileged system user (the one the
embedded PostgreSQL already uses, else ``nobody``) from a temporary folder that user owns.
``pgbouncer_binary()`` is None when PgBouncer is not installed: tests skip with that reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from fleet.database import server_address

#: Where Debian puts the binary (``/usr/sbin`` is not on every user's PATH).
_CANDIDATES = ("pgbouncer", "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
SKIP_REASON = ("PgBouncer is not installed (Debian: apt-get install pgbouncer; "
               "bin/setup --dev installs it)")


def pgbouncer_binary() -> str | None:
    for candidate in _CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("embedded_postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user to run PgBouncer as")


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {process.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"pgbouncer did not listen on {port}: {log.read_text()}")


@contextmanager
def running_pgbouncer(database_url: str, *, pool_size: int = 10,
                      max_client_conn: int = 500) -> Iterator[str]:
    """Start PgBouncer in front of ``database_url``'s server; yields the same URL via the pooler.

    ``pool_size`` is the number of server connections per (database, user) pair: the bound the
    pooler puts on what the fleet may hold, however many client connections the fleet opens.
    A password in ``database_url`` is demanded from clients (SCRAM; the test server behind
    trusts loopback, so this is where a password is really checked) and kept in the URL.
    """
    binary = pgbouncer_binary()
    if binary is None:
        raise RuntimeError(SKIP_REASON)
    target = urlparse(database_url)
    host, port_behind = server_address(database_url)
    user = target.username or "postgres"
    password = target.password
    folder = Path(tempfile.mkdtemp(prefix="pgfleet-pgbouncer-"))
    port = _free_port()
    (folder / "users.txt").write_text(f'"{user}" "{password or ""}"\n')
    config = folder / "pgbouncer.ini"
    log = folder / "pgbouncer.log"
    config.write_text(f"""\
[databases]
* = host={host} port={port_behind or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = {"scram-sha-256" if password else "trust"}
auth_file = {folder / "users.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {max_client_conn}
max_db_connections = {pool_size}
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {log}
pidfile = {folder / "pgbouncer.pid"}
""")
    account = _run_as()
    if account is not None:
        for path in (folder, *folder.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
    process = subprocess.Popen(
        [binary, str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        user=account.pw_uid if account else None,
        group=account.pw_gid if account else None,
        start_new_session=True,
    )
    try:
        _wait_for_port(port, process, log)
        login = f"{user}:{password}" if password else user
        yield urlunparse(target._replace(netloc=f"{login}@127.0.0.1:{port}"))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # immediate shutdown: the test is over
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(folder, ignore_errors=True)
