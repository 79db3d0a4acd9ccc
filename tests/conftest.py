"""Test fixtures: one real PostgreSQL per test session, one fresh database per test.

With ``DATABASE_URL`` unset the session starts the embedded PostgreSQL 18 + pgvector in a
temporary ``FLEET_HOME``; with it set, that server is used (the role needs CREATEDB). A template
database is migrated once; each test that needs the database gets ``CREATE DATABASE ... TEMPLATE``
(a fraction of a second), so tests can commit, LISTEN and kill processes without seeing each
other.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import asyncpg
import pytest

from fleet.database import connect
from fleet.settings import Settings

TEMPLATE = "fleet_test_template"


def _with_database(url: str, database: str) -> str:
    parts = urlparse(url)
    return urlunparse(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def fleet_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="pgfleet-tests-"))
    os.chmod(home, 0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def server_url(fleet_home: Path) -> Iterator[str]:
    """A URL of the test server's maintenance database (``postgres``)."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield _with_database(external, "postgres")
        return
    from fleet.embedded import EmbeddedServer

    server = EmbeddedServer(Settings(fleet_home=fleet_home, database_url=None))
    url = server.ensure_running()
    yield _with_database(url, "postgres")
    server.stop()


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_url(server_url: str) -> str:
    """A migrated template database, built once per test session."""
    from fleet.database import connect
    from fleet.migrate import migrate

    async def build() -> None:
        await _admin(server_url, f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        await _admin(server_url, f'CREATE DATABASE "{TEMPLATE}"')
        url = _with_database(server_url, TEMPLATE)
        settings = Settings(database_url=url)
        conn = await connect(settings, "fleet-test-template", url=url)
        try:
            await migrate(conn, settings)
        finally:
            await conn.close()

    asyncio.run(build())
    return _with_database(server_url, TEMPLATE)


@pytest.fixture
def db_url(server_url: str, template_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"'))
    yield _with_database(server_url, name)
    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def settings(db_url: str, fleet_home: Path) -> Settings:
    """Settings for in-process fleet objects, with short timings so tests run fast."""
    return Settings(
        database_url=db_url,
        fleet_home=fleet_home,
        fleet_lease_seconds=3.0,
        fleet_poll_interval=0.5,
        fleet_retry_base_seconds=0.1,
        fleet_retry_max_seconds=1.0,
        fleet_shutdown_grace=5.0,
    )


@pytest.fixture
def fleet_env(db_url: str, fleet_home: Path) -> dict[str, str]:
    """Environment for fleet subprocesses pointed at this test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "OPENAI_"))}
    env.update(
        DATABASE_URL=db_url,
        FLEET_HOME=str(fleet_home),
        FLEET_LEASE_SECONDS="3",
        FLEET_POLL_INTERVAL="0.5",
        FLEET_RETRY_BASE_SECONDS="0.1",
        FLEET_RETRY_MAX_SECONDS="1",
        FLEET_SHUTDOWN_GRACE="5",
        FLEET_LOG_LEVEL="INFO",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


@asynccontextmanager
async def _connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to ``url`` with the fleet's own codecs (json/jsonb decoded)."""
    from fleet.database import connect

    connection = await connect(Settings(database_url=url), "fleet-test", url=url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database."""
    async with _connected(db_url) as connection:
        yield connection


@pytest.fixture
def sync_conn(db_url: str) -> Iterator[tuple[asyncio.AbstractEventLoop, asyncpg.Connection]]:
    """A connection on a private event loop, for hypothesis tests (they run their examples
    synchronously, outside pytest's loop)."""
    loop = asyncio.new_event_loop()
    connection = loop.run_until_complete(
        connect(Settings(database_url=db_url), "fleet-test", url=db_url))
    yield loop, connection
    loop.run_until_complete(connection.close())
    loop.close()


@pytest.fixture(scope="module")
def seeded_db(server_url: str, template_url: str) -> Iterator[str]:
    """A copy of the seeded database (customers, orders, the embedded corpus) per test module
    (``tests/seeded.py``: seeded once per session, cloned per use)."""
    from tests.seeded import seeded_clone, seeded_template

    seeded_template(server_url)
    with seeded_clone(server_url) as url:
        yield url


@pytest.fixture
async def db(seeded_db: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the module's seeded database."""
    async with _connected(seeded_db) as connection:
        yield connection

