"""``fleet_outcome``: sent only for messages someone waits on (migration 0017), naming them.

A waiter marks its message (``queue.await_reply``) before it reads it; finishing, parking or
cancelling a marked message notifies with its id, and nothing else does."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

import fleet
from fleet import queue
from fleet.handlers import NoopHandler
from fleet.outcomes import OutcomeWaits, outcome_ids
from fleet.worker import Worker
from tests.mcp_process import _admin
from tests.urls import as_login


@pytest.fixture
async def heard(db_url: str) -> AsyncIterator[list[str]]:
    """The payloads of the fleet_outcome notifications sent while the test runs."""
    payloads: list[str] = []
    listener = await asyncpg.connect(db_url)
    await listener.add_listener("fleet_outcome", lambda _c, _p, _ch, pl: payloads.append(pl))
    yield payloads
    await listener.close()


async def _settle() -> None:
    await asyncio.sleep(0.3)  # notifications are delivered after the sender's commit


def test_a_payload_names_ids_or_none() -> None:
    assert outcome_ids("7") == {7}
    assert outcome_ids("7,12,9000000000") == {7, 12, 9000000000}
    assert outcome_ids("") is None
    assert outcome_ids("not,ids") is None


async def test_a_notification_wakes_the_waits_on_the_messages_it_names() -> None:
    waits = OutcomeWaits()
    with waits.waiting_on(1) as one, waits.waiting_on(1) as one_again, \
            waits.waiting_on(2) as two:
        waits.notified("1,3")
        assert one.is_set() and one_again.is_set() and not two.is_set()
        one.clear()
        waits.notified("")  # names none: every wait reads its message
        assert one.is_set() and two.is_set()
    two.clear()
    waits.notified("2")  # that wait has ended: nothing is kept for it
    assert not two.is_set()


async def test_parking_notifies_only_a_message_someone_waits_on(
    conn: asyncpg.Connection, heard: list[str]
) -> None:
    await queue.enqueue(conn, "quiet", "x")
    await queue.enqueue(conn, "waited", "x")
    quiet, waited = sorted(await queue.claim(conn, "w", 2, 30), key=lambda m: m.session_id)
    await queue.await_reply(conn, waited.id)
    assert await queue.park(conn, quiet.id, quiet.lease_token)
    await _settle()
    assert heard == []
    assert await queue.park(conn, waited.id, waited.lease_token)
    await _settle()
    assert heard == [str(waited.id)]


async def test_cancelling_a_waited_on_message_notifies_it(
    conn: asyncpg.Connection, heard: list[str]
) -> None:
    quiet = await queue.enqueue(conn, "c1", "x")
    waited = await queue.enqueue(conn, "c2", "x")
    await queue.await_reply(conn, waited)
    for message_id in (quiet, waited):
        assert await conn.fetchval(queue.SQL["cancel"], message_id, "no longer needed")
    await _settle()
    assert heard == [str(waited)]


async def test_marking_a_finished_message_writes_nothing(conn: asyncpg.Connection) -> None:
    """Its waiter reads the outcome at once; a mark would only cost a write."""
    await queue.enqueue(conn, "f", "x")
    [message] = await queue.claim(conn, "w", 1, 30)
    finished = await queue.finish(conn, [queue.Outcome(
        message_id=message.id, lease_token=message.lease_token, state="done", reply="ok")])
    assert finished == {message.id}
    version = "SELECT reply_awaited, xmin::text AS xmin FROM fleet.messages WHERE id = $1"
    before = await conn.fetchrow(version, message.id)
    await queue.await_reply(conn, message.id)
    after = await conn.fetchrow(version, message.id)
    assert after["reply_awaited"] is False and after["xmin"] == before["xmin"]


async def test_too_many_ids_for_a_payload_send_an_empty_one(
    conn: asyncpg.Connection, heard: list[str]
) -> None:
    """A payload must stay under 8,000 bytes: past that the notification names no id, which
    every waiter takes as "read yours"."""
    await conn.execute(
        "SELECT fleet.notify_outcome(ARRAY(SELECT 1000000000000000000 + g"
        " FROM generate_series(1, 500) AS g))")
    await conn.execute("SELECT fleet.notify_outcome(ARRAY[41, 42])")
    await conn.execute("SELECT fleet.notify_outcome('{}'), fleet.notify_outcome(NULL)")
    await _settle()
    assert heard == ["", "41,42"]


async def test_a_client_wait_is_told_by_the_notification_not_by_polling(
    settings, db_url: str, heard: list[str]
) -> None:
    """With a poll interval longer than the wait, the wait reads its message twice: at the
    start, and when a notification names it; without that notification it would end only at
    its timeout (30 s). The message nobody waits on is named by none."""
    worker = Worker(settings, NoopHandler(work_delay=0.3), concurrency=4)
    running = asyncio.create_task(worker.run())
    try:
        async with fleet.Client(db_url, settings=settings, poll_interval=120) as client:
            unwaited = await client.enqueue("unwaited", "x")
            waited = await client.enqueue("waited", "x")
            started = time.monotonic()
            reply = await client.wait_for_reply(waited, timeout=30)
            waited_for = time.monotonic() - started
            assert reply.state == "done" and reply.reply == "ok"
            assert waited_for < 20, f"the wait ended at its timeout ({waited_for:.1f} s)"
            await _settle()
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)
    named = {i for payload in heard for i in outcome_ids(payload) or ()}
    assert waited in named and unwaited not in named


async def test_a_client_whose_role_may_not_mark_polls_instead(
    settings, db_url: str, server_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A role that may read messages but not UPDATE them (here fleet_approver's) cannot mark
    what it waits on: the client says so once and its waits poll, still ending with the
    reply."""
    role = f"fleet_reader_{uuid.uuid4().hex[:8]}"
    _admin(server_url, f"CREATE ROLE {role} LOGIN IN ROLE fleet_approver")
    url = as_login(db_url, role)
    worker = Worker(settings, NoopHandler(work_delay=0.1), concurrency=4)
    running = asyncio.create_task(worker.run())
    try:
        async with fleet.Client(db_url, settings=settings) as owner:
            first, second = [await owner.enqueue(f"r{i}", "x") for i in range(2)]
        async with fleet.Client(url, settings=settings, poll_interval=0.1) as client:
            for message_id in (first, second):
                reply = await client.wait_for_reply(message_id, timeout=30)
                assert reply.state == "done" and reply.reply == "ok"
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)
        _admin(server_url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                           f" WHERE usename = '{role}'")
        _admin(server_url, f"DROP ROLE IF EXISTS {role}")
    refusals = [r for r in caplog.records if "waits for replies poll" in r.getMessage()]
    assert len(refusals) == 1 and "permission denied" in refusals[0].getMessage()
