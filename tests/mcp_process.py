"""The real ``fleet mcp serve`` in a subprocess on a free loopback port, for tests."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.processes import start_fleet, stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MCPProcess:
    url: str
    token: str
    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 90.0) -> None:
        """Start (or restart) the server on the same port; returns once it accepts requests
        (the embedding model loads before the port opens)."""
        self.process = start_fleet("mcp", "serve", "--host", "127.0.0.1", "--port",
                                   str(self.port), env=self.env, log=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fleet mcp serve exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"fleet mcp serve did not listen: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int | None = None) -> None:
        if self.process is not None:
            import signal

            stop(self.process, sig or signal.SIGTERM)
            self.process = None


@contextmanager
def running_mcp(env: dict[str, str], log: Path, **knobs: str) -> Iterator[MCPProcess]:
    """``fleet mcp serve`` with a fresh token; ``knobs`` are extra environment variables.
    ``server.env`` is the environment a worker needs to reach it (URL and token)."""
    port = free_port()
    token = "tok-" + secrets.token_urlsafe(24)
    url = f"http://127.0.0.1:{port}/mcp"
    server_env = dict(env, CUSTOMER_DATA_URL=url, CUSTOMER_DATA_TOKEN=token,
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **knobs)
    server = MCPProcess(url=url, token=token, port=port, env=server_env, log=log)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _admin(server_url: str, sql: str) -> None:
    """One statement on the maintenance database, from sync or async test code alike."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result()


@contextmanager
def module_database(server_url: str, template: str = "fleet_test_template") -> Iterator[str]:
    """A fresh migrated database shared by one test module (an MCP server takes ~10-30 s to
    load its embedding model, too long to start once per test)."""
    import uuid
    from urllib.parse import urlparse, urlunparse

    name = f"m_{uuid.uuid4().hex[:12]}"
    _admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield urlunparse(urlparse(server_url)._replace(path=f"/{name}"))
    finally:
        _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def module_env(database_url: str, fleet_home: Path) -> dict[str, str]:
    """Like the ``fleet_env`` fixture, for a module-scoped database."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "OPENAI_"))}
    env.update(DATABASE_URL=database_url, FLEET_HOME=str(fleet_home), FLEET_LOG_LEVEL="INFO",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env
