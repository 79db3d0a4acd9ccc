"""`fleet.Client`: transactional enqueue, waiting for replies, cancellation, listing."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

import fleet
from fleet.errors import InvalidInput, NotFound
from fleet.handlers import NoopHandler
from fleet.worker import Worker


@pytest.fixture
async def running_worker(settings):
    worker = Worker(settings, NoopHandler(work_delay=0.01), concurrency=4)
    task = asyncio.create_task(worker.run())
    yield worker
    worker.stop()
    await asyncio.wait_for(task, 30)


async def test_enqueue_inside_a_rolled_back_transaction_enqueues_nothing(settings, db_url):
    async with fleet.Client(db_url, settings=settings) as client:
        async with client.pool.acquire() as conn:
            tr = conn.transaction()
            await tr.start()
            message_id = await client.enqueue("s1", "never sent", conn=conn)
            await tr.rollback()
        with pytest.raises(NotFound):
            await client.get_message(message_id)
        assert await client.list_messages() == []


async def test_enqueue_on_the_callers_own_plain_connection(settings, db_url, running_worker):
    """The contract's `conn`: the caller's own asyncpg connection (no codecs of ours), in its
    transaction: rolled back, nothing; committed, processed, metadata and variables kept."""
    async with fleet.Client(db_url, settings=settings) as client:
        own = await asyncpg.connect(db_url)
        try:
            async with own.transaction():
                kept = await client.enqueue("own", "hello", conn=own,
                                            metadata={"tenant": "acme"}, variables={"u": 1})
            tr = own.transaction()
            await tr.start()
            dropped = await client.enqueue("own", "never", conn=own, metadata={"a": 1})
            await tr.rollback()
        finally:
            await own.close()
        reply = await client.wait_for_reply(kept, timeout=20)
        assert reply.state == "done" and reply.reply == "ok"
        message = await client.get_message(kept)
        assert message.metadata == {"tenant": "acme"} and message.variables == {"u": 1}
        with pytest.raises(NotFound):
            await client.get_message(dropped)
        with pytest.raises(InvalidInput, match="metadata is not JSON-serialisable"):
            await client.enqueue("own", "bad", metadata={"when": object()})


async def test_run_sync_refuses_bad_arguments_before_enqueueing(settings, db_url):
    async with fleet.Client(db_url, settings=settings) as client:
        with pytest.raises(InvalidInput, match="timeout must not be negative"):
            await client.run_sync("rs", "never", timeout=-1)
        async with client.pool.acquire() as conn, conn.transaction():
            with pytest.raises(InvalidInput, match="run_sync takes no conn"):
                await client.run_sync("rs", "never", timeout=1, conn=conn)
        assert await client.list_messages(session_id="rs") == []


async def test_run_sync_returns_the_reply(settings, db_url, running_worker):
    async with fleet.Client(db_url, settings=settings) as client:
        reply = await client.run_sync("s1", "hello", timeout=20,
                                      metadata={"tenant": "acme"}, variables={"user": "u1"})
        assert reply.state == "done" and reply.reply == "ok"
        [message] = await client.list_messages(session_id="s1")
        assert message.id == reply.message_id
        assert message.metadata == {"tenant": "acme"} and message.variables == {"user": "u1"}


async def test_wait_for_reply_returns_the_current_state_on_timeout(settings, db_url):
    async with fleet.Client(db_url, settings=settings) as client:
        message_id = await client.enqueue("s1", "nobody is working")
        reply = await client.wait_for_reply(message_id, timeout=0.3)
        assert reply.state == "queued" and reply.reply is None


async def test_cancel_a_queued_message_lets_the_next_one_run(settings, db_url, running_worker):
    async with fleet.Client(db_url, settings=settings) as client:
        # Hold the session's head with a parked-looking long message, then cancel its follower.
        async with client.pool.acquire() as conn:
            first = await client.enqueue("s1", "first", conn=conn)
            second = await client.enqueue("s1", "second", conn=conn)
        cancelled = await client.cancel(second)
        assert cancelled.state in ("cancelled", "done")
        done = await client.wait_for_reply(first, timeout=20)
        assert done.state == "done"
        with pytest.raises(InvalidInput, match="already"):
            await client.cancel(first)
        with pytest.raises(NotFound):
            await client.cancel(999_999)


async def test_cancel_queued_behind_a_busy_head_is_immediate(settings, db_url):
    async with fleet.Client(db_url, settings=settings) as client:
        first = await client.enqueue("s1", "head")
        second = await client.enqueue("s1", "behind")
        reply = await client.cancel(second)
        assert reply.state == "cancelled"
        assert (await client.get_message(first)).state == "queued"


async def test_cancel_a_running_message_stops_it_at_once(settings, db_url):
    """The noop handler cannot stop between steps: its task is cancelled as soon as the worker
    hears the request (NOTIFY fleet_cancel, else its next heartbeat)."""
    worker = Worker(settings, NoopHandler(work_delay=60), concurrency=2)
    task = asyncio.create_task(worker.run())
    try:
        async with fleet.Client(db_url, settings=settings) as client:
            slow = await client.enqueue("s1", "takes a minute")
            after = await client.enqueue("s1", "next in line")
            for _ in range(100):
                if (await client.get_message(slow)).state == "running":
                    break
                await asyncio.sleep(0.1)
            reply = await client.cancel(slow, reason="customer hung up")
            assert reply.state in ("running", "cancelled")  # asked; stopped at once or soon
            finished = await client.wait_for_reply(slow, timeout=10)
            assert finished.state == "cancelled"
            assert finished.error == "cancelled while running: customer hung up"
            assert (await client.get_message(after)).state in ("queued", "running")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def test_a_message_id_that_is_not_one_is_refused_by_name(settings, db_url):
    async with fleet.Client(db_url, settings=settings) as client:
        for bad in ("abc", 2**70, 0, True):
            with pytest.raises(InvalidInput, match="a message id is an integer from 1 to"):
                await client.get_message(bad)
        with pytest.raises(InvalidInput, match="a message id is an integer from 1 to"):
            await client.wait_for_reply("abc", timeout=1)
        with pytest.raises(InvalidInput, match="a message id is an integer from 1 to"):
            await client.cancel(-5)


async def test_fleet_max_attempts_is_the_default_max_attempts(settings, db_url):
    configured = settings.model_copy(update={"fleet_max_attempts": 2})
    async with fleet.Client(db_url, settings=configured) as client:
        default = await client.enqueue("ma", "one")
        given = await client.enqueue("ma", "two", max_attempts=7)
        assert (await client.get_message(default)).max_attempts == 2
        assert (await client.get_message(given)).max_attempts == 7
