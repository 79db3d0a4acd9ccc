"""`fleet.enqueue_many`: a batch in one statement, the same as `fleet.enqueue` one message at a
time (ids, dedupe keys, session metadata, heads), all or nothing."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import queue
from fleet.client import Client
from fleet.errors import InvalidInput
from fleet.queue import NewMessage

messages = st.lists(
    st.fixed_dictionaries(
        {"session_id": st.sampled_from(["a", "b", "c"]), "body": st.sampled_from(["hi", "yo"])},
        optional={
            "dedupe_key": st.sampled_from(["k1", "k2", "k3"]),
            "metadata": st.fixed_dictionaries({"n": st.integers(0, 3)}),
            "max_attempts": st.integers(1, 3),
        },
    ),
    min_size=1,
    max_size=12,
)


def _in(namespace: str, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch with its sessions and keys renamed into a namespace of its own."""
    renamed = []
    for message in batch:
        message = dict(message, session_id=f"{namespace}-{message['session_id']}")
        if "dedupe_key" in message:
            message["dedupe_key"] = f"{namespace}-{message['dedupe_key']}"
        renamed.append(message)
    return renamed


def _pattern(ids: list[int]) -> list[int]:
    """Which earlier position each id repeats (its first), so two runs' ids can be compared."""
    first: dict[int, int] = {}
    return [first.setdefault(i, position) for position, i in enumerate(ids)]


async def _outcome(conn: asyncpg.Connection, namespace: str, ids: list[int]) -> dict[str, Any]:
    prefix = f"{namespace}-"
    rows = await conn.fetch(
        "SELECT m.session_id, m.body, m.dedupe_key, m.is_head, m.max_attempts, s.metadata"
        " FROM fleet.messages m JOIN fleet.sessions s USING (session_id)"
        " WHERE m.session_id LIKE $1 || '%' ORDER BY m.session_id, m.id", prefix)
    sessions = await conn.fetch(
        "SELECT session_id, metadata FROM fleet.sessions WHERE session_id LIKE $1 || '%'"
        " ORDER BY session_id", prefix)
    session_of = {r["id"]: r["session_id"] for r in await conn.fetch(
        "SELECT id, session_id FROM fleet.messages WHERE id = ANY ($1::bigint[])", ids)}
    in_sessions: dict[str, list[int]] = {}
    for i in dict.fromkeys(ids):  # each id once, at its first position
        in_sessions.setdefault(session_of[i], []).append(i)
    return {
        "ids": _pattern(ids),
        "ascending": all(ordered == sorted(ordered) for ordered in in_sessions.values()),
        "messages": [
            (r["session_id"].removeprefix(prefix), r["body"],
             (r["dedupe_key"] or "").removeprefix(prefix), r["is_head"], r["max_attempts"],
             r["metadata"])
            for r in rows
        ],
        "sessions": [(r["session_id"].removeprefix(prefix), r["metadata"]) for r in sessions],
    }


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=messages)
def test_a_batch_is_the_same_as_enqueueing_its_messages_one_by_one(sync_conn, batch):
    loop, conn = sync_conn

    async def compare() -> None:
        one_by_one, at_once = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
        async with conn.transaction():  # heads of existing sessions are elected at commit
            ids = [await queue.enqueue(conn, **m) for m in _in(one_by_one, batch)]
        expected = await _outcome(conn, one_by_one, ids)
        async with conn.transaction():
            ids = await queue.enqueue_many(conn, _in(at_once, batch))
        assert await _outcome(conn, at_once, ids) == expected
        assert expected["ascending"]  # each session's ids follow the order of its messages

    loop.run_until_complete(compare())


async def test_a_batch_into_sessions_with_history_keeps_their_order(conn: asyncpg.Connection):
    first = await queue.enqueue(conn, "s1", "earlier", dedupe_key="k0")
    ids = await queue.enqueue_many(conn, [
        {"session_id": "s1", "body": "later"},
        NewMessage(session_id="s2", body="new", metadata={"tenant": "acme"}),
        {"session_id": "s1", "body": "repeat", "dedupe_key": "k0"},
    ])
    assert ids[2] == first and ids[0] > first and ids[1] > ids[0]
    heads = await conn.fetch("SELECT id FROM fleet.messages WHERE is_head ORDER BY id")
    assert [r["id"] for r in heads] == [first, ids[1]]
    assert await conn.fetchval(
        "SELECT metadata FROM fleet.sessions WHERE session_id = 's2'") == {"tenant": "acme"}


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ([{"session_id": "s1", "body": "ok"}, {"session_id": "s1", "body": " "}],
         "message 2: body must not be empty"),
        ([{"session_id": "s1", "body": "ok"}, {"session_id": "s 2", "body": "x"}],
         "message 2: session_id must be 1 to 128 characters with no spaces or control characters"),
        ([{"session_id": "s1", "body": "ok", "text": "typo"}], "message 1: text: Extra inputs"),
        ([{"session_id": "s1"}], "message 1: body: Field required"),
        ([{"session_id": "s1", "body": "x", "agent": "nobody"}],
         "message 1: unknown agent 'nobody'"),
        ([{"session_id": "s1", "body": "x", "max_attempts": 0}],
         "message 1: max_attempts must be at least 1"),
        ([{"session_id": "s1", "body": "x\x00"}], "message 1: body must not contain NUL bytes"),
    ],
)
async def test_a_bad_message_is_named_and_the_batch_writes_nothing(
        conn: asyncpg.Connection, batch, expected):
    with pytest.raises(InvalidInput) as caught:
        await queue.enqueue_many(conn, batch)
    assert str(caught.value).startswith(expected), str(caught.value)
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 0
    assert await conn.fetchval("SELECT count(*) FROM fleet.sessions") == 0


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ('{"session_id": "s1"}', "messages must be a JSON array of objects"),
        ('[{"session_id": "s1", "body": "x"}, 7]', "message 2: must be a JSON object, not number"),
        ('[{"session_id": "s1", "body": "x", "text": "y"}]', "message 1: unknown field 'text'"),
        ('[{"session_id": 5, "body": "x"}]', "message 1: session_id must be a string"),
        ('[{"session_id": "s1", "body": "x", "max_attempts": 2.5}]',
         "message 1: max_attempts must be a whole number"),
        ('[{"session_id": "s1", "body": "x", "metadata": [1]}]',
         "message 1: metadata must be a JSON object"),
    ],
)
async def test_sql_callers_get_the_same_clear_errors(conn: asyncpg.Connection, payload, expected):
    with pytest.raises(asyncpg.DataError, match=f"^fleet.enqueue_many: {expected}"):
        await conn.fetchval("SELECT fleet.enqueue_many($1::text::jsonb)", payload)
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 0
    assert await conn.fetchval("SELECT fleet.enqueue_many('[]')") == []


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"session_id": None, "body": "x"}, asyncpg.NullValueNotAllowedError),  # 22004
        ({"session_id": "s1", "body": "x" * 16_385}, asyncpg.StringDataRightTruncationError),
        ({"session_id": "s1", "body": "x", "agent": "nobody"}, asyncpg.InvalidParameterValueError),
    ],
)
async def test_each_rule_raises_its_own_sqlstate_one_at_a_time_or_in_a_batch(
    conn: asyncpg.Connection, message: dict[str, Any], error: type[Exception]
):
    """fleet.message_problem carries the SQLSTATE with its words; both callers raise it."""
    with pytest.raises(error, match=r"^fleet.enqueue_many: message 2: "):
        await conn.fetchval(
            "SELECT fleet.enqueue_many($1::text::jsonb)",
            json.dumps([{"session_id": "ok", "body": "x"}, message]),
        )
    with pytest.raises(error, match=r"^fleet.enqueue: "):
        await conn.fetchval(
            "SELECT fleet.enqueue(session_id => $1, body => $2, agent => $3)",
            message["session_id"], message["body"], message.get("agent"),
        )
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 0


async def test_the_rules_are_inlined_into_the_batch_check(conn: asyncpg.Connection):
    """No function call per message: the planner replaces fleet.message_problem by its CASE,
    and the character rules in it (fleet.has_space_or_control, fleet.is_blank: migration 0022)
    by their regexes. It stops doing so if a function gets a subquery or is declared less
    volatile than its body (AGENTS.md)."""
    plan = "\n".join(r[0] for r in await conn.fetch(
        "EXPLAIN VERBOSE SELECT fleet.message_problem(s, s, NULL, NULL, NULL, true, NULL, 3)"
        " FROM unnest(ARRAY['a', 'b']) AS s"))
    assert "CASE WHEN" in plan and "message_problem" not in plan, plan
    assert "has_space_or_control" not in plan and "is_blank" not in plan, plan
    assert "\\u3000" in plan, plan  # the rules' code points, inlined


async def test_a_batch_wakes_the_workers_once_at_commit(conn: asyncpg.Connection, db_url):
    heard: list[str] = []
    listener = await asyncpg.connect(db_url)
    try:
        await listener.add_listener(queue.WAKEUP_CHANNEL, lambda *args: heard.append(args[2]))
        async with conn.transaction():
            await queue.enqueue_many(
                conn, [{"session_id": f"s{i}", "body": "x"} for i in range(50)])
            await asyncio.sleep(0.3)
            assert heard == []  # nothing before the commit
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert len(heard) == 1
    finally:
        await listener.close()


async def test_a_key_enqueued_concurrently_is_not_enqueued_twice(conn: asyncpg.Connection,
                                                                 db_url):
    """The key is free when the batch looks, taken by another transaction before the batch's
    INSERT: the batch waits for that one to commit, returns its id, and starts no session."""
    other = await asyncpg.connect(db_url)
    try:
        tr = other.transaction()
        await tr.start()
        theirs = await queue.enqueue(other, "theirs", "x", dedupe_key="k")
        batch = asyncio.create_task(queue.enqueue_many(conn, [
            {"session_id": "mine", "body": "y", "dedupe_key": "k"},
            {"session_id": "also-mine", "body": "z"},
        ]))
        await asyncio.sleep(0.5)
        assert not batch.done()  # waiting on the uncommitted key
        await tr.commit()
        ids = await asyncio.wait_for(batch, 10)
    finally:
        await other.close()
    assert ids[0] == theirs and ids[1] > theirs
    sessions = await conn.fetch("SELECT session_id FROM fleet.sessions ORDER BY 1")
    assert [r["session_id"] for r in sessions] == ["also-mine", "theirs"]


async def test_the_client_fills_in_the_configured_max_attempts(settings, conn):
    settings = settings.model_copy(update={"fleet_max_attempts": 7})
    async with Client(settings=settings) as client:
        ids = await client.enqueue_many([
            {"session_id": "s1", "body": "x"},
            {"session_id": "s2", "body": "y", "max_attempts": 2},
        ])
    attempts = await conn.fetch(
        "SELECT max_attempts FROM fleet.messages WHERE id = ANY ($1) ORDER BY id", ids)
    assert [r["max_attempts"] for r in attempts] == [7, 2]
