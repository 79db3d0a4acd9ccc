"""Chaos from what handlers and people do, in one process: per-session order and the queue's
other invariants hold while everything that moves a message happens at once.

Five producers enqueue into ten shared sessions (single messages, two-message transactions
under READ COMMITTED and REPEATABLE READ, batches over two sessions). Three workers claim:
their handlers fail now and then (retries, some messages ``dead``), park some turns for a
decision that a decider task gives or cancels, and one worker stops heartbeating while its
handler stalls past the lease (its messages are taken over, its late writes refused). A
canceller cancels queued messages and asks running ones to stop. Meanwhile a sampler checks
that no session ever has two heads or two running messages. Afterwards:

* every message is finished (``done`` with its reply, ``dead`` or ``cancelled``);
* per-session order held for each producer's messages (a producer's messages of one session
  are enqueued one after another, so they must run in that order), and no two messages of a
  session ran at once;
* PostgreSQL detected no deadlock (the scratch script this test was made from caught a
  heartbeat and a finish of one worker locking each other's messages; queries.sql, heartbeat.
  Two runs of this shorter test on that code saw none: the tests in test_queue.py are the
  ones that pin it);
* each kind of chaos happened (so the checks above were not passed by a quiet run).

The suite is ``slow``; it runs in CI.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from fleet import queue
from fleet.handlers import Lease, NoopHandler, Parked, Reply
from fleet.queue import ClaimedMessage
from fleet.settings import Settings
from fleet.worker import Worker
from tests.processes import wait_until
from tests.session_order import sessions_with_two_heads

pytestmark = pytest.mark.slow

SECONDS = 12.0
SESSIONS = [f"s{i}" for i in range(10)]


class _Chaotic(NoopHandler):
    """Replies after a few ms; fails 8% of attempts, parks 5% of first turns, and (``stall``)
    sleeps past the lease in 5%."""

    def __init__(self, seed: int, parked: set[int], stall: float = 0.0) -> None:
        super().__init__()
        self.random = random.Random(seed)
        self.parked = parked
        self.stall = stall

    async def handle(self, message: ClaimedMessage, lease: Lease) -> Reply | Parked:
        if self.stall and self.random.random() < 0.05:
            await asyncio.sleep(self.stall)
        else:
            await asyncio.sleep(self.random.random() * 0.004)
        if self.random.random() < 0.08:
            raise RuntimeError("chaos: the handler failed")
        if message.id not in self.parked and self.random.random() < 0.05:
            async with lease.transaction() as conn:
                assert await queue.park(conn, message.id, lease.token)
            self.parked.add(message.id)
            return Parked("chaos")
        return Reply(f"ok {message.id}")


class _StoppedHeartbeat(Worker):
    """A worker whose heartbeat has stopped (a stalled process): its leases run out."""

    async def _heartbeat_loop(self) -> None:
        await asyncio.Event().wait()


async def _produce(url: str, producer: int, until: float, tally: Counter[str]) -> None:
    conn = await asyncpg.connect(url)
    rnd = random.Random(producer)
    numbers = itertools.count()

    def new(session: str) -> dict[str, Any]:
        # One in three gets a single attempt, so that some messages die for sure.
        return {"session_id": session, "body": "m", "max_attempts": rnd.choice((1, 3, 3)),
                "metadata": {"producer": producer, "n": next(numbers)}}

    async def enqueue(session: str) -> None:
        message = new(session)
        await queue.enqueue(conn, session, "m", metadata=message["metadata"],
                            max_attempts=message["max_attempts"])

    try:
        while asyncio.get_running_loop().time() < until:
            first, second = rnd.sample(SESSIONS, 2)
            kind = rnd.random()
            if kind < 0.4:
                await enqueue(first)
                tally["enqueued"] += 1
            elif kind < 0.7:
                isolation = "repeatable_read" if rnd.random() < 0.3 else "read_committed"
                try:
                    async with conn.transaction(isolation=isolation):
                        await enqueue(first)
                        await asyncio.sleep(rnd.random() * 0.003)
                        await enqueue(first)
                except asyncpg.SerializationError:
                    tally["rolled back"] += 1
                    continue
                tally["enqueued"] += 2
                tally[f"in {isolation} transactions"] += 2
            else:
                await queue.enqueue_many(conn, [new(s) for s in sorted({first, second})])
                tally["enqueued"] += 2
            await asyncio.sleep(rnd.random() * 0.004)
    finally:
        await conn.close()


Act = Callable[[asyncpg.Connection, random.Random], Awaitable[None]]


async def _now_and_then(url: str, stop: asyncio.Event, seed: int, act: Act) -> None:
    """``act`` every 0-50 ms until ``stop``: a person at the queue."""
    conn = await asyncpg.connect(url)
    rnd = random.Random(seed)
    try:
        while not stop.is_set():
            await act(conn, rnd)
            await asyncio.sleep(rnd.random() * 0.05)
    finally:
        await conn.close()


def _canceller(tally: Counter[str]) -> Act:
    """Cancels a queued message, or asks a running one to stop."""

    async def cancel(conn: asyncpg.Connection, rnd: random.Random) -> None:
        row = await conn.fetchrow(
            "SELECT id, state FROM fleet.messages WHERE state IN ('queued', 'running')"
            " ORDER BY random() LIMIT 1")
        if row and row["state"] == "queued":
            tally["cancelled queued"] += await queue.cancel(conn, row["id"], "chaos")
        elif row:
            tally["asked to stop"] += await queue.request_cancel(conn, row["id"], "chaos")

    return cancel


def _approver(tally: Counter[str]) -> Act:
    """Stands in for approvers: resumes half the parked messages it sees, cancels a few."""

    async def decide(conn: asyncpg.Connection, rnd: random.Random) -> None:
        for row in await conn.fetch(
                "SELECT id FROM fleet.messages WHERE state = 'awaiting_approval'"):
            if rnd.random() < 0.5:
                tally["resumed"] += await queue.unpark(conn, row["id"])
            elif rnd.random() < 0.1:
                tally["cancelled parked"] += await queue.cancel(conn, row["id"], "chaos")

    return decide


async def _sample_running(url: str, stop: asyncio.Event) -> set[str]:
    """Sessions seen with two running messages at once."""
    seen: set[str] = set()
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            seen.update(await conn.fetchval(
                "SELECT coalesce(array_agg(session_id), '{}') FROM (SELECT session_id"
                " FROM fleet.messages WHERE state = 'running' GROUP BY 1 HAVING count(*) > 1) t"))
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    return seen


async def _deadlocks(conn: asyncpg.Connection) -> int:
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchval(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")


async def test_session_order_holds_through_retries_parks_cancels_and_takeovers(
    settings: Settings, conn: asyncpg.Connection, db_url: str
):
    settings = settings.model_copy(update={
        "fleet_lease_seconds": 1.0, "fleet_poll_interval": 0.2,
        "fleet_retry_base_seconds": 0.02, "fleet_retry_max_seconds": 0.1})
    deadlocks_before = await _deadlocks(conn)
    tally: Counter[str] = Counter()
    parked: set[int] = set()
    workers = [
        Worker(settings, _Chaotic(1, parked), concurrency=6, claim_batch=3),
        Worker(settings, _Chaotic(2, parked), concurrency=6, claim_batch=3),
        _StoppedHeartbeat(settings, _Chaotic(3, parked, stall=1.6), concurrency=4,
                          claim_batch=2),
    ]
    stop = asyncio.Event()
    watchers = [asyncio.create_task(sessions_with_two_heads(db_url, stop, every=0.005)),
                asyncio.create_task(_sample_running(db_url, stop))]
    people = [asyncio.create_task(_now_and_then(db_url, stop, 7, _canceller(tally))),
              asyncio.create_task(_now_and_then(db_url, stop, 8, _approver(tally)))]
    running = [asyncio.create_task(worker.run()) for worker in workers]
    try:
        until = asyncio.get_running_loop().time() + SECONDS
        await asyncio.gather(*(_produce(db_url, p, until, tally) for p in range(5)))
        await wait_until(lambda: conn.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM fleet.messages"
            " WHERE state IN ('queued', 'running', 'awaiting_approval'))"),
            timeout=120, message="every message finished")
    finally:
        stop.set()
        for worker in workers:
            worker.stop()
        await asyncio.gather(*running, *people)
    two_heads, two_running = [await watcher for watcher in watchers]
    assert not two_heads and not two_running

    states = dict(await conn.fetch("SELECT state, count(*) FROM fleet.messages GROUP BY 1"))
    assert sum(states.values()) == tally["enqueued"]
    assert set(states) <= {"done", "dead", "cancelled"}
    assert await conn.fetchval(
        "SELECT count(*) FROM fleet.messages WHERE state = 'done' AND reply IS NULL") == 0
    out_of_order = await conn.fetch("""
        SELECT a.id AS earlier, b.id AS later, a.session_id
        FROM fleet.messages a JOIN fleet.messages b
          ON a.session_id = b.session_id AND a.metadata->'producer' = b.metadata->'producer'
         AND (a.metadata->>'n')::int < (b.metadata->>'n')::int
        WHERE a.claimed_at IS NOT NULL AND b.claimed_at < a.finished_at""")
    assert not out_of_order, [dict(r) for r in out_of_order]
    ordered_pairs = await conn.fetchval("""
        SELECT count(*) FROM fleet.messages a JOIN fleet.messages b
          ON a.session_id = b.session_id AND a.metadata->'producer' = b.metadata->'producer'
         AND (a.metadata->>'n')::int < (b.metadata->>'n')::int
        WHERE a.claimed_at IS NOT NULL AND b.claimed_at IS NOT NULL""")
    overlapping = await conn.fetchval("""
        SELECT count(*) FROM fleet.messages a JOIN fleet.messages b
          ON a.session_id = b.session_id AND a.id < b.id
         AND a.claimed_at < b.finished_at AND b.claimed_at < a.finished_at""")
    assert overlapping == 0
    assert await _deadlocks(conn) == deadlocks_before

    happened = dict(await conn.fetchrow("""
        SELECT count(*) FILTER (WHERE attempts > 1) AS retried,
               count(*) FILTER (WHERE state = 'dead') AS dead,
               count(*) FILTER (WHERE takeovers > 0) AS taken_over
        FROM fleet.messages"""))
    print(f"\n{states} {happened} {dict(tally)} parked {len(parked)},"
          f" {ordered_pairs} ordered pairs checked")
    assert ordered_pairs > 1000
    assert all(happened.values()), happened
    assert parked and tally["resumed"] and tally["cancelled queued"]
    assert tally["in repeatable_read transactions"]
