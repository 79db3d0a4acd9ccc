"""The agent turn: memory and audit on real PostgreSQL, then whole turns on real processes.

Unit-level (real database, in-process): the asyncpg Session (one write per turn, fenced by the
lease, retried attempts never doubled) and the audit writer (batched, retried, counted, never
raising). Process-level (issue 4's acceptance): ``fleet worker --handler agent`` or ``fleet up``
subprocesses, ``fleet mcp serve`` over streamable HTTP, the seeded database, the offline model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleet import queue
from fleet.audit import AuditWriter, TurnAudit
from fleet.memory import PostgresSession
from fleet.settings import Settings
from tests.processes import fleet, fleet_json, start_fleet, stop, wait_until

ACTIONS_OF_A_TURN = ("message_received", "capability_invoked", "message_sent")


async def _claim(conn: asyncpg.Connection, session: str, body: str) -> queue.ClaimedMessage:
    await queue.enqueue(conn, session, body)
    claimed = await queue.claim(conn, "test-worker", 1, 30)
    assert claimed, "nothing claimable"
    return claimed[0]


# -- memory ----------------------------------------------------------------------------------


async def test_session_reads_once_buffers_and_writes_the_turn_in_one_fenced_statement(
    conn: asyncpg.Connection, db_url: str
) -> None:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2, init=_json_codecs)
    try:
        message = await _claim(conn, "mem-1", "hello")
        session = await PostgresSession.open_turn(
            pool, "mem-1", message_id=message.id, user_id="C-1"
        )
        assert await conn.fetchval(
            "SELECT user_id FROM conversations WHERE session_id = 'mem-1'"
        ) == "C-1"
        await session.add_items([{"role": "user", "content": "hello"}])
        await session.add_items([{"type": "message", "role": "assistant",
                                  "content": [{"type": "output_text", "text": "hi"}]}])
        # Nothing written until the turn ends, but the SDK sees history + buffer.
        assert await conn.fetchval("SELECT count(*) FROM agent_session_items") == 0
        assert len(await session.get_items()) == 2
        assert (await session.get_items(limit=1))[0]["role"] == "assistant"

        written = await session.flush(message.lease_token, summary="greeted")
        assert written == 2
        rows = await conn.fetch(
            "SELECT item, message_id FROM agent_session_items WHERE session_id = 'mem-1' "
            "ORDER BY id"
        )
        assert [r["item"].get("role") for r in rows] == ["user", "assistant"]
        assert {r["message_id"] for r in rows} == {message.id}
        assert await conn.fetchval(
            "SELECT summary FROM conversations WHERE session_id = 'mem-1'"
        ) == "greeted"

        # A lost lease writes nothing.
        await session.add_items([{"role": "user", "content": "zombie"}])
        from fleet.errors import LeaseLost

        with pytest.raises(LeaseLost):
            await session.flush(message.lease_token + 1000)
        assert await conn.fetchval("SELECT count(*) FROM agent_session_items") == 2

        # pop_item and clear_session.
        fresh = PostgresSession(pool, "mem-1")
        assert (await fresh.pop_item())["role"] == "assistant"
        assert len(await fresh.get_items()) == 1
        await fresh.clear_session()
        assert await conn.fetchval("SELECT count(*) FROM agent_session_items") == 0
    finally:
        await pool.close()


async def test_a_retried_attempt_replaces_what_the_failed_attempt_wrote(
    conn: asyncpg.Connection, db_url: str
) -> None:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2, init=_json_codecs)
    try:
        first = await _claim(conn, "mem-2", "turn one")
        s1 = await PostgresSession.open_turn(pool, "mem-2", message_id=first.id, user_id="u")
        await s1.add_items([{"role": "user", "content": "turn one"}])
        await s1.flush(first.lease_token)
        await queue.finish(conn, [queue.Outcome(message_id=first.id,
                                                lease_token=first.lease_token,
                                                state="done", reply="ok")])

        second = await _claim(conn, "mem-2", "turn two")
        attempt1 = await PostgresSession.open_turn(
            pool, "mem-2", message_id=second.id, user_id="u"
        )
        await attempt1.add_items([{"role": "user", "content": "turn two"}])
        await attempt1.flush(second.lease_token)  # wrote, then the worker died before finishing

        attempt2 = await PostgresSession.open_turn(
            pool, "mem-2", message_id=second.id, user_id="u"
        )
        history = await attempt2.get_items()
        assert [i["content"] for i in history] == ["turn one"]
        await attempt2.add_items([{"role": "user", "content": "turn two"}])
        await attempt2.flush(second.lease_token)
        contents = [r["item"]["content"] for r in await conn.fetch(
            "SELECT item FROM agent_session_items WHERE session_id = 'mem-2' ORDER BY id")]
        assert contents == ["turn one", "turn two"]
    finally:
        await pool.close()


async def _json_codecs(connection: asyncpg.Connection) -> None:
    from fleet.database import _init_json

    await _init_json(connection)


# -- audit -----------------------------------------------------------------------------------


async def test_audit_writer_batches_turns_and_keeps_event_order(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    writer = AuditWriter(settings)
    await writer.start()
    try:
        turns = []
        for n in range(20):
            sid = f"aud-{n}"
            await conn.execute(
                "INSERT INTO conversations (session_id, user_id) VALUES ($1, 'u')", sid
            )
            turn = TurnAudit(sid, actor="agent:support")
            turn.event("message_received", f"conversation:{sid}", {"message_id": n})
            turn.capability("mcp:lookup_order", action="capability_invoked",
                            arguments={"order_id": "4429"}, result='{"status": "paid"}',
                            status="ok", latency_ms=3)
            turn.capability("mcp:issue_refund", action="capability_invoked",
                            arguments={"order_id": "4429"}, result="Error executing tool",
                            status="error", latency_ms=4)
            turn.event("message_sent", f"conversation:{sid}", {"message_id": n})
            turns.append(turn)
        results = await asyncio.gather(*(writer.write(t) for t in turns))
        assert all(results)
        actions = [r["action"] for r in await conn.fetch(
            "SELECT action FROM audit_log WHERE conversation_id = 'aud-7' ORDER BY created_at, id")]
        assert actions == ["message_received", "capability_invoked", "capability_invoked",
                           "message_sent"]
        statuses = await conn.fetch(
            "SELECT capability, status, latency_ms, result FROM capability_invocations "
            "WHERE conversation_id = 'aud-7' ORDER BY created_at")
        assert [(r["capability"], r["status"]) for r in statuses] == [
            ("mcp:lookup_order", "ok"), ("mcp:issue_refund", "error")]
        assert statuses[0]["result"] == {"output": {"status": "paid"}}
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 80
    finally:
        await writer.close()


async def test_audit_failures_are_retried_counted_and_never_raise(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    from fleet import metrics

    writer = AuditWriter(settings, attempts=2, backoff=0.01)
    await writer.start()
    try:
        await conn.execute("INSERT INTO conversations (session_id, user_id) VALUES ('ok', 'u')")
        good = TurnAudit("ok", actor="agent:support")
        good.event("message_received", "conversation:ok", {})
        bad = TurnAudit("no-such-conversation", actor="agent:support")  # FK violation
        bad.event("message_received", "conversation:x", {})
        before = metrics.AUDIT_WRITE_FAILURES._value.get()
        ok_good, ok_bad = await asyncio.gather(writer.write(good), writer.write(bad))
        # The bad turn's row is refused; the good turn in the same batch is still written.
        assert (ok_good, ok_bad) == (True, False)
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1
        assert writer.failed_rows == 1
        assert metrics.AUDIT_WRITE_FAILURES._value.get() > before

        # The database goes away: retried, counted, no exception.
        await writer.pool.close()
        lost = TurnAudit("ok", actor="agent:support")
        lost.event("message_sent", "conversation:ok", {})
        assert await writer.write(lost) is False
        assert writer.failed_rows == 2
    finally:
        writer._task.cancel()
