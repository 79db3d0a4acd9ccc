"""Connections: which database, and how every fleet process opens connections to it.

``DATABASE_URL`` wins; without it the embedded server is started on demand. Every connection is
tagged with an ``application_name`` (``fleet-worker``, ``fleet-mcp``...) so that
``pg_stat_activity`` shows who holds what, which is how the connection budget in README is checked.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlparse

import asyncpg

from fleet import json_codec
from fleet.settings import Settings

#: Errors that mean "the database is away for now" (down, restarting, at its connection
#: limit, or a pooled connection broken by its restart), or that it rolled the transaction
#: back for another's sake (SQLSTATE class 40: a deadlock, a serialization failure): back off
#: and try again. A worker that exited on a deadlock would leave its messages to lease expiry.
#: ``InternalClientError`` is asyncpg's "cannot switch to state ...; another operation is in
#: progress", raised by a pooled connection whose server shut down mid-operation (seen in the
#: agent chaos suite right after a PostgreSQL restart, on a worker's retry write).
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.TransactionRollbackError,
)


def server_address(url: str) -> tuple[str, int | None]:
    """(host, port) of a libpq URL as written: the host unquoted and with its case kept, so a
    Unix socket's folder (the embedded server's URL names one, percent-encoded) comes back as
    the path it is; ``urlparse().hostname`` lower-cases it."""
    host = urlparse(url).netloc.rpartition("@")[2]
    port = None
    if ":" in host and not host.endswith("]"):  # a port (an IPv6 host is bracketed)
        host, _, number = host.rpartition(":")
        port = int(number) if number else None
    return unquote(host), port


async def resolve_url(settings: Settings) -> str:
    """The libpq URL of the fleet's database, starting the embedded server if that is the one."""
    if settings.database_url:
        return settings.database_url
    from fleet.embedded import EmbeddedServer

    return await asyncio.to_thread(EmbeddedServer(settings).ensure_running)


def resolve_url_sync(settings: Settings) -> str:
    """Same as :func:`resolve_url`, for synchronous callers (the CLI, the supervisor)."""
    if settings.database_url:
        return settings.database_url
    from fleet.embedded import EmbeddedServer

    return EmbeddedServer(settings).ensure_running()


async def _init_json(conn: asyncpg.Connection) -> None:
    """json/jsonb in and out as Python objects, on every connection the fleet opens."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=json_codec.dumps, decoder=json_codec.loads, schema="pg_catalog"
        )
    from fleet import tracing

    tracing.trace_queries(conn)  # db.query spans inside traced work; nothing when tracing is off


async def _init_vector(conn: asyncpg.Connection) -> None:
    from pgvector.asyncpg import register_vector

    await _init_json(conn)
    await register_vector(conn)


def connection_kwargs(settings: Settings, application_name: str) -> dict[str, Any]:
    return {
        "statement_cache_size": settings.fleet_statement_cache_size,
        "server_settings": {"application_name": application_name},
    }


async def connect(
    settings: Settings, application_name: str, *, url: str | None = None, vector: bool = False
) -> asyncpg.Connection:
    """One connection (LISTEN, migrations, CLI commands)."""
    conn = await asyncpg.connect(
        url or await resolve_url(settings), **connection_kwargs(settings, application_name)
    )
    await (_init_vector if vector else _init_json)(conn)
    return conn


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """A pool ``reset`` that sends nothing (asyncpg still rolls back an open transaction)."""


async def create_pool(
    settings: Settings,
    application_name: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    url: str | None = None,
    vector: bool = False,
    reset_sessions: bool = True,
    keep_idle: bool = False,
    command_timeout: float | None = None,
) -> asyncpg.Pool:
    """A pool; ``vector=True`` registers pgvector's codec on each connection.

    ``reset_sessions=False`` skips asyncpg's reset on every release (``SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``), one round trip each time,
    for pools whose users leave no session state behind (an open transaction is still rolled
    back). The worker's claim paid it on every batch: measured, it was a third of the claim's
    latency (BENCHMARKS.md). ``keep_idle=True`` never closes a connection for being idle
    (asyncpg's default closes it after 300 s), so a burst after a quiet spell does not wait
    for new backends. ``command_timeout`` bounds every statement: one that times out is
    cancelled, and its connection closed if the cancellation is not acknowledged within as
    long again (asyncpg), so a connection the network silently dropped fails instead of
    waiting for TCP to give up (about 15 minutes on Linux).
    """
    pool = await asyncpg.create_pool(
        url or await resolve_url(settings),
        min_size=min_size,
        max_size=max_size,
        init=_init_vector if vector else _init_json,
        reset=None if reset_sessions else _keep_session,
        max_inactive_connection_lifetime=0 if keep_idle else 300.0,
        command_timeout=command_timeout,
        **connection_kwargs(settings, application_name),
    )
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close ``pool`` politely, or terminate its connections when one cannot answer: a
    connection the network dropped without a word never acknowledges the goodbye, and its
    close fails after the pool's ``command_timeout`` (or waits forever without one)."""
    try:
        await pool.close()
    except TRANSIENT:
        pool.terminate()
