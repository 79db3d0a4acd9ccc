"""A network that drops the fleet's connections without a word: a failover to a new primary, a
NAT's or a load balancer's expired entry. Nothing is refused or reset; what is sent is simply
never answered, and TCP would take about 15 minutes to give up. The worker must notice by its
own timeouts (about two leases) and go on with new connections."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import unquote, urlparse, urlunparse

import asyncpg
import pytest

from fleet import queue
from fleet.client import Client
from fleet.errors import InvalidInput
from fleet.handlers import NoopHandler
from fleet.settings import Settings
from fleet.worker import Worker
from tests.processes import wait_until

pytestmark = pytest.mark.slow


class SilentProxy:
    """A TCP proxy in front of PostgreSQL whose connections can go silent: after
    :meth:`silence`, the connections opened until then swallow whatever either side sends
    (as a network that drops the packets would), while new connections work."""

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlparse(url)
        host, _, port = parts.netloc.rpartition("@")[2].rpartition(":")
        self._upstream = (unquote(host), int(port))
        self._silenced: set[asyncio.StreamWriter] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.proxied_url = ""

    async def __aenter__(self) -> SilentProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlparse(self.url)
        user = parts.netloc.rpartition("@")[0]
        self.proxied_url = urlunparse(parts._replace(netloc=f"{user}@127.0.0.1:{port}"))
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self.disconnect()

    def silence(self) -> None:
        self._silenced |= self._open

    def disconnect(self) -> None:
        """Close every connection (the network back, and resetting what it had lost)."""
        for writer in self._open:
            writer.close()

    async def _upstream_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self._upstream
        if host.startswith("/"):  # a socket directory
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter):
        server_in, server_out = await self._upstream_connection()
        self._open |= {client_out, server_out}
        pair = {client_out, server_out}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if not pair & self._silenced:
                    sink.write(data)
                    await sink.drain()

        try:
            await asyncio.gather(pump(client_in, server_out), pump(server_in, client_out))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._open -= pair
            for writer in pair:
                writer.close()


async def _done(conn: asyncpg.Connection, count: int) -> bool:
    return await conn.fetchval(
        "SELECT count(*) = $1 FROM fleet.messages WHERE state = 'done'", count)


async def test_a_worker_whose_connections_go_silent_carries_on_with_new_ones(
    settings: Settings, conn: asyncpg.Connection, db_url: str
):
    """Every connection the worker has (its pool and its LISTEN connection) goes silent while
    it works; the messages enqueued after are done within about two leases (3 s here), and the
    worker still stops cleanly. Before statements had a time limit, the calls under way on
    the silent connections held the worker's claims until TCP gave up."""
    async with SilentProxy(db_url) as proxy:
        worker = Worker(settings.model_copy(update={"database_url": proxy.proxied_url}),
                        NoopHandler(0.01), concurrency=4, claim_batch=2)
        task = asyncio.create_task(worker.run())
        try:
            for i in range(5):
                await queue.enqueue(conn, f"before-{i}", "x")
            await wait_until(lambda: _done(conn, 5), timeout=30, message="the first messages")
            proxy.silence()
            for i in range(5):
                await queue.enqueue(conn, f"after-{i}", "x")
            await wait_until(lambda: _done(conn, 10), timeout=30,
                             message="the messages enqueued after the silence")
        finally:
            worker.stop()
            try:  # it stops by itself, silent connections and all
                await asyncio.wait_for(asyncio.shield(task), 30)
            finally:
                proxy.disconnect()  # else a worker stuck on them would hang the test
                await task


async def test_a_client_call_on_a_silent_connection_times_out_and_the_next_one_works(
    settings: Settings, db_url: str
):
    """fleet.Client's statements have a time limit (statement_timeout): a call on a connection
    the network dropped fails with TimeoutError instead of waiting for TCP to give up, the
    next call gets a working connection, and leaving the client does not hang."""
    async with SilentProxy(db_url) as proxy:
        # For code without the limit: the connections are reset after 20 s, so a call stuck
        # on them fails the assertions below instead of hanging the test.
        reset = asyncio.get_running_loop().call_later(20, proxy.disconnect)
        try:
            async with Client(proxy.proxied_url, settings=settings,
                              statement_timeout=1.0) as client:
                first = await client.enqueue("silent-client", "before")
                proxy.silence()
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await client.get_message(first)
                assert time.monotonic() - started < 10
                # The pool's silent connection was given up: a new one answers.
                second = await client.enqueue("silent-client", "after")
                assert (await client.get_message(second)).body == "after"
                left_at = time.monotonic()
            assert time.monotonic() - left_at < 10  # the silent listener did not hold it
        finally:
            reset.cancel()
            proxy.disconnect()


def test_a_client_statement_timeout_must_be_positive():
    with pytest.raises(InvalidInput, match="statement_timeout"):
        Client(statement_timeout=0)
