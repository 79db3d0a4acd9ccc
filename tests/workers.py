"""In-process workers for tests: a ``fleet.worker.Worker`` running in a task for a block."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fleet.worker import Worker


@asynccontextmanager
async def running(worker: Worker, stop_timeout: float = 30) -> AsyncIterator[Worker]:
    """The worker running in a task for the block; stopped (and awaited) after it."""
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, stop_timeout)
