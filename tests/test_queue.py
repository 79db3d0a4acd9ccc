"""The queue's SQL on a real PostgreSQL: enqueue rules, per-session heads, leases and fencing."""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
import unicodedata

import asyncpg
import pytest

from fleet import queue
from fleet.errors import InvalidInput
from fleet.handlers import NoopHandler
from fleet.queue import ClaimedMessage, Outcome
from fleet.sql import queries
from fleet.worker import Worker, retry_delay
from tests.processes import wait_until
from tests.session_order import assert_session_order, sessions_with_two_heads
from tests.workers import expire_lease, listening, running


async def test_enqueue_returns_id_and_dedupe_key_returns_the_same_id(conn: asyncpg.Connection):
    first = await queue.enqueue(conn, "s1", "hello", dedupe_key="k1")
    again = await queue.enqueue(conn, "s1", "hello again", dedupe_key="k1")
    other = await queue.enqueue(conn, "s1", "different", dedupe_key="k2")
    assert first == again != other
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 2


async def test_a_repeated_dedupe_key_starts_no_session(conn: asyncpg.Connection):
    """A dedupe hit enqueues nothing, in any session: the session it named is not created, so
    that session's real first message sets its metadata."""
    first = await queue.enqueue(conn, "orig", "x", dedupe_key="k", metadata={"tenant": "acme"})
    again = await queue.enqueue(conn, "other", "y", dedupe_key="k", metadata={"tenant": "globex"})
    assert again == first
    assert await conn.fetchval(
        "SELECT count(*) FROM fleet.sessions WHERE session_id = 'other'") == 0
    async with conn.transaction():  # the same inside a caller's transaction
        again = await queue.enqueue(conn, "other", "y", dedupe_key="k")
        assert await conn.fetchval(
            "SELECT count(*) FROM fleet.sessions WHERE session_id = 'other'") == 0
    await queue.enqueue(conn, "other", "real first", metadata={"tenant": "initech"})
    assert await conn.fetchval(
        "SELECT metadata FROM fleet.sessions WHERE session_id = 'other'") == {"tenant": "initech"}
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 2


async def test_a_repeated_dedupe_key_writes_nothing(conn: asyncpg.Connection):
    """A repeat is answered from the key's index: no session row inserted and deleted again
    (each left a dead tuple in fleet.sessions)."""
    first = await queue.enqueue(conn, "orig", "x", dedupe_key="k")
    for i in range(20):
        assert await queue.enqueue(conn, f"other-{i}", "y", dedupe_key="k") == first
    await conn.execute("SELECT pg_stat_force_next_flush()")
    written = await conn.fetchrow(
        "SELECT n_tup_ins, n_tup_del FROM pg_stat_user_tables"
        " WHERE relid = 'fleet.sessions'::regclass")
    assert (written["n_tup_ins"], written["n_tup_del"]) == (1, 0)


async def test_session_metadata_is_set_by_the_first_enqueue(conn: asyncpg.Connection):
    await queue.enqueue(conn, "s1", "a", metadata={"tenant": "acme"})
    await queue.enqueue(conn, "s1", "b", metadata={"tenant": "other"})
    assert await conn.fetchval(
        "SELECT metadata FROM fleet.sessions WHERE session_id = 's1'") == {"tenant": "acme"}


@pytest.mark.parametrize(
    ("session_id", "body", "expected"),
    [
        ("s1", "", "body must not be empty"),
        ("s1", "   \n", "body must not be empty"),
        ("s1", "x" * 16_385, "body is 16385 bytes; the limit is 16384"),
        ("has space", "hi", "session_id must be 1 to 128 characters"),
        ("", "hi", "session_id must be 1 to 128 characters"),
        ("s" * 129, "hi", "session_id must be 1 to 128 characters"),
        # Spaces and controls by code point, not by the server's locale (migration 0020): a
        # no-break space is no space to glibc's C.UTF-8, a C1 control is none to the C locale.
        ("no\xa0break", "hi", "session_id must be 1 to 128 characters"),
        ("figure\u2007space", "hi", "session_id must be 1 to 128 characters"),
        ("c1\x85control", "hi", "session_id must be 1 to 128 characters"),
        ("s1", "\xa0\u202f\u3000", "body must not be empty"),
        ("s1", "\x1c\u2007", "body must not be empty"),
    ],
)
async def test_bad_input_is_refused_with_a_clear_error_and_nothing_written(
    conn: asyncpg.Connection, session_id: str, body: str, expected: str
):
    with pytest.raises(InvalidInput, match=expected):
        await queue.enqueue(conn, session_id, body)
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 0


async def test_the_space_and_control_rules_agree_with_python_on_every_code_point(
    conn: asyncpg.Connection,
):
    """fleet.has_space_or_control and fleet.is_blank (migration 0022), which the domains, the
    agents check and fleet.message_problem all call, name the characters README promises:
    Python's str.isspace (what an agent spec's str.strip removes) and the control category Cc."""
    found = await conn.fetchrow(
        """SELECT array_agg(c) FILTER (WHERE fleet.has_space_or_control(chr(c))) AS refused,
                  array_agg(c) FILTER (WHERE fleet.is_blank(chr(c))) AS blank
             FROM generate_series(1, 1114111) c
            WHERE c NOT BETWEEN 55296 AND 57343""")  # surrogates are no characters
    characters = [c for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    spaces = {c for c in characters if chr(c).isspace()}
    controls = {c for c in characters if unicodedata.category(chr(c)) == "Cc"}
    assert set(found["blank"]) == spaces
    assert set(found["refused"]) == spaces | controls


async def test_letters_of_any_script_are_a_session_id_and_a_body(conn: asyncpg.Connection):
    """Only spaces and control characters are refused: other characters past ASCII are not."""
    message_id = await queue.enqueue(conn, "café:Ωμέγα-会話", "naïve\u200b ¿qué?")
    assert await conn.fetchval(
        "SELECT session_id FROM fleet.messages WHERE id = $1", message_id) == "café:Ωμέγα-会話"


@pytest.mark.parametrize("statement", ["claim", "claim_message", "finish_and_claim"])
async def test_a_claim_returns_the_claimed_message_fields_in_order(
    conn: asyncpg.Connection, statement: str
):
    """ClaimedMessage is built positionally from a claim's row (fleet.queue._claimed)."""
    prepared = await conn.prepare(queue.SQL[statement])
    columns = [attribute.name for attribute in prepared.get_attributes()]
    assert columns == list(ClaimedMessage._fields)


async def test_null_session_id_via_sql_is_refused(conn: asyncpg.Connection):
    with pytest.raises(asyncpg.PostgresError, match="session_id must not be NULL"):
        await conn.fetchval("SELECT fleet.enqueue(session_id => NULL, body => 'x')")
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 0


@pytest.mark.parametrize(
    ("column", "value", "constraint"),
    [
        ("session_id", "has space", "messages_session_id_valid"),
        ("session_id", "no\xa0break", "messages_session_id_valid"),
        ("body", " \t", "messages_body_not_empty"),
        ("body", "\xa0\u2007", "messages_body_not_empty"),
        ("body", "x" * 16_385, "messages_body_size"),
        ("metadata", "[1]", "messages_metadata_size"),
        ("variables", '{"blob": "' + "x" * 16_400 + '"}', "messages_variables_size"),
        ("dedupe_key", "", "messages_dedupe_key_size"),
    ],
)
async def test_a_direct_insert_meets_the_same_named_checks(
    conn: asyncpg.Connection, column: str, value: str, constraint: str
):
    """Plain SQL bypasses fleet.enqueue's worded errors but not the rules: the columns' domains
    (migration 0011) refuse what the table constraints used to, under the same names."""
    await conn.execute("INSERT INTO fleet.sessions (session_id) SELECT unnest($1::text[])",
                       ["s1", "has space", "no\xa0break"])
    row = {"session_id": "s1", "body": "hi", "metadata": "{}", "variables": "{}",
           "dedupe_key": None}
    row[column] = value
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await conn.execute(
            "INSERT INTO fleet.messages (session_id, body, metadata, variables, dedupe_key)"
            " VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb, $5)",
            *row.values(),
        )
    assert refused.value.constraint_name == constraint
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 0


async def test_updates_do_not_recheck_columns_that_never_change(conn: asyncpg.Connection):
    """The queue updates every message at least twice (claim, finish): those updates must not
    pay for the insert-time checks (regular expressions, jsonb measured as text). A domain's
    check runs only when its column is assigned, which the queue's statements never do; a
    table CHECK would run on every update."""
    checks = await conn.fetch(
        """SELECT conname FROM pg_constraint
           WHERE conrelid = 'fleet.messages'::regclass AND contype = 'c'
             AND pg_get_constraintdef(oid) ~ '(session_id|body|metadata|variables|dedupe_key)'"""
    )
    assert checks == []
    domains = await conn.fetch(
        """SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           WHERE a.attrelid = 'fleet.messages'::regclass AND t.typtype = 'd' ORDER BY 1"""
    )
    assert {r["attname"]: r["typname"] for r in domains} == {
        "body": "message_body",
        "dedupe_key": "dedupe_key",
        "metadata": "message_metadata",
        "session_id": "session_id",
        "variables": "message_variables",
    }


async def test_oversized_metadata_is_refused(conn: asyncpg.Connection):
    with pytest.raises(InvalidInput, match="metadata must be a JSON object"):
        await queue.enqueue(conn, "s1", "hi", metadata={"blob": "x" * 20_000})


async def test_only_the_session_head_is_claimable_and_the_next_follows_in_order(
    conn: asyncpg.Connection,
):
    ids = [await queue.enqueue(conn, "s1", f"m{i}") for i in range(3)]
    other = await queue.enqueue(conn, "s2", "other session")
    claimed = await queue.claim(conn, "w", 10, 30)
    assert sorted(m.id for m in claimed) == sorted([ids[0], other])

    first = next(m for m in claimed if m.id == ids[0])
    done = await queue.finish(conn, [Outcome(message_id=first.id, lease_token=first.lease_token,
                                             state="done", reply="r0")])
    assert done == {ids[0]}
    nxt = await queue.claim(conn, "w", 10, 30)
    assert [m.id for m in nxt] == [ids[1]]


async def test_the_first_message_of_a_new_session_is_its_head_at_once(conn, db_url):
    """fleet.enqueue makes the first message of a session it creates the head when inserting
    it (no election at commit); a later one, and the first enqueue of the same new session
    racing from another transaction, wait behind it: one head, claimed in enqueue order."""
    other = await asyncpg.connect(db_url)
    try:
        async with conn.transaction():
            first = await queue.enqueue(conn, "fresh", "one")
            second = await queue.enqueue(conn, "fresh", "two")
            heads = await conn.fetch(
                "SELECT id FROM fleet.messages WHERE session_id = 'fresh' AND is_head")
            assert [r["id"] for r in heads] == [first]  # before the commit already
            # The racing enqueue blocks on the new session's key until this commit.
            racing = asyncio.create_task(other.fetchval(
                "SELECT fleet.enqueue(session_id => 'fresh', body => 'three')"))
            await asyncio.sleep(0.2)
            assert not racing.done()
        third = await racing
        order = []
        for _ in range(3):
            [claimed] = await queue.claim(conn, "w", 10, 30)
            order.append(claimed.id)
            assert await queue.claim(conn, "w", 10, 30) == []  # one head at a time
            await queue.finish(conn, [Outcome(message_id=claimed.id,
                                              lease_token=claimed.lease_token,
                                              state="done", reply="ok")])
        assert order == [first, second, third]
    finally:
        await other.close()


async def test_a_retried_head_keeps_later_messages_of_its_session_waiting(conn: asyncpg.Connection):
    first = await queue.enqueue(conn, "s1", "first")
    await queue.enqueue(conn, "s1", "second")
    [claimed] = await queue.claim(conn, "w", 10, 30)
    assert await queue.retry(conn, first, claimed.lease_token, "boom", 0.0)
    again = await queue.claim(conn, "w", 10, 30)
    assert [m.id for m in again] == [first]  # not "second": order is kept across retries


async def test_rolled_back_enqueue_leaves_nothing(conn: asyncpg.Connection):
    tr = conn.transaction()
    await tr.start()
    await queue.enqueue(conn, "s1", "never")
    await tr.rollback()
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 0
    assert await queue.claim(conn, "w", 10, 30) == []


async def test_open_transactions_enqueueing_into_one_session_both_commit(conn, db_url):
    """Two transactions that have each enqueued into the same live session both commit, and
    the session keeps one head. Each INSERT holds a KEY SHARE lock on the session (the foreign
    key) until its transaction ends; an election that took FOR UPDATE at commit waited for the
    other's KEY SHARE, and the other's election for its own: a deadlock, one of them aborted."""
    await queue.enqueue(conn, "live", "first")
    first, second = await asyncpg.connect(db_url), await asyncpg.connect(db_url)
    try:
        one, two = first.transaction(), second.transaction()
        await one.start()
        await two.start()
        a = await queue.enqueue(first, "live", "a")
        b = await queue.enqueue(second, "live", "b")
        await asyncio.wait_for(asyncio.gather(one.commit(), two.commit()), timeout=5)
        assert await conn.fetchval(
            "SELECT count(*) FROM fleet.messages WHERE session_id = 'live' AND is_head") == 1
        assert {a, b} <= {r["id"] for r in await conn.fetch("SELECT id FROM fleet.messages")}
    finally:
        await first.close()
        await second.close()


async def test_a_finish_skips_a_busy_session_and_the_lease_stays(conn, db_url):
    """A finish does not wait for a session another transaction holds locked (a head change
    under way: an election at an enqueue's commit takes its sessions' locks in enqueue order,
    a finish in session order, so waiting could deadlock). The message stays running under
    its lease, and the same outcome is taken once the session is free."""
    await queue.enqueue(conn, "a", "x")
    await queue.enqueue(conn, "b", "y")
    claimed = {m.session_id: m for m in await queue.claim(conn, "w", 10, 30)}
    outcomes = [Outcome(message_id=m.id, lease_token=m.lease_token, state="done", reply="ok")
                for m in claimed.values()]
    holder = await asyncpg.connect(db_url)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM fleet.sessions WHERE session_id = 'b' FOR NO KEY UPDATE")
            finished = await asyncio.wait_for(queue.finish(conn, outcomes), timeout=5)
            assert finished == {claimed["a"].id}
            busy = claimed["b"]
            assert await queue.heartbeat(conn, [(busy.id, busy.lease_token)], 30) == {
                busy.id: None}
        assert await queue.finish(conn, outcomes) == {claimed["b"].id}
    finally:
        await holder.close()


async def test_a_worker_writes_an_outcome_again_once_its_session_is_free(conn, db_url, settings):
    """The worker side of a skipped finish: the outcome of a message whose session is locked
    is not taken for a lost lease; the message stays running under the worker's lease and
    ends done, once, with its reply, when the lock goes. The deferrals are counted."""
    from prometheus_client import REGISTRY

    def count(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    deferred_before, lost_before = (count("fleet_outcomes_deferred_total"),
                                    count("fleet_leases_lost_total"))
    message_id = await queue.enqueue(conn, "busy", "hello")
    holder = await asyncpg.connect(db_url)
    try:
        worker = Worker(settings, NoopHandler(), concurrency=2, claim_batch=2)
        async with running(worker):
            async with holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM fleet.sessions WHERE session_id = 'busy' FOR NO KEY UPDATE")
                await wait_until(lambda: conn.fetchval(
                    "SELECT state = 'running' FROM fleet.messages WHERE id = $1", message_id))
                await asyncio.sleep(0.3)  # the handler is long done: its outcome waits
                assert await conn.fetchval(
                    "SELECT state FROM fleet.messages WHERE id = $1", message_id) == "running"
            await wait_until(lambda: conn.fetchval(
                "SELECT state = 'done' FROM fleet.messages WHERE id = $1", message_id))
    finally:
        await holder.close()
    row = await conn.fetchrow(
        "SELECT reply, attempts, takeovers FROM fleet.messages WHERE id = $1", message_id)
    assert dict(row) == {"reply": "ok", "attempts": 1, "takeovers": 0}
    assert count("fleet_outcomes_deferred_total") > deferred_before  # one a 5 ms retry
    assert count("fleet_leases_lost_total") == lost_before


class _HeldByTheTest(NoopHandler):
    """Replies ``ok`` once the test sets the event named by the message's body."""

    def __init__(self, events: dict[str, asyncio.Event]) -> None:
        super().__init__()
        self.events = events

    async def handle(self, message, lease):
        await self.events[message.body].wait()
        return await super().handle(message, lease)


async def test_heartbeats_go_on_while_an_outcome_write_waits_for_a_lock(conn, db_url, settings):
    """The worker side of a heartbeat that never waits: here the write of one outcome waits for
    a row lock the test holds (as a finish can for another's), and the worker's heartbeats go
    on extending its other message's lease meanwhile. A heartbeat that waited for the locked
    message could deadlock with a finish (queries.sql, heartbeat)."""
    settings = settings.model_copy(update={"fleet_lease_seconds": 1.5})  # a beat every 0.5 s
    events = {"written": asyncio.Event(), "running": asyncio.Event()}
    written = await queue.enqueue(conn, "a", "written")
    still_running = await queue.enqueue(conn, "b", "running")
    holder = await asyncpg.connect(db_url)
    try:
        async with running(Worker(settings, _HeldByTheTest(events), concurrency=2)):
            await wait_until(lambda: conn.fetchval(
                "SELECT count(*) = 2 FROM fleet.messages WHERE state = 'running'"))
            async with holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM fleet.messages WHERE id = $1 FOR UPDATE", written)
                events["written"].set()  # its outcome's write now waits for the test's lock
                await wait_until(lambda: conn.fetchval(
                    "SELECT count(*) = 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND application_name = 'fleet-worker'"), interval=0.02)
                before = await conn.fetchval(
                    "SELECT lease_expires_at FROM fleet.messages WHERE id = $1", still_running)
                await wait_until(lambda: conn.fetchval(
                    "SELECT lease_expires_at > $2 FROM fleet.messages WHERE id = $1",
                    still_running, before), timeout=3, interval=0.05,
                    message="a heartbeat of the other message while the write waits")
            events["running"].set()
            await wait_until(lambda: conn.fetchval(
                "SELECT count(*) = 2 FROM fleet.messages WHERE state = 'done'"))
    finally:
        await holder.close()
    rows = await conn.fetch("SELECT reply, attempts, takeovers FROM fleet.messages")
    assert [dict(r) for r in rows] == [{"reply": "ok", "attempts": 1, "takeovers": 0}] * 2


async def test_batches_into_the_same_live_sessions_deadlock_neither_each_other_nor_a_worker(
    conn, settings
):
    """Two producers whose batches name the same live sessions in opposite orders, beside a
    worker finishing those sessions' heads: no transaction fails, and every message is done
    once, each session's in enqueue order without overlap. The elections at a batch's commit
    take their sessions' locks one row at a time; while rows were inserted in the batch's
    order, the two producers, and a producer and the worker's finish (session order), took
    the same locks in different orders and deadlocked."""
    sessions = [f"live-{i}" for i in range(12)]
    for session in sessions:
        await queue.enqueue(conn, session, "first")
    rounds = 150

    async def produce(db: asyncpg.Connection, reverse: bool) -> None:
        for round_ in range(rounds):
            order = sessions[::-1] if (round_ % 2) == reverse else sessions
            await queue.enqueue_many(db, [{"session_id": s, "body": "m"} for s in order])

    worker = Worker(settings, NoopHandler(), concurrency=12, claim_batch=12)
    other = await asyncpg.connect(settings.database_url)
    stop = asyncio.Event()
    watch = asyncio.create_task(sessions_with_two_heads(settings.database_url, stop))
    try:
        async with running(worker):
            await asyncio.gather(produce(conn, False), produce(other, True))
            await wait_until(lambda: _all_done(conn), timeout=60)
    finally:
        stop.set()
        await other.close()
    assert await watch == set()
    rows = await conn.fetch(
        "SELECT id, session_id, reply, attempts, claimed_at, finished_at FROM fleet.messages"
        " ORDER BY session_id, id")
    assert len(rows) == 12 * (1 + 2 * rounds)
    assert all(r["reply"] == "ok" and r["attempts"] == 1 for r in rows)
    assert assert_session_order(rows) == 12


async def test_producers_racing_a_worker_over_shared_sessions_never_make_two_heads(
    conn, settings
):
    """Four producers enqueue into eight shared sessions (one at a time, two in one
    transaction, batches of two sessions) while a worker claims and finishes their heads; a
    sampler looks for a session with two heads all along. A head moves between waiting and
    running without the session's lock (a claim), so an election that asked "is one running?"
    and "is the earliest waiting one the head?" in two statements could see it in neither and
    make a second head: seen here within seconds, with two messages of a session running at
    once."""
    sessions = [f"shared-{i}" for i in range(8)]
    stop = asyncio.Event()
    watch = asyncio.create_task(sessions_with_two_heads(settings.database_url, stop, every=0.005))
    deadline = time.monotonic() + 8

    async def produce(seed: int) -> None:
        rnd = random.Random(seed)
        db = await asyncpg.connect(settings.database_url)
        try:
            while time.monotonic() < deadline:
                first, second = rnd.sample(sessions, 2)
                kind = rnd.random()
                if kind < 0.4:
                    await queue.enqueue(db, first, "m")
                elif kind < 0.7:
                    async with db.transaction():
                        await queue.enqueue(db, first, "m")
                        await queue.enqueue(db, first, "m")
                else:
                    await queue.enqueue_many(db, [{"session_id": s, "body": "m"}
                                                  for s in sorted((first, second))])
                await asyncio.sleep(rnd.random() * 0.002)
        finally:
            await db.close()

    worker = Worker(settings, NoopHandler(), concurrency=8, claim_batch=4)
    try:
        async with running(worker):
            await asyncio.gather(*(produce(seed) for seed in range(4)))
            await wait_until(lambda: _all_done(conn), timeout=120)
    finally:
        stop.set()
    assert await watch == set()
    rows = await conn.fetch(
        "SELECT id, session_id, attempts, claimed_at, finished_at FROM fleet.messages"
        " ORDER BY session_id, id")
    assert all(r["attempts"] == 1 for r in rows)
    overlapping = []  # in each session by claim time, a claim before the last one finished
    for _, group in itertools.groupby(rows, key=lambda r: r["session_id"]):
        ran = sorted(group, key=lambda r: r["claimed_at"])
        overlapping += [(a["id"], b["id"]) for a, b in itertools.pairwise(ran)
                        if b["claimed_at"] < a["finished_at"]]
    assert overlapping == []


async def _all_done(conn: asyncpg.Connection) -> bool:
    return not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM fleet.messages WHERE state <> 'done')")


async def test_a_message_inserted_and_deleted_in_one_transaction_leaves_no_session(
    conn: asyncpg.Connection,
):
    """The head election runs at COMMIT even for a row deleted since its INSERT (PostgreSQL
    fires a deferred row trigger with the dead row): it must not recreate the session."""
    async with conn.transaction():
        await conn.execute("INSERT INTO fleet.sessions (session_id) VALUES ('s1')")
        await conn.execute("INSERT INTO fleet.messages (session_id, body) VALUES ('s1', 'x')")
        await conn.execute("DELETE FROM fleet.messages WHERE session_id = 's1'")
        await conn.execute("DELETE FROM fleet.sessions WHERE session_id = 's1'")
    assert await conn.fetchval("SELECT count(*) FROM fleet.sessions") == 0


async def test_a_stale_worker_cannot_overwrite_the_new_owner(conn: asyncpg.Connection):
    message_id = await queue.enqueue(conn, "s1", "contested")
    [zombie] = await queue.claim(conn, "zombie", 1, 30)
    # The zombie stops heartbeating; its lease runs out.
    await expire_lease(conn, message_id)
    assert await queue.rescue_expired(conn) == [message_id]
    [owner] = await queue.claim(conn, "owner", 1, 30)
    assert owner.lease_token != zombie.lease_token
    assert owner.takeovers == 1 and owner.attempts == 1  # losing a worker is not a failure

    assert await queue.heartbeat(conn, [(message_id, zombie.lease_token)], 30) == {}
    refused = await queue.finish(conn, [Outcome(message_id=message_id,
                                                lease_token=zombie.lease_token,
                                                state="done", reply="zombie reply")])
    assert refused == set()
    assert not await queue.retry(conn, message_id, zombie.lease_token, "late", 0)
    accepted = await queue.finish(conn, [Outcome(message_id=message_id,
                                                 lease_token=owner.lease_token,
                                                 state="done", reply="owner reply")])
    assert accepted == {message_id}
    row = await conn.fetchrow("SELECT state, reply FROM fleet.messages WHERE id = $1", message_id)
    assert dict(row) == {"state": "done", "reply": "owner reply"}


async def test_claim_cost_follows_the_batch_not_the_backlog(conn: asyncpg.Connection):
    await conn.execute(
        "SELECT fleet.enqueue(session_id => 's' || g, body => 'x') FROM generate_series(1, 5000) g")
    await conn.execute(
        "SELECT fleet.enqueue(session_id => 'big', body => 'x') FROM generate_series(1, 5000) g")
    await conn.execute("ANALYZE fleet.messages")
    plan = "\n".join(
        r[0] for r in await conn.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) SELECT id FROM fleet.messages"
            " WHERE state = 'queued' AND is_head AND run_after <= now()"
            " ORDER BY run_after, id LIMIT 10 FOR UPDATE SKIP LOCKED"))
    assert "messages_claimable" in plan
    # The index scan stops after the batch: it reads about 10 rows, not 10,000.
    scanned = next(line for line in plan.splitlines() if "Index Scan" in line)
    assert re.search(r"actual time=\S+ rows=10(\.00)? ", scanned), plan


SESSION_HISTORY_QUERIES = {
    "list_session_messages": (queue.SQL["list_session_messages"], ("h", None, 100)),
    "list_sessions": (queue.SQL["list_sessions"].replace(
        "WHERE s.metadata @> $1::jsonb", "WHERE s.session_id = $1"), ("h", 100)),
    "trace_messages": (queries("agent_runtime.sql")["trace_messages"], ("h",)),
}


async def test_a_sessions_history_lists_messages_in_every_state(conn: asyncpg.Connection):
    """A session's messages are indexed in three parts by state (migrations 0014, 0016):
    waiting, running, finished. The history queries name all three; a state left out would
    vanish here."""
    ids = [await queue.enqueue(conn, "h", f"m{n}") for n in range(len(queue.MESSAGE_STATES))]
    for message_id, state in zip(ids, queue.MESSAGE_STATES, strict=True):
        await conn.execute(
            "UPDATE fleet.messages SET state = $2, reply = 'r', lease_token = 1,"
            " lease_expires_at = now() + interval '1 minute' WHERE id = $1", message_id, state)
    listed = await queue.list_messages(conn, session_id="h")
    expected = list(zip(ids, queue.MESSAGE_STATES, strict=True))
    assert sorted((m.id, m.state) for m in listed) == expected
    for name in ("list_session_messages", "trace_messages"):
        sql, args = SESSION_HISTORY_QUERIES[name]
        assert len(await conn.fetch(sql, *args)) == len(ids), name
    sql, args = SESSION_HISTORY_QUERIES["list_sessions"]
    assert (await conn.fetchrow(sql, *args))["messages"] == len(ids)


async def test_failed_messages_are_listed_without_reading_the_history(conn: asyncpg.Connection):
    """`fleet messages --state dead` is how an operator finds what failed, among far more done
    messages: listing dead or cancelled ones reads their own index (migration 0024), a few
    buffers, where the primary key walked backwards or a scan would read every finished
    message; done and queued listings keep theirs."""
    many = "SELECT fleet.enqueue('s' || (g % 300), 'x') FROM generate_series(1, 6000) g"
    finish_all = ("UPDATE fleet.messages SET state = 'done', reply = 'ok', is_head = false"
                  " WHERE state = 'queued'")
    await conn.execute(many)
    await conn.execute(finish_all)
    dead = await queue.enqueue(conn, "failing", "x")
    await conn.execute("UPDATE fleet.messages SET state = 'dead', error = 'boom', is_head = false"
                       " WHERE id = $1", dead)
    await conn.execute(many)
    await conn.execute(finish_all)
    await conn.execute("VACUUM ANALYZE fleet.messages")
    assert [m.id for m in await queue.list_messages(conn, state="dead")] == [dead]
    for state, index in (("dead", "messages_failed"), ("cancelled", "messages_failed"),
                         ("done", "messages_pkey")):
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) " + queries("queries.sql")["list_messages"], state, 50))
        assert index in plan, (state, plan)
        assert int(re.findall(r"Buffers: shared hit=(\d+)", plan)[0]) < 20, (state, plan)


async def test_a_sessions_history_is_read_through_its_indexes(conn: asyncpg.Connection):
    """Without the full (session_id, id) index, a history query that named no part would read
    the whole table."""
    await conn.execute(
        "SELECT fleet.enqueue('s' || (g % 300), 'x') FROM generate_series(1, 6000) g")
    await conn.execute("UPDATE fleet.messages SET state = 'done', reply = 'ok', is_head = false"
                       " WHERE id % 2 = 0")
    await queue.claim(conn, "w", 20, 60)
    await conn.execute("SELECT fleet.enqueue('h', 'x') FROM generate_series(1, 4)")
    await conn.execute("ANALYZE fleet.messages")
    for name, (sql, args) in SESSION_HISTORY_QUERIES.items():
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
        assert "Seq Scan on messages" not in plan, (name, plan)
        for index in ("messages_session_waiting", "messages_running",
                      "messages_session_finished"):
            assert index in plan, (name, index, plan)


@pytest.mark.parametrize("table", ["fleet.messages", "fleet.sessions"])
async def test_every_queue_table_column_keeps_the_small_statistics_target(
        conn: asyncpg.Connection, table: str):
    """ANALYZE samples 300 rows per unit of the largest target among the table's columns, so a
    column added at the default (100) would bring back the 30,000-row sample that migrations
    0015 and 0019 cut to 3,000 (an ANALYZE of 50,000 messages: 93-106 ms against 13-14, of
    50,000 sessions 65-78 against 9-10; bench/queue_probes.py analyze-cost)."""
    rows = await conn.fetch(
        "SELECT attname, attstattarget FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped", table)
    assert rows and {r["attname"]: r["attstattarget"] for r in rows} == {
        r["attname"]: 10 for r in rows}


async def test_a_heartbeat_is_a_hot_update(conn: asyncpg.Connection):
    """A heartbeat changes only lease_expires_at, which no index holds (migration 0016), so
    PostgreSQL rewrites the row in place without new index entries. An index on it would
    silently cost every heartbeat an entry in every index."""
    await queue.enqueue(conn, "hb", "x")
    [message] = await queue.claim(conn, "w", 1, 30)

    async def updates() -> tuple[int, int]:
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        row = await conn.fetchrow("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                                  " WHERE relid = 'fleet.messages'::regclass")
        return row["n_tup_upd"], row["n_tup_hot_upd"]

    updated, hot = await updates()
    for _ in range(10):
        assert await queue.heartbeat(conn, [(message.id, message.lease_token)], 30) == {
            message.id: None}
    assert await updates() == (updated + 10, hot + 10)


async def test_a_heartbeat_never_waits_for_a_locked_message(conn, db_url):
    """A heartbeat skips a message another transaction has locked (reported still held, not
    extended) instead of waiting for it: a heartbeat that waited could deadlock with the
    finish writing some of the same messages in another order (queries.sql, heartbeat)."""
    ids = [await queue.enqueue(conn, f"hb-{i}", "x") for i in range(3)]
    claimed = await queue.claim(conn, "w", 3, 30)
    leases = [(m.id, m.lease_token) for m in claimed]
    expiry = "SELECT id, lease_expires_at FROM fleet.messages WHERE id = ANY ($1)"
    before = dict(await conn.fetch(expiry, ids))
    locked = ids[1]
    async with (
        asyncpg.create_pool(db_url, min_size=1, max_size=1) as pool,
        pool.acquire() as blocker,
        blocker.transaction(),
    ):
        await blocker.execute("SELECT 1 FROM fleet.messages WHERE id = $1 FOR UPDATE", locked)
        held = await asyncio.wait_for(queue.heartbeat(conn, leases, 60), 5)
        assert held == dict.fromkeys(ids)
        after = dict(await conn.fetch(expiry, ids))
        assert [after[i] > before[i] for i in ids] == [True, False, True]
    # Free again: extended, and a lease lost meanwhile is not reported held.
    await conn.execute("UPDATE fleet.messages SET lease_token = lease_token + 1000 WHERE id = $1",
                       ids[2])
    assert await queue.heartbeat(conn, leases, 60) == dict.fromkeys(ids[:2])
    assert dict(await conn.fetch(expiry, ids))[locked] > before[locked]


async def _call_buffers(conn: asyncpg.Connection, call: str) -> int:
    """Shared buffers one call reads (its EXPLAIN ANALYZE counts the function's statements)."""
    plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) SELECT {call}"))
    return int(re.findall(r"Buffers: shared hit=(\d+)", plan)[0])  # the call's, then planning's


@pytest.mark.parametrize("statistics", ["of the backlog", "of an empty queue"])
async def test_repair_and_promotion_read_a_backlog_once_whatever_the_statistics(
    conn: asyncpg.Connection, statistics: str,
):
    """repair_heads (every worker, every FULL_REPAIR_INTERVAL) reads every queued message
    that is not a head; promote_heads looks at each session it is given. Their probes (the
    session's earliest waiting message, a running one) must stay one index lookup each
    whatever the planner believes. A queue's statistics are often those of an empty queue
    (autovacuum analyzes it between bursts): planned on them, the probes as they once were
    (NOT EXISTS, made anti joins) read the whole waiting index once per waiting message (151 s
    on 30,000, holding back vacuum throughout: bench/queue_probes.py stale-stats). As a SQL
    function per message they read ~6 buffers each (436 ms against 9 ms on 20,000:
    repair-heads). The bound is two buffers per waiting message, and a few per session for
    promote_heads."""
    # The statistics are the ones this test takes, not whatever autovacuum's ANALYZE last saw.
    await conn.execute("ALTER TABLE fleet.messages SET (autovacuum_enabled = false)")
    if statistics == "of an empty queue":  # a history, drained, then analyzed
        await conn.execute(
            "SELECT count(fleet.enqueue('old' || (g % 50), 'x')) FROM generate_series(1, 2000) g")
        while claimed := await queue.claim(conn, "w", 50, 30):
            await queue.finish(conn, [Outcome(message_id=m.id, lease_token=m.lease_token,
                                              state="done", reply="ok") for m in claimed])
        await conn.execute("VACUUM ANALYZE fleet.messages")
    await conn.execute(
        "SELECT count(fleet.enqueue('s' || (g % 50), 'x')) FROM generate_series(1, 5000) g")
    if statistics == "of the backlog":
        await conn.execute("ANALYZE fleet.messages")
    # A backend's first call also reads the catalogs to plan the function's statements.
    assert await conn.fetchval("SELECT fleet.repair_heads(100)") == 0
    assert await _call_buffers(conn, "fleet.repair_heads(100)") < 2 * 5000
    sessions = "ARRAY(SELECT 's' || g FROM generate_series(0, 49) g)"
    async with conn.transaction():  # (it makes no head: each session has one)
        assert await conn.fetchval(f"SELECT fleet.promote_heads({sessions})") == 0
        assert await _call_buffers(conn, f"fleet.promote_heads({sessions})") < 10 * 50


async def test_a_head_lost_to_a_repeatable_read_enqueue_is_repaired(conn, db_url):
    """An enqueue in a REPEATABLE READ transaction runs its commit-time election on the
    snapshot its transaction began with: if the session's head finished (and found no
    successor to promote) after that, the election still sees the head running and elects
    nobody. The transaction names the session on fleet_repair at its commit; repair_sessions
    (what a worker that hears it calls) and the safety-net scan repair_heads each make the
    earliest waiting message the head."""
    heard: list[str] = []
    await conn.add_listener(queue.REPAIR_CHANNEL, lambda *args: heard.append(args[3]))
    for repair in ("repair_sessions", "repair_heads"):
        session = f"rr-{repair}"
        head = await queue.enqueue(conn, session, "first")
        [claimed] = await queue.claim(conn, "w", 10, 30)
        late = await asyncpg.connect(db_url)
        try:
            async with late.transaction(isolation="repeatable_read"):
                await late.fetchval("SELECT count(*) FROM fleet.messages")  # its snapshot, now
                assert await queue.finish(conn, [Outcome(
                    message_id=head, lease_token=claimed.lease_token, state="done", reply="ok",
                )]) == {head}
                lost = await queue.enqueue(late, session, "second")
        finally:
            await late.close()
        assert await conn.fetchval(
            "SELECT is_head FROM fleet.messages WHERE id = $1", lost) is False
        assert await queue.claim(conn, "w", 10, 30) == []  # nothing claimable: the lost head

        async def told(session: str = session) -> bool:
            return session in heard

        await wait_until(told, timeout=5, message="the fleet_repair notification")

        if repair == "repair_sessions":
            assert await queue.repair_sessions(conn, [session, "no-such-session"]) == 1
        else:
            assert await queue.repair_heads(conn) == 1
        [repaired] = await queue.claim(conn, "w", 10, 30)
        assert repaired.id == lost
        assert await queue.repair_sessions(conn, [session]) == 0  # it has its head
        assert await queue.repair_heads(conn) == 0


async def _heads(conn: asyncpg.Connection, session: str) -> list[int]:
    return [r["id"] for r in await conn.fetch(
        "SELECT id FROM fleet.messages WHERE session_id = $1 AND is_head ORDER BY id", session)]


async def _run_claimable(conn: asyncpg.Connection) -> list[int]:
    """Claim what is claimable and finish it: the ids claimed."""
    claimed = await queue.claim(conn, "w", 10, 30)
    assert await queue.finish(conn, [Outcome(
        message_id=c.id, lease_token=c.lease_token, state="done", reply="ok",
    ) for c in claimed]) == {c.id for c in claimed}
    return [c.id for c in claimed]


async def _idle_session(conn: asyncpg.Connection, session: str) -> None:
    """A session that exists and has nothing live: its one message enqueued, run, done."""
    opener = await queue.enqueue(conn, session, "opens the session")
    assert await _run_claimable(conn) == [opener]


async def test_a_message_committing_after_a_later_one_became_head_waits_behind_it(conn, db_url):
    """Ids are drawn at insert, heads made at commit: a message whose transaction commits after
    a later message of its session has become the head waits behind that head and runs next.
    The session never has two heads: the election at the late commit took the session's
    earliest waiting message, not the head, for a session without one, and made it a second
    head (both claimable at once). A cancel and the repairs, which ask the same question, make
    no second head either."""
    session = "late-commit"
    await _idle_session(conn, session)
    early_conn = await asyncpg.connect(db_url)
    try:
        async with early_conn.transaction():
            early = await queue.enqueue(early_conn, session, "smaller id, commits second")
            later = await queue.enqueue(conn, session, "larger id, commits first")
    finally:
        await early_conn.close()
    assert early < later
    assert await _heads(conn, session) == [later]

    cancelled = await queue.enqueue(conn, session, "cancelled while both wait")
    assert await queue.cancel(conn, cancelled, "test")  # promote_heads looks at the session
    assert await queue.repair_sessions(conn, [session]) == 0
    assert await queue.repair_heads(conn) == 0
    assert await _heads(conn, session) == [later]

    assert await _run_claimable(conn) == [later]  # alone: the other waits behind it
    assert await _run_claimable(conn) == [early]
    assert await _run_claimable(conn) == []


async def test_a_repeatable_read_enqueue_never_makes_a_second_head(conn, db_url):
    """A REPEATABLE READ transaction reads the snapshot it began with: its election at commit
    did not see a head another transaction had made since, and made its own message a second
    one. Such an enqueue now leaves the election to the workers (fleet_repair): its message
    waits behind the head, and a repair finds the session headed."""
    session = "rr-second-head"
    await _idle_session(conn, session)
    late = await asyncpg.connect(db_url)
    try:
        async with late.transaction(isolation="repeatable_read"):
            await late.fetchval("SELECT count(*) FROM fleet.messages")  # its snapshot, now
            first = await queue.enqueue(conn, session, "made head by its own commit")
            second = await queue.enqueue(late, session, "enqueued on the older snapshot")
    finally:
        await late.close()
    assert await _heads(conn, session) == [first]
    assert await queue.repair_sessions(conn, [session]) == 0
    assert await _run_claimable(conn) == [first]
    assert await _run_claimable(conn) == [second]


async def test_a_worker_refuses_a_database_whose_default_isolation_is_not_read_committed(
    conn, settings
):
    """Under REPEATABLE READ a finish reads the snapshot its transaction began with, not what
    committed before it took the session's lock, and misses a message enqueued in between
    (its session would wait for a head until the periodic repair). A worker started on such
    a database says so and claims nothing."""
    from fleet.errors import ConfigurationError

    database = await conn.fetchval("SELECT current_database()")
    await conn.execute(f'ALTER DATABASE "{database}"'
                       " SET default_transaction_isolation = 'repeatable read'")
    await queue.enqueue(conn, "isolation", "waits")
    with pytest.raises(ConfigurationError,
                       match="default_transaction_isolation is 'repeatable read'"):
        await asyncio.wait_for(Worker(settings, NoopHandler(), concurrency=2).run(), 30)
    assert await conn.fetchval("SELECT state FROM fleet.messages") == "queued"


async def test_repairing_a_session_that_has_its_head_takes_no_lock(conn, db_url):
    """Every listening worker hears a fleet_repair and calls repair_sessions: those that come
    after the first find the session headed and must not queue for its row lock behind a
    worker finishing its head (a finish holds it FOR NO KEY UPDATE, which FOR UPDATE waits
    for)."""
    session = "repair-headed"
    await queue.enqueue(conn, session, "first")
    await queue.enqueue(conn, session, "second")
    [running] = await queue.claim(conn, "w", 10, 30)  # the head runs; "second" waits behind it
    finisher = await asyncpg.connect(db_url)
    try:
        async with finisher.transaction():
            await finisher.execute("SELECT 1 FROM fleet.sessions WHERE session_id = $1"
                                   " FOR NO KEY UPDATE", session)
            await conn.execute("SET lock_timeout = '2s'")
            try:
                assert await queue.repair_sessions(conn, [session]) == 0
            finally:
                await conn.execute("RESET lock_timeout")
    finally:
        await finisher.close()
    assert await conn.fetchval(
        "SELECT is_head FROM fleet.messages WHERE id = $1", running.id) is True


async def test_a_listening_worker_repairs_a_lost_head_when_told(settings, conn, db_url):
    """The notification, not the scan: a worker hears fleet_repair and gives the session its
    head at once, long before its next full scan (FULL_REPAIR_INTERVAL; the first ran as it
    started, before the message existed)."""
    worker = Worker(settings, NoopHandler(work_delay=1.0), concurrency=4)
    async with running(worker):
        await listening(conn)
        head = await queue.enqueue(conn, "rr-told", "first")
        await wait_until(lambda: conn.fetchval(
            "SELECT state = 'running' FROM fleet.messages WHERE id = $1", head))
        late = await asyncpg.connect(db_url)
        try:
            async with late.transaction(isolation="repeatable_read"):
                await late.fetchval("SELECT count(*) FROM fleet.messages")  # sees it running
                await wait_until(lambda: conn.fetchval(
                    "SELECT state = 'done' FROM fleet.messages WHERE id = $1", head))
                lost = await queue.enqueue(late, "rr-told", "second")
        finally:
            await late.close()
        await wait_until(lambda: conn.fetchval(
            "SELECT state = 'done' FROM fleet.messages WHERE id = $1", lost),
            timeout=10, message="the message whose head was lost, done")


def test_retry_delay_grows_exponentially_with_jitter_and_a_cap():
    for attempt in range(1, 8):
        ceiling = min(8.0, 0.5 * 2 ** (attempt - 1))
        delays = [retry_delay(attempt, 0.5, 8.0) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > 0  # jitter
    assert retry_delay(50, 0.5, 8.0) <= 8.0


async def test_a_worker_opens_its_whole_pool_at_start_and_keeps_it(settings, conn):
    """A pool that grew under load opened its extra connections mid-burst, and the claims
    queued behind them waited for new backends (the queue bench's sustained p99). Under a
    connection limit it opens fewer: tests/test_connection_budget.py."""
    from fleet.worker import POOL_SIZE

    async with running(Worker(settings, NoopHandler(), concurrency=2)) as worker:
        await listening(conn)
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fleet-worker'"
            " AND datname = current_database()") == POOL_SIZE
        assert worker.pool is not None
        assert worker.pool._max_inactive_connection_lifetime == 0  # never closed for idling


async def test_committed_enqueue_wakes_a_worker_by_notify_not_poll(settings, conn):
    settings = settings.model_copy(update={"fleet_poll_interval": 60.0})
    worker = Worker(settings, NoopHandler(), concurrency=2)
    task = asyncio.create_task(worker.run())
    try:
        await listening(conn)  # its first claims are done
        await asyncio.sleep(0.3)

        tr = conn.transaction()
        await tr.start()
        rolled_back = await queue.enqueue(conn, "s-rb", "rolled back")
        await tr.rollback()

        started = asyncio.get_running_loop().time()
        committed = await queue.enqueue(conn, "s-ok", "committed")
        await wait_until(lambda: conn.fetchval(
            "SELECT state = 'done' FROM fleet.messages WHERE id = $1", committed),
            timeout=10, message="the committed message to be done")
        # Poll interval is 60 s: finishing within a few seconds means NOTIFY woke the worker.
        assert asyncio.get_running_loop().time() - started < 5
        assert await conn.fetchval(
            "SELECT count(*) FROM fleet.messages WHERE id = $1", rolled_back) == 0
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def test_a_wakeup_during_a_claim_is_not_lost(settings, conn):
    """A message committed while the worker's claim is under way (its snapshot taken before
    the commit, its NOTIFY heard before the claim returns) is claimed right after, not at
    the next poll (60 s here) or the next outcome (3 s here)."""
    settings = settings.model_copy(update={"fleet_poll_interval": 60.0})
    worker = Worker(settings, NoopHandler(work_delay=3.0), concurrency=4)
    real = queue.finish_and_claim
    claim_ran = asyncio.Event()

    async def slow_to_return(*args, **kwargs):
        result = await real(*args, **kwargs)
        if result[1]:  # the claim that took the first message: return late
            claim_ran.set()
            await asyncio.sleep(0.5)
        return result

    queue.finish_and_claim = slow_to_return
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fleet-listener'"),
            message="the worker's LISTEN connection")
        await queue.enqueue(conn, "first", "one")
        await asyncio.wait_for(claim_ran.wait(), 10)
        second = await queue.enqueue(conn, "second", "two")  # during the slow return
        await wait_until(lambda: conn.fetchval(
            "SELECT state = 'running' FROM fleet.messages WHERE id = $1", second),
            timeout=2, message="the second message to be claimed")
    finally:
        queue.finish_and_claim = real
        worker.stop()
        await asyncio.wait_for(task, 30)


async def test_failing_handler_is_retried_with_backoff_then_dead(settings, conn):
    message_id = await queue.enqueue(conn, "s1", "please #fail", max_attempts=3)
    follower = await queue.enqueue(conn, "s1", "after the failure")
    async with running(Worker(settings, NoopHandler(), concurrency=2)):
        await wait_until(lambda: conn.fetchval(
            "SELECT state = 'done' FROM fleet.messages WHERE id = $1", follower),
            timeout=30, message="the follower to be done")
    row = await conn.fetchrow("SELECT * FROM fleet.messages WHERE id = $1", message_id)
    assert row["state"] == "dead"
    assert row["attempts"] == 3
    assert "told to fail" in row["error"]
    follower_row = await conn.fetchrow("SELECT * FROM fleet.messages WHERE id = $1", follower)
    assert follower_row["claimed_at"] > row["finished_at"]  # order held across the failure


async def test_a_retry_is_claimed_when_due_not_at_the_next_poll(settings, conn):
    """No NOTIFY announces a retry falling due: the worker that scheduled it looks then. With a
    60 s poll, two attempts 0.1-0.2 s apart end within seconds (before: at the next poll)."""
    from prometheus_client import REGISTRY

    def retry_wakeups() -> float:
        return REGISTRY.get_sample_value("fleet_wakeups_total", {"source": "retry"}) or 0.0

    slow_poll = settings.model_copy(update={"fleet_poll_interval": 60.0})
    message_id = await queue.enqueue(conn, "s1", "please #fail", max_attempts=2)
    before = retry_wakeups()
    async with running(Worker(slow_poll, NoopHandler(), concurrency=2)):
        await wait_until(lambda: conn.fetchval(
            "SELECT state = 'dead' FROM fleet.messages WHERE id = $1", message_id),
            timeout=10, message="the second attempt")
    assert await conn.fetchval(
        "SELECT attempts FROM fleet.messages WHERE id = $1", message_id) == 2
    assert retry_wakeups() == before + 1  # counted as its own source of wake-ups


class _CountingHandler(NoopHandler):
    """A no-op handler that records how many of its calls run at once, and when each ran."""

    def __init__(self, work_delay: float) -> None:
        super().__init__(work_delay)
        self.running = 0
        self.most = 0
        self.intervals: dict[int, tuple[float, float]] = {}

    async def handle(self, message, lease):
        self.running += 1
        self.most = max(self.most, self.running)
        started = time.monotonic()
        try:
            return await super().handle(message, lease)
        finally:
            self.intervals[message.id] = (started, time.monotonic())
            self.running -= 1


async def test_a_claim_batch_below_the_concurrency_overlaps_claims_within_the_cap(settings, conn):
    """``claim_batch`` * 2 <= ``concurrency``: the next claim runs while the last batch's
    handlers do (and, when they end during a call, a second call starts beside it), yet no
    more than ``concurrency`` handlers ever run, every message is done once, and each
    session's messages run one at a time in enqueue order."""
    ids: dict[str, list[int]] = {}
    async with conn.transaction():
        for n in range(240):
            session = f"s{n % 24}"
            ids.setdefault(session, []).append(await queue.enqueue(conn, session, f"m{n}"))
    handler = _CountingHandler(work_delay=0.01)
    worker = Worker(settings, handler, concurrency=8, claim_batch=4, drain=True)
    handlers_during_a_claim = largest_claim = 0
    real = queue.finish_and_claim

    async def counted(pool, worker_id, max_claims, *args, **kwargs):
        nonlocal handlers_during_a_claim, largest_claim
        handlers_during_a_claim = max(handlers_during_a_claim, handler.running)
        largest_claim = max(largest_claim, max_claims)
        return await real(pool, worker_id, max_claims, *args, **kwargs)

    queue.finish_and_claim = counted
    try:
        await asyncio.wait_for(worker.run(), 60)
    finally:
        queue.finish_and_claim = real
    assert worker._max_claims_in_flight == 2
    assert handlers_during_a_claim > 0 and largest_claim == 4
    assert handler.most <= 8
    rows = await conn.fetch("SELECT id, state, reply, attempts FROM fleet.messages")
    assert {(r["state"], r["reply"], r["attempts"]) for r in rows} == {("done", "ok", 1)}
    for session, in_order in ids.items():
        spans = [handler.intervals[i] for i in in_order]
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), session


async def test_work_announced_during_a_call_is_claimed_beside_it(settings, conn, monkeypatch):
    """A NOTIFY that arrives while the worker's call is under way starts a second call at
    once: the first call's claim may have started before the new message committed, and the
    message does not wait for that call to end before it is claimed."""
    release = asyncio.Event()
    real = queue.finish_and_claim
    calls = 0

    async def first_call_held(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(queue, "finish_and_claim", first_call_held)
    worker = Worker(settings, NoopHandler(), concurrency=2, claim_batch=1)
    async with running(worker):
        await listening(conn)
        message = await queue.enqueue(conn, "announced", "hello")
        try:
            await wait_until(lambda: conn.fetchval(
                "SELECT state <> 'queued' FROM fleet.messages WHERE id = $1", message),
                timeout=10, message="the message claimed while the first call is held")
        finally:
            release.set()
        await wait_until(lambda: conn.fetchval(
            "SELECT state = 'done' FROM fleet.messages WHERE id = $1", message),
            timeout=10, message="the message done")


class _StartsOnThirdTry(NoopHandler):
    """A handler whose start meets the database away twice (a replacement worker started
    while PostgreSQL restarts)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        if self.starts < 3:
            raise ConnectionRefusedError("[Errno 111] Connect call failed")


async def test_a_handler_start_that_meets_the_database_away_is_retried(settings, conn):
    """The worker waits for its handler's start as it waits for its own pool: it registers
    and works once the start goes through, instead of exiting."""
    handler = _StartsOnThirdTry()
    worker = Worker(settings, handler, concurrency=2)
    task = asyncio.create_task(worker.run())
    try:
        message = await queue.enqueue(conn, "late-start", "hello")
        await wait_until(lambda: conn.fetchval(
            "SELECT state = 'done' FROM fleet.messages WHERE id = $1", message),
            timeout=15, message="the message to be handled after the retried start")
        assert handler.starts == 3
        assert await conn.fetchval(
            "SELECT count(*) FROM fleet.workers WHERE worker_id = $1", worker.worker_id) == 1
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def test_an_agent_handler_start_that_fails_leaves_no_connection_open(
        settings, conn, monkeypatch):
    """What a failed start opened (the agent and audit pools) is closed before it raises, so
    the worker's retry does not pile up pools."""
    from fleet.handlers import build_handler

    handler = build_handler("agent", settings)

    async def refused(*args, **kwargs):
        raise ConnectionRefusedError("[Errno 111] Connect call failed")

    monkeypatch.setattr(handler.mcp, "warm", refused)  # after both pools are open
    with pytest.raises(ConnectionRefusedError):
        await handler.start()
    assert handler.pool is None and handler.audit is None
    assert await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name IN ('fleet-agent', 'fleet-audit')") == 0


async def test_a_retry_write_on_a_connection_broken_by_a_restart_is_left_to_the_lease(
        settings, conn, caplog, monkeypatch):
    """After a PostgreSQL restart a pooled connection can fail with asyncpg's
    InternalClientError ("cannot switch to state ..."): writing a failed attempt's retry
    that way is the database being away, so the worker logs it and lets the lease expire
    (the message is taken over then), instead of the message's task dying with it unseen."""
    async def broken(*args, **kwargs):
        raise asyncpg.InternalClientError(
            "cannot switch to state 11; another operation (2) is in progress")

    async def handled() -> bool:
        return worker.processed >= 1

    monkeypatch.setattr(queue, "retry", broken)
    worker = Worker(settings, NoopHandler(), concurrency=1)
    task = asyncio.create_task(worker.run())
    try:
        message = await queue.enqueue(conn, "broken-retry", "please #fail")
        await wait_until(handled, timeout=15, message="the failed attempt to be handled")
        assert "could not schedule retry" in caplog.text
        assert message not in worker.held  # not released at shutdown: the lease decides
        assert await conn.fetchval(
            "SELECT state FROM fleet.messages WHERE id = $1", message) == "running"
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
