"""In-process workers for tests: a ``fleet.worker.Worker`` running in a task for a block."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from fleet.worker import Worker
from tests.processes import wait_until


@asynccontextmanager
async def running(worker: Worker, stop_timeout: float = 30) -> AsyncIterator[Worker]:
    """The worker running in a task for the block; stopped (and awaited) after it."""
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, stop_timeout)


async def listening(conn: asyncpg.Connection) -> None:
    """Until a worker's LISTEN connection is up (its start-up, pool included, is done)."""
    await wait_until(lambda: conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fleet-listener'"),
        message="the worker's LISTEN connection")


async def expire_lease(db: asyncpg.Connection | asyncpg.Pool, message_id: int) -> None:
    """The message's worker stopped heartbeating: its lease ran out a second ago, and the next
    ``rescue_expired`` takes it back."""
    await db.execute(
        "UPDATE fleet.messages SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        message_id,
    )
