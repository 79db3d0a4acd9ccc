"""``fleet db up|down|status|url``: the embedded server of a FLEET_HOME of its own (not the test
session's), its data and port kept across a stop and a start, and its URL usable by psql."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from fleet.database import server_address
from fleet.embedded import EmbeddedServer
from fleet.settings import Settings
from tests.processes import fleet


@pytest.fixture
def home_env() -> Iterator[dict[str, str]]:
    # Under /tmp, which the server's system user can traverse when the tests run as root
    # (pytest's own tmp_path is private to root).
    home = Path(tempfile.mkdtemp(prefix="pgfleet-db-"))
    os.chmod(home, 0o755)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["FLEET_HOME"] = str(home)
    try:
        yield env
    finally:
        fleet("db", "down", env=env)
        shutil.rmtree(home, ignore_errors=True)


def _status(env: dict[str, str]) -> tuple[int, dict]:
    done = fleet("db", "status", "--json", env=env)
    return done.returncode, json.loads(done.stdout)


async def _scalar(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_up_down_status_url_keep_data_and_port(home_env: dict[str, str]):
    home = Path(home_env["FLEET_HOME"])
    code, status = _status(home_env)
    assert code == 1 and status["running"] is False and status["url"] is None

    url = fleet("db", "up", env=home_env, check=True).stdout.strip()
    assert fleet("db", "url", env=home_env, check=True).stdout.strip() == url
    code, status = _status(home_env)
    assert code == 0 and status["running"] is True and status["url"] == url
    assert status["pgdata"] == str(home / "pgdata") and (home / "port").read_text() == str(
        status["port"])
    asyncio.run(_scalar(url, "CREATE TABLE kept AS SELECT 42 AS answer"))

    # The URL goes through the server's Unix socket, in a folder nobody else may enter; TCP on
    # 127.0.0.1 answers too (psql -h, PgBouncer).
    run = home / "run"
    assert url.startswith(f"postgresql://postgres@{quote(str(run), safe='')}:{status['port']}/")
    assert server_address(url) == (str(run), status["port"])
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert (run / f".s.PGSQL.{status['port']}").is_socket()
    assert asyncio.run(_scalar(url, "SELECT inet_client_addr() IS NULL")) is True
    tcp = f"postgresql://postgres@127.0.0.1:{status['port']}/fleet"
    assert asyncio.run(_scalar(tcp, "SELECT inet_client_addr()::text")) == "127.0.0.1/32"

    # psql (the wheel's own) takes the printed URL as it is.
    psql = EmbeddedServer(Settings(fleet_home=home, database_url=None)).install / "bin" / "psql"
    answered = subprocess.run([str(psql), url, "-tAc", "SELECT answer FROM kept"],
                              capture_output=True, text=True, check=True)
    assert answered.stdout.strip() == "42"

    assert fleet("db", "down", env=home_env, check=True).stdout.strip() == "stopped"
    assert fleet("db", "down", env=home_env, check=True).stdout.strip() == "not running"
    code, status = _status(home_env)
    assert code == 1 and status["running"] is False

    # Started again: same port (so every URL handed out still works), same data.
    assert fleet("db", "up", env=home_env, check=True).stdout.strip() == url
    assert asyncio.run(_scalar(url, "SELECT answer FROM kept")) == 42


def test_db_commands_refuse_when_database_url_is_set(home_env: dict[str, str]):
    env = dict(home_env, DATABASE_URL="postgresql://someone@db.invalid/fleet")
    done = fleet("db", "up", env=env)
    assert done.returncode != 0
    assert "DATABASE_URL is set" in done.stderr and "Traceback" not in done.stderr
    assert not (Path(home_env["FLEET_HOME"]) / "pgdata").exists()


def test_a_home_too_deep_for_a_socket_gets_a_server_on_tcp(home_env: dict[str, str]):
    # A Unix socket's path has at most 107 bytes; PostgreSQL refuses to start when it cannot
    # create the socket it is given, so a deeper FLEET_HOME is served on TCP alone.
    deep = Path(home_env["FLEET_HOME"]) / ("d" * 100)
    deep.mkdir()
    deep.chmod(0o755)
    env = dict(home_env, FLEET_HOME=str(deep))
    try:
        url = fleet("db", "up", env=env, check=True).stdout.strip()
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        assert asyncio.run(_scalar(url, "SELECT inet_client_addr()::text")) == "127.0.0.1/32"
        assert not (deep / "run").exists()
    finally:
        fleet("db", "down", env=env)
