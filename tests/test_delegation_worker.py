"""A delegation's child turn, run inline by its parent's worker, is a message in flight like any
other: cancelling it stops it, cancelling the parent stops both (real worker, real database)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from fleet import queue
from fleet.cancellation import cancel_message
from fleet.database import create_pool
from fleet.handlers import HandlerResult, Lease, Reply
from fleet.queue import ClaimedMessage
from fleet.worker import Worker
from tests.processes import wait_until


class ParentChildHandler:
    """``parent`` delegates to a child message it runs inline; ``child`` works for a minute."""

    name = "test-delegation"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.child_result: bool | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def handle(self, message: ClaimedMessage, lease: Lease) -> HandlerResult:
        if message.body == "parent":
            child = await queue.enqueue(self.pool, f"{message.session_id}/child", "child",
                                        dedupe_key=f"child-of-{message.id}")
            self.child_result = await lease.run_inline(child)  # type: ignore[attr-defined]
            return Reply("parent saw its child finish")
        await asyncio.sleep(60)
        return Reply("child done")


@pytest.fixture
async def fleet_with_children(settings, db_url):
    pool = await create_pool(settings, "fleet-test", url=db_url, min_size=1, max_size=4)
    handler = ParentChildHandler(pool)
    worker = Worker(settings, handler, concurrency=1)  # the producer's only slot: the parent
    task = asyncio.create_task(worker.run())
    yield pool, handler, worker
    worker.stop()
    await asyncio.wait_for(task, 30)
    await pool.close()


async def _running_child(conn: asyncpg.Connection) -> int:
    async def child() -> int | None:
        return await conn.fetchval(
            "SELECT id FROM fleet.messages WHERE body = 'child' AND state = 'running'")

    return await wait_until(child, timeout=30, message="the child turn to run")


async def test_cancelling_the_running_child_stops_it_and_the_parent_goes_on(
        conn, fleet_with_children) -> None:
    pool, handler, worker = fleet_with_children
    parent = await queue.enqueue(conn, "deleg-1", "parent")
    child = await _running_child(conn)
    assert child in worker.in_flight  # in flight like any message, beside its parent

    assert await cancel_message(pool, child) == "cancel_requested"

    async def finished() -> bool:
        return await conn.fetchval(
            "SELECT count(*) = 2 FROM fleet.messages WHERE state IN ('done', 'cancelled')")

    await wait_until(finished, timeout=30, message="parent and child to finish")
    states = dict(await conn.fetch("SELECT id, state FROM fleet.messages"))
    assert states == {parent: "done", child: "cancelled"}
    assert handler.child_result is True


async def test_cancelling_the_parent_stops_its_running_child_too(
        conn, fleet_with_children) -> None:
    pool, _handler, worker = fleet_with_children
    parent = await queue.enqueue(conn, "deleg-2", "parent")
    child = await _running_child(conn)

    await cancel_message(pool, parent)

    async def finished() -> bool:
        return await conn.fetchval(
            "SELECT count(*) = 2 FROM fleet.messages WHERE state = 'cancelled'")

    await wait_until(finished, timeout=30, message="parent and child to be cancelled")
    assert not worker.held and not worker.in_flight  # nothing left heartbeated
    rows = await conn.fetch("SELECT id, state, lease_owner FROM fleet.messages ORDER BY id")
    assert [(r["id"], r["state"]) for r in rows] == [(parent, "cancelled"), (child, "cancelled")]
