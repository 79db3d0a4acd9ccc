"""A seeded database for tests, built once per test session and cloned per use.

Seeding embeds the corpus (the model load alone takes seconds), so it runs once: a database
``fleet_test_seeded`` is cloned from the migrated template and seeded in-process; tests get
``CREATE DATABASE ... TEMPLATE fleet_test_seeded`` copies. The model stays loaded in the test
process, so an in-process MCP server reuses it. Also: a customer-data MCP server in a thread
(uvicorn on a free port) for real-HTTP tests.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

import asyncpg
from pydantic import SecretStr

from fleet.settings import Settings

SEEDED = "fleet_test_seeded"
_built: dict[str, object] = {}


def with_database(url: str, database: str) -> str:
    return urlunparse(urlparse(url)._replace(path=f"/{database}"))


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def seeded_template(server_url: str, template: str = "fleet_test_template"):
    """(URL of the seeded template, the first seed's report); built once per process."""
    if SEEDED not in _built:
        from fleet.database import connect
        from fleet.seed import seed_database

        url = with_database(server_url, SEEDED)

        async def build():
            await _admin(server_url, f'DROP DATABASE IF EXISTS "{SEEDED}" WITH (FORCE)')
            await _admin(server_url, f'CREATE DATABASE "{SEEDED}" TEMPLATE "{template}"')
            settings = Settings(database_url=url)
            conn = await connect(settings, "fleet-test-seed", url=url, vector=True)
            try:
                return await seed_database(conn, settings)
            finally:
                await conn.close()

        _built[SEEDED] = (url, asyncio.run(build()))
    return _built[SEEDED]


@contextmanager
def seeded_clone(server_url: str) -> Iterator[str]:
    """A fresh copy of the seeded database, dropped afterwards."""
    name = f"s_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{SEEDED}"'))
    try:
        yield with_database(server_url, name)
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    token: str
    settings: Settings


@contextmanager
def mcp_server_in_thread(database_url: str, *, port: int | None = None,
                         **overrides: object) -> Iterator[RunningServer]:
    """The real customer-data app under uvicorn, in a thread, on ``port`` (default: a free one)."""
    import uvicorn

    from mcp_customer_data import create_app

    port = port or free_port()
    token = str(overrides.pop("token", None) or f"tok-{uuid.uuid4().hex}")
    settings = Settings(
        database_url=database_url,
        customer_data_url=f"http://127.0.0.1:{port}/mcp",
        customer_data_token=SecretStr(token),
        **overrides,
    )
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning",
        access_log=False, lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="mcp-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the customer-data server did not start")
        time.sleep(0.05)
    try:
        yield RunningServer(url=settings.customer_data_url, token=token, settings=settings)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
