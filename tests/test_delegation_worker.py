"""A delegation's child turn, run inline by its parent's worker, is a message in flight like any
other: cancelling it stops it, cancelling the parent stops both (real worker, real database).
And the Delegator waits for a child's outcome by LISTENing, not by reading it every 50 ms."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from fleet import queue
from fleet.audit import TurnAudit
from fleet.cancellation import cancel_message
from fleet.database import create_pool
from fleet.delegation import Delegator
from fleet.handlers import HandlerResult, Lease, NoopHandler, Reply
from fleet.queue import ClaimedMessage
from fleet.settings import Settings
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
            assert lease.run_inline is not None
            self.child_result = await lease.run_inline(child)
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


# -- how the Delegator waits for the child's outcome ----------------------------------------------

def _turn(message_id: int, session: str, lease: Lease | None) -> SimpleNamespace:
    """What the Delegator reads of a turn."""
    return SimpleNamespace(message_id=message_id, session_id=session, customer_id=None,
                           variables={}, depth=0, lease=lease,
                           audit=TurnAudit(session, actor="agent:support"))


def _count_reads(monkeypatch: pytest.MonkeyPatch, pool: asyncpg.Pool) -> list[float]:
    """When the Delegator read the child message through ``pool`` (``queue.get_message``)."""
    reads: list[float] = []
    real = queue.get_message

    async def counted(db, message_id):  # type: ignore[no-untyped-def]
        if db is pool:
            reads.append(time.monotonic())
        return await real(db, message_id)

    monkeypatch.setattr(queue, "get_message", counted)
    return reads


class DelegatingHandler:
    """``parent`` asks a sub-agent through the Delegator (its child runs inline, here);
    ``child`` takes ``CHILD_SECONDS``."""

    name = "test-delegator"
    CHILD_SECONDS = 0.3

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.delegator = Delegator(settings, lambda: pool)
        self.answers: list[str] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self.delegator.close()

    async def handle(self, message: ClaimedMessage, lease: Lease) -> HandlerResult:
        if message.body == "parent":
            turn = _turn(message.id, message.session_id, lease)
            self.answers.append(await self.delegator(turn, "support", "support", "child", "c1"))
            return Reply("parent done")
        await asyncio.sleep(self.CHILD_SECONDS)
        return Reply("child done")


async def test_an_inline_child_is_read_once_it_ran_and_once_its_outcome_is_written(
        conn, settings, db_url, monkeypatch) -> None:
    pool = await create_pool(settings, "fleet-test", url=db_url, min_size=1, max_size=4)
    reads = _count_reads(monkeypatch, pool)
    handler = DelegatingHandler(settings, pool)
    worker = Worker(settings, handler, concurrency=1)  # the child can only run inline
    task = asyncio.create_task(worker.run())
    try:
        parent = await queue.enqueue(conn, "deleg-inline", "parent")

        async def done() -> bool:
            return await conn.fetchval(
                "SELECT state = 'done' FROM fleet.messages WHERE id = $1", parent)

        await wait_until(done, timeout=30, message="the parent to finish")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await pool.close()
    assert handler.answers == ["child done"]
    # queued (then run inline); running or done right after; at most: LISTEN opened, read
    # again, and the read its outcome's notification prompted.
    assert 2 <= len(reads) <= 4, reads


async def _delegate_to_a_remote_child(
        conn, settings, db_url, monkeypatch, *, delegator_for: Any, child_seconds: float,
        session: str) -> SimpleNamespace:
    """A parent without a lease (so no inline run) delegates; a noop worker runs the child.
    What the wait did: the answer, when it read the child, how long it took, whether it
    listened, and the LISTEN connections open when it returned. ``delegator_for(pool)`` gives
    the Delegator under test, reading through ``pool``."""
    pool = await create_pool(settings, "fleet-test", url=db_url, min_size=1, max_size=4)
    reads = _count_reads(monkeypatch, pool)
    worker = Worker(settings, NoopHandler(work_delay=child_seconds), concurrency=1)
    task = asyncio.create_task(worker.run())
    delegator = delegator_for(pool)
    try:
        started = time.monotonic()
        answer = await delegator(_turn(10**9 + len(session), session, None), "support",
                                 "support", "child", "c1")
        elapsed = time.monotonic() - started
        listened = delegator.outcomes.listening
        listeners = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'fleet-delegation-listen'")
    finally:
        await delegator.close()
        worker.stop()
        await asyncio.wait_for(task, 30)
        await pool.close()
    return SimpleNamespace(answer=answer, reads=[round(r - started, 2) for r in reads],
                           elapsed=elapsed, listened=listened, listeners=listeners)


async def test_a_child_another_worker_runs_is_read_when_its_outcome_is_notified(
        conn, settings, db_url, monkeypatch) -> None:
    """No inline run (the parent's lease has none): the child's worker writes its outcome and
    the waiting parent hears it on fleet_outcome. Polling every 50-500 ms read the child about
    nine times in its 2.5 s; the fallback poll alone would answer at 4 s, not right after."""
    child_seconds = 2.5
    wait = await _delegate_to_a_remote_child(
        conn, settings, db_url, monkeypatch, delegator_for=lambda pool: Delegator(
            settings, lambda: pool), child_seconds=child_seconds, session="deleg-remote")
    assert wait.answer == "ok"
    assert wait.listened and wait.listeners == 1
    assert len(wait.reads) <= 5, wait.reads
    assert wait.elapsed < child_seconds + 1.1, wait.elapsed  # heard, not the 2 s fallback poll


async def test_a_poll_only_workers_delegation_polls_and_opens_no_listen_connection(
        conn, settings, db_url, monkeypatch) -> None:
    """``fleet worker --poll-only`` (PgBouncer's transaction pooling, where LISTEN hears
    nothing): the flag reaches the agent handler's Delegator, whose waits poll the child
    (backing off from 50 to 500 ms) and never open ``fleet-delegation-listen``."""
    from fleet.handlers import build_handler

    handler: Any = build_handler("agent", settings, poll_only=True)

    def the_handlers_delegator(pool: asyncpg.Pool) -> Delegator:
        handler.pool = pool  # what its start would open; the Delegator reads through it
        return handler.delegator

    wait = await _delegate_to_a_remote_child(
        conn, settings, db_url, monkeypatch, delegator_for=the_handlers_delegator,
        child_seconds=1.0, session="deleg-poll")
    assert wait.answer == "ok"
    assert not wait.listened and wait.listeners == 0
    assert len(wait.reads) >= 4, wait.reads  # polled while the child ran: 50, 100, 200, 400 ms
