"""``fleet.finish_and_claim``: the worker's cycle (write outcomes, claim the next batch) in one
statement and one transaction, with the same fencing, order and wake-up rules as ``finish`` and
``claim`` done separately."""

from __future__ import annotations

import asyncio
import re

import asyncpg

from fleet import queue
from fleet.outcomes import outcome_ids
from fleet.queue import Outcome
from fleet.settings import PROJECT_ROOT
from fleet.sql import queries


def _normalised(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip().rstrip(";")


def test_the_functions_claim_is_the_claim_statement() -> None:
    """The function repeats queries.sql's claim verbatim (EXPLAINed by `fleet bench queue`);
    this keeps the two from drifting apart."""
    text = (PROJECT_ROOT / "queue_sql" / "functions.sql").read_text()
    inside = text.split("-- claim: begin")[1].split("-- claim: end")[0]
    lines = inside.splitlines()[1:]
    inside = "\n".join(line for line in lines if not line.strip().startswith("--"))
    assert _normalised(inside) == _normalised(queries("queries.sql")["claim"])


def _done(message: queue.ClaimedMessage, token: int | None = None) -> Outcome:
    return Outcome(message_id=message.id, lease_token=token or message.lease_token,
                   state="done", reply="ok")


async def test_finishes_and_claims_the_promoted_successor_in_one_call(conn: asyncpg.Connection):
    first = await queue.enqueue(conn, "s1", "one")
    second = await queue.enqueue(conn, "s1", "two")
    other = await queue.enqueue(conn, "s2", "three")
    [m1, m3] = await queue.claim(conn, "w", 10, 30)
    assert (m1.id, m3.id) == (first, other)

    finished, claimed = await queue.finish_and_claim(conn, "w", 5, 30, [_done(m1)])

    assert finished == {first}
    assert [m.id for m in claimed] == [second]  # promoted by the finish, claimed by the claim
    rows = {r["id"]: r for r in await conn.fetch(
        "SELECT id, state, is_head, reply, finished_at, claimed_at FROM fleet.messages")}
    assert rows[first]["state"] == "done" and rows[first]["reply"] == "ok"
    assert not rows[first]["is_head"]
    assert rows[second]["state"] == "running" and rows[second]["is_head"]
    assert rows[first]["finished_at"] <= rows[second]["claimed_at"]
    assert rows[other]["state"] == "running"


async def test_a_stale_token_finishes_nothing_and_promotes_nothing(conn: asyncpg.Connection):
    first = await queue.enqueue(conn, "s1", "one")
    await queue.enqueue(conn, "s1", "two")
    [m1] = await queue.claim(conn, "w", 10, 30)

    finished, claimed = await queue.finish_and_claim(
        conn, "w", 5, 30, [_done(m1, token=m1.lease_token + 1000)]
    )

    assert finished == set() and claimed == []
    assert await conn.fetchval("SELECT state FROM fleet.messages WHERE id = $1", first) == "running"
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages WHERE is_head") == 1


async def test_no_free_slot_writes_outcomes_only(conn: asyncpg.Connection):
    await queue.enqueue(conn, "s1", "one")
    await queue.enqueue(conn, "s2", "two")
    [m1] = await queue.claim(conn, "w", 1, 30)
    finished, claimed = await queue.finish_and_claim(conn, "w", 0, 30, [_done(m1)])
    assert finished == {m1.id} and claimed == []
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages WHERE state = 'queued'") == 1


async def test_the_agent_filter_applies(conn: asyncpg.Connection):
    await queue.enqueue(conn, "s1", "one")
    [m1] = await queue.claim(conn, "w", 1, 30)
    await queue.enqueue(conn, "s2", "two")
    # A worker with no MCP tools serves no agent that needs one (the seeded support agent does).
    finished, claimed = await queue.finish_and_claim(
        conn, "w", 5, 30, [_done(m1)], tools=[], skills=[]
    )
    assert await conn.fetchval(
        "SELECT cardinality(tools) > 0 FROM fleet.agents WHERE name = 'support'")
    assert finished == {m1.id}
    assert claimed == []
    # Without the filter (the noop handler serves every agent) the same message is claimed.
    _, claimed = await queue.finish_and_claim(conn, "w", 5, 30, [])
    assert [m.body for m in claimed] == ["two"]


async def test_wakes_nobody_and_tells_only_the_waiters_of_a_message(
    db_url: str, conn: asyncpg.Connection
):
    """Completions never wake workers, and notify fleet_outcome only for messages someone
    waits on (migration 0017), naming them: a batch nobody waits on sends nothing."""
    for i in range(5):
        await queue.enqueue(conn, f"s{i}", "x")
    await queue.enqueue(conn, "s0", "behind")
    claimed = await queue.claim(conn, "w", 5, 30)
    awaited = claimed[3:]
    for message in awaited:
        await queue.await_reply(conn, message.id)
    heard: list[tuple[str, str]] = []
    listener = await asyncpg.connect(db_url)
    try:
        for channel in ("fleet_wakeup", "fleet_outcome"):
            await listener.add_listener(channel, lambda _c, _p, ch, pl: heard.append((ch, pl)))
        finished, again = await queue.finish_and_claim(
            conn, "w", 3, 30, [_done(m) for m in claimed[:3]]
        )
        assert len(finished) == 3 and len(again) == 1
        await asyncio.sleep(0.3)
        assert heard == []
        finished, _ = await queue.finish_and_claim(conn, "w", 0, 30, [_done(m) for m in awaited])
        assert len(finished) == 2
        await asyncio.sleep(0.3)
    finally:
        await listener.close()
    [(channel, payload)] = heard
    assert channel == "fleet_outcome"
    assert outcome_ids(payload) == {m.id for m in awaited}


async def test_an_enqueue_does_not_wait_for_a_finishing_head_and_is_elected_after_it(
    db_url: str, conn: asyncpg.Connection
):
    """The finish locks the session FOR NO KEY UPDATE: an enqueue's INSERT (a foreign-key KEY
    SHARE lock on the session) goes through at once; its commit-time head election (FOR
    UPDATE) waits for the finish and then sees it, so the new message becomes the head."""
    head = await queue.enqueue(conn, "s1", "one")
    [m1] = await queue.claim(conn, "w", 1, 30)
    other = await asyncpg.connect(db_url)
    try:
        finishing = conn.transaction()
        await finishing.start()
        finished, _ = await queue.finish_and_claim(conn, "w", 0, 30, [_done(m1)])
        assert finished == {head}

        enqueuing = other.transaction()
        await enqueuing.start()
        new = await asyncio.wait_for(
            other.fetchval("SELECT fleet.enqueue(session_id => 's1', body => 'two')"), timeout=5
        )
        commit = asyncio.create_task(enqueuing.commit())
        await asyncio.sleep(0.3)
        assert not commit.done()  # the election waits for the session's lock
        await finishing.commit()
        await asyncio.wait_for(commit, timeout=5)
    finally:
        await other.close()
    assert await conn.fetchval("SELECT is_head FROM fleet.messages WHERE id = $1", new)
    [m2] = await queue.claim(conn, "w", 1, 30)
    assert m2.id == new
