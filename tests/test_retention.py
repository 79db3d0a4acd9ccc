"""Retention of finished messages: ``fleet prune`` / ``fleet.queue.prune_finished``."""

from __future__ import annotations

import json
from datetime import timedelta

import asyncpg
import pytest

from fleet import queue
from fleet.errors import InvalidInput
from tests.processes import fleet


async def _age(conn: asyncpg.Connection, message_id: int, days: int, state: str) -> None:
    """Make a message look enqueued and finished ``days`` ago, in ``state``."""
    await conn.execute(
        """UPDATE fleet.messages
           SET state = $3, reply = CASE WHEN $3 = 'done' THEN 'ok' END,
               error = CASE WHEN $3 <> 'done' THEN 'gone' END, is_head = false,
               enqueued_at = now() - make_interval(days => $2::int) - interval '1 hour',
               finished_at = now() - make_interval(days => $2::int)
           WHERE id = $1""",
        message_id, days, state,
    )


async def test_prune_deletes_only_finished_messages_older_than_the_cutoff(conn):
    """Old done, dead and cancelled messages go, in several batches; recent finished ones,
    live ones (however old) and one an approval refers to stay. A pruned dedupe key can be
    enqueued again."""
    ids = {}
    for name in ("old_done", "old_dead", "old_cancelled", "old_approved", "recent_done",
                 "old_queued", "old_keyed", "live_head", "live_next"):
        session = "live" if name.startswith("live") else name
        key = "order-4429" if name == "old_keyed" else None
        ids[name] = await queue.enqueue(conn, session, name, dedupe_key=key)
    for name, state in (("old_done", "done"), ("old_dead", "dead"),
                        ("old_cancelled", "cancelled"), ("old_approved", "done"),
                        ("old_keyed", "done")):
        await _age(conn, ids[name], 10, state)
    await _age(conn, ids["recent_done"], 1, "done")
    await conn.execute("UPDATE fleet.messages SET enqueued_at = now() - interval '30 days'"
                       " WHERE id = $1", ids["old_queued"])
    await conn.execute("INSERT INTO conversations (session_id, user_id)"
                       " VALUES ('old_approved', 'c1')")
    await conn.execute(
        """INSERT INTO run_states (conversation_id, message_id, tool, arguments, call_id,
               state, status, decision, decided_by, decided_at, expires_at)
           VALUES ('old_approved', $1, 'issue_refund', '{}', 'c1', '{}', 'approved',
                   'approved', 'ana', now(), now())""",
        ids["old_approved"],
    )

    older_than = timedelta(days=5)
    assert await queue.prune_finished(conn, older_than, batch=2) == 4
    left = {r["id"] for r in await conn.fetch("SELECT id FROM fleet.messages")}
    assert left == {ids[n] for n in ("old_approved", "recent_done", "old_queued", "live_head",
                                     "live_next")}
    # Sessions stay (their metadata is the conversation's), and the queue still works.
    assert await conn.fetchval("SELECT count(*) FROM fleet.sessions WHERE session_id = 'old_done'")
    claimed = {m.id for m in await queue.claim(conn, "w", 10, 30)}
    assert claimed == {ids["old_queued"], ids["live_head"]}
    # The key's message is gone, so the key is free again.
    again = await queue.enqueue(conn, "old_keyed", "again", dedupe_key="order-4429")
    assert again not in ids.values()
    assert await queue.prune_finished(conn, older_than) == 0
    with pytest.raises(InvalidInput, match="batch"):
        await queue.prune_finished(conn, older_than, batch=0)


class _CountingCalls:
    """A connection that counts the statements prune_finished sends (one per batch)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.calls = 0

    async def fetchrow(self, *args: object) -> asyncpg.Record | None:
        self.calls += 1
        return await self.conn.fetchrow(*args)


async def test_prune_stops_at_messages_enqueued_after_the_cutoff(conn):
    """Batches walk ids from the oldest and stop at the first batch enqueued wholly after the
    cutoff, rather than reading every newer message."""
    old = await queue.enqueue(conn, "s-old", "old")
    await _age(conn, old, 10, "done")
    newer = [await queue.enqueue(conn, f"s-{i}", "new") for i in range(6)]
    counting = _CountingCalls(conn)
    pruned = await queue.prune_finished(
        counting, timedelta(days=5), batch=2  # type: ignore[arg-type]
    )
    assert pruned == 1
    # [old, newer[0]], then [newer[1], newer[2]], enqueued wholly after the cutoff: stop.
    assert counting.calls == 2
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == len(newer)


async def test_fleet_prune_command(conn, fleet_env):
    old = await queue.enqueue(conn, "cli-old", "old")
    await _age(conn, old, 40, "done")
    await queue.enqueue(conn, "cli-new", "new")
    done = fleet("prune", "--older-than", "30", "--json", env=fleet_env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["pruned"] == 1 and report["older_than_days"] == 30
    done = fleet("prune", "--older-than", "30", env=fleet_env)
    assert done.returncode == 0 and "pruned 0 messages" in done.stdout
    for bad in ("0", "-3", "many", "40000"):
        done = fleet("prune", "--older-than", bad, env=fleet_env)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr and "older-than" in done.stderr
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 1
