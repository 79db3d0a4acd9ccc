"""A reply and its ``message_sent`` audit row commit in one transaction, under the lease: the
worker writes the row a handler's :class:`Reply` carries with the message's outcome (AGENTS.md,
"Audit on its own connection, committed with its action")."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from fleet import audit, queue
from fleet.audit import TurnAudit
from fleet.database import create_pool
from fleet.handlers import NoopHandler, Reply
from fleet.queue import ClaimedMessage, Outcome
from fleet.worker import Worker
from tests.processes import wait_until
from tests.workers import expire_lease, running


def _sent(session_id: str, message_id: int) -> TurnAudit:
    trail = TurnAudit(session_id, actor="agent:support")
    trail.event("message_sent", f"conversation:{session_id}", {"message_id": message_id})
    return trail


async def _sent_rows(conn: asyncpg.Connection) -> list[int]:
    return [
        r["m"] for r in await conn.fetch(
            "SELECT (payload ->> 'message_id')::bigint AS m FROM audit_log"
            " WHERE action = 'message_sent' ORDER BY id")
    ]


async def _state(conn: asyncpg.Connection, message_id: int) -> str:
    return await conn.fetchval("SELECT state FROM fleet.messages WHERE id = $1", message_id)


@pytest.fixture
async def worker(settings) -> AsyncIterator[Worker]:
    """A worker that is not running, with its pool: its outcome writes are called directly."""
    worker = Worker(settings, NoopHandler(), concurrency=2)
    worker.pool = await create_pool(settings, "fleet-worker", min_size=1, max_size=2)
    try:
        yield worker
    finally:
        await worker.pool.close()


async def _claimed(conn: asyncpg.Connection, session_id: str) -> ClaimedMessage:
    await conn.execute(
        "INSERT INTO conversations (session_id, user_id) VALUES ($1, 'u')", session_id)
    await queue.enqueue(conn, session_id, "hello")
    [message] = await queue.claim(conn, "w", 1, 30)
    return message


async def test_a_running_worker_commits_the_reply_and_its_row_once(settings, conn):
    class Replying(NoopHandler):
        async def handle(self, message, lease):
            return Reply("hi", trail=_sent(message.session_id, message.id))

    await conn.execute("INSERT INTO conversations (session_id, user_id) VALUES ('r1', 'u')")
    first = await queue.enqueue(conn, "r1", "one")
    second = await queue.enqueue(conn, "r1", "two")
    async with running(Worker(settings, Replying(), concurrency=2)):
        await wait_until(lambda: conn.fetchval(
            "SELECT count(*) = 2 FROM fleet.messages WHERE state = 'done'"),
            timeout=15, message="both messages done")
    assert await _sent_rows(conn) == [first, second]


async def test_a_refused_outcome_writes_no_row(worker: Worker, conn):
    """Fencing covers the row too: a zombie whose lease was taken over leaves no message_sent
    for its reply; the new owner's reply leaves exactly one."""
    zombie = await _claimed(conn, "f1")
    await expire_lease(conn, zombie.id)
    assert await queue.rescue_expired(conn) == [zombie.id]
    [owner] = await queue.claim(conn, "owner", 1, 30)

    late = Outcome(zombie.id, zombie.lease_token, "done", reply="late",
                   trail=_sent("f1", zombie.id))
    assert await worker._write_outcomes([late], 0) == (set(), [])
    assert await _sent_rows(conn) == []

    mine = Outcome(owner.id, owner.lease_token, "done", reply="mine", trail=_sent("f1", owner.id))
    assert await worker._write_outcomes([mine], 0) == ({owner.id}, [])
    assert await _sent_rows(conn) == [owner.id]
    assert await conn.fetchval("SELECT reply FROM fleet.messages WHERE id = $1", owner.id) == "mine"


async def test_a_lost_connection_loses_both_and_the_retry_writes_both(
    worker: Worker, conn, monkeypatch
):
    """The connection drops after the row was inserted, before the commit: neither the reply
    nor the row is stored, the outcome goes back to the pending list, and the next call writes
    both once."""
    message = await _claimed(conn, "l1")
    real_insert = audit.insert

    async def insert_then_drop(db, trails):
        await real_insert(db, trails)
        raise ConnectionResetError("connection lost before the commit")

    monkeypatch.setattr(audit, "insert", insert_then_drop)
    worker._pending = [Outcome(message.id, message.lease_token, "done", reply="hi",
                               trail=_sent("l1", message.id))]
    with pytest.raises(ConnectionResetError):
        await worker._finish_and_claim(0)
    assert await _state(conn, message.id) == "running"
    assert await _sent_rows(conn) == []
    assert [o.message_id for o in worker._pending] == [message.id]

    monkeypatch.setattr(audit, "insert", real_insert)
    assert await worker._finish_and_claim(0) == []
    assert await _state(conn, message.id) == "done"
    assert await _sent_rows(conn) == [message.id]


async def test_a_row_the_table_refuses_does_not_cost_the_reply(worker: Worker, conn):
    """An audit failure never costs a turn its reply: the row is refused in a savepoint (here
    its conversation does not exist), counted, and the reply commits."""
    from fleet import metrics

    message = await _claimed(conn, "c1")
    before = metrics.AUDIT_WRITE_FAILURES._value.get()
    orphan = _sent("no-such-conversation", message.id)
    outcome = Outcome(message.id, message.lease_token, "done", reply="hi", trail=orphan)
    assert await worker._write_outcomes([outcome], 0) == ({message.id}, [])
    assert await _state(conn, message.id) == "done"
    assert await _sent_rows(conn) == []
    assert metrics.AUDIT_WRITE_FAILURES._value.get() == before + 1
