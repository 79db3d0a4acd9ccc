"""Issue 8's acceptance 3, 4 and 5, and the limits per turn, on the real agent handler.

A seeded database and the real customer-data server over HTTP (uvicorn in a thread) for the
module; each test runs an in-process ``Worker`` with the ``agent`` handler (the offline model,
whose inputs this process records) and drives it through ``fleet.Client``, as an integrator
would. Each test uses its own session.

* 3: a run variable given at enqueue reaches ``lookup_customer`` on the server side (its
  ``customer_data_read`` audit row carries it) and never the model's input;
* 4: ``run_sync`` returns the agent's reply (the rolled-back enqueue is in test_client.py);
* 5: cancelling a queued, a running (slow model) and a parked (refund awaiting approval)
  message: states, audit rows, no refund;
* limits: model calls, tool calls, tokens: each exceeded -> ``dead`` at once with a reason that
  names the knob, audited ``turn_limit_exceeded``.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

import fleet
from fleet import offline_model
from fleet.handlers import build_handler
from fleet.settings import Settings
from fleet.worker import Worker
from tests.processes import fleet as fleet_cli
from tests.processes import start_fleet, stop, wait_until
from tests.seeded import RunningServer, mcp_server_in_thread
from tests.workers import running

COMPLAINT = "I haven't received my refund from order #{order}, it's been two weeks."


@pytest.fixture(scope="module")
def server(seeded_db: str) -> Iterator[RunningServer]:
    with mcp_server_in_thread(seeded_db) as running:
        yield running


@pytest.fixture
def recorded() -> Iterator[list[dict[str, Any]]]:
    inputs = offline_model.record_inputs(True)
    assert inputs is not None
    yield inputs
    offline_model.record_inputs(False)


def _settings(seeded_db: str, server: RunningServer, **knobs: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": seeded_db,
        "customer_data_url": server.url,
        "customer_data_token": SecretStr(server.token),
        "fleet_model": "offline",
        "fleet_lease_seconds": 30.0,
        "fleet_poll_interval": 0.3,
        "fleet_retry_base_seconds": 0.1,
        "fleet_retry_max_seconds": 0.5,
        "fleet_shutdown_grace": 5.0,
        "fleet_mcp_startup_wait_seconds": 10.0,
    }
    values.update(knobs)
    return Settings(**values)


@asynccontextmanager
async def agent_worker(settings: Settings) -> AsyncIterator[Worker]:
    async with running(Worker(settings, build_handler("agent", settings), concurrency=4),
                       stop_timeout=60) as worker:
        yield worker


@asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[fleet.Client]:
    async with fleet.Client(settings.database_url, settings=settings, poll_interval=0.2) as c:
        yield c


async def _order(db: asyncpg.Connection, *, unrefunded: bool = False) -> dict[str, Any]:
    """A delivered order with its customer (an unrefunded one, never parked, when asked)."""
    row = await db.fetchrow(
        "SELECT o.id, o.customer_id, o.status FROM orders o "
        "WHERE o.status = 'delivered' AND o.id <> '4429' "
        "AND ($1 = false OR (NOT EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.id) "
        "     AND NOT EXISTS (SELECT 1 FROM run_states s WHERE s.arguments->>'order_id' = o.id))) "
        "ORDER BY o.id LIMIT 1",
        unrefunded,
    )
    assert row is not None
    return dict(row)


async def _trail(db: asyncpg.Connection, session: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT action, actor, target, payload, result FROM audit_log "
        "WHERE conversation_id = $1 ORDER BY created_at, id",
        session,
    )
    return [dict(r) for r in rows]


def _session() -> str:
    return f"tc-{uuid.uuid4().hex[:10]}"


# -- acceptance 3 and 4: run variables, run_sync on an agent worker ------------------------------


async def test_run_variables_reach_lookup_customer_on_the_server_and_never_the_model(
    seeded_db: str, server: RunningServer, db: asyncpg.Connection,
    recorded: list[dict[str, Any]],
) -> None:
    settings = _settings(seeded_db, server)
    order = await _order(db)
    session = _session()
    variables = {"tenant_id": "t-9", "user_id": "u-7"}
    async with agent_worker(settings), client_for(settings) as client:
        reply = await client.run_sync(
            session, COMPLAINT.format(order=order["id"]), timeout=60,
            customer_id=order["customer_id"], variables=variables,
        )
    # Acceptance 4: run_sync returns the agent's reply.
    assert reply.state == "done", reply
    assert reply.reply and order["id"] in reply.reply

    trail = await _trail(db, session)
    reads = [r for r in trail if r["action"] == "customer_data_read"]
    by_tool = {r["payload"]["tool"]: r for r in reads}
    assert "lookup_customer" in by_tool, [r["action"] for r in trail]
    lookup = by_tool["lookup_customer"]
    assert lookup["actor"] == "mcp:customer-data"
    assert lookup["payload"]["variables"] == variables
    assert lookup["payload"]["arguments"] == {"customer_id": order["customer_id"]}
    assert lookup["payload"]["session_id"] == session
    assert lookup["payload"]["message_id"] == reply.message_id
    assert by_tool["lookup_order"]["payload"]["variables"] == variables

    # The model saw this turn (several calls) but never the variables, keys or values.
    mine = [r for r in recorded if order["id"] in json.dumps(r, default=str)]
    assert len(mine) >= 2
    seen = json.dumps(mine, default=str)
    for text in ("t-9", "u-7", "tenant_id", "user_id"):
        assert text not in seen, f"{text!r} reached the model's input"


# -- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "limit", "reason"),
    [
        ({"fleet_max_model_calls": 2}, "model_calls",
         "turn limit exceeded: 3 model calls > max 2 (FLEET_MAX_MODEL_CALLS)"),
        ({"fleet_max_tool_calls": 2}, "tool_calls",
         "turn limit exceeded: 3 tool calls > max 2 (FLEET_MAX_TOOL_CALLS)"),
        ({"fleet_token_budget": 300}, "tokens", "tokens > max 300 (FLEET_TOKEN_BUDGET)"),
    ],
    ids=["model-calls", "tool-calls", "tokens"],
)
async def test_a_turn_past_its_limit_is_dead_at_once_with_the_reason_audited(
    seeded_db: str, server: RunningServer, db: asyncpg.Connection,
    knobs: dict[str, int], limit: str, reason: str,
) -> None:
    # The complaint takes 3 model calls and 4 tool calls (a skill, then three lookups at once).
    settings = _settings(seeded_db, server, fleet_max_attempts=5, **knobs)
    order = await _order(db)
    session = _session()
    async with agent_worker(settings), client_for(settings) as client:
        reply = await client.run_sync(
            session, COMPLAINT.format(order=order["id"]), timeout=60,
            customer_id=order["customer_id"],
        )
        message = await client.get_message(reply.message_id)
    assert reply.state == "dead", reply
    assert reason in (reply.error or ""), reply.error
    assert message.attempts == 1  # dead at once: retrying would loop again

    trail = await _trail(db, session)
    actions = [r["action"] for r in trail]
    assert "message_sent" not in actions and "turn_failed" not in actions, actions
    [exceeded] = [r for r in trail if r["action"] == "turn_limit_exceeded"]
    assert exceeded["payload"]["limit"] == limit
    assert exceeded["payload"]["used"] > exceeded["payload"]["max"]
    assert exceeded["result"] == {"status": "error", "retried": False}
    if limit == "tool_calls":
        # The call over the limit never ran; its row says it was blocked.
        blocked = await db.fetch(
            "SELECT capability, status FROM capability_invocations "
            "WHERE conversation_id = $1 AND status = 'blocked'", session)
        assert len(blocked) >= 1


async def test_the_limits_count_a_parked_and_resumed_turn_as_one(
    seeded_db: str, server: RunningServer, db: asyncpg.Connection
) -> None:
    """A refund parks for approval and resumes in whichever worker claims it: one turn, so its
    tool calls and tokens go on from what the parked run kept. Resumed under a tool-call limit
    equal to what the first part used, the refund call (one more) is over it: dead, and no
    refund is issued."""
    from fleet import approvals

    order = await _order(db, unrefunded=True)
    session = _session()
    settings = _settings(seeded_db, server)
    async with agent_worker(settings), client_for(settings) as client:
        parked = await client.run_sync(
            session, f"please refund order #{order['id']}", timeout=60,
            customer_id=order["customer_id"],
        )
    assert parked.state == "awaiting_approval" and parked.approval_id, parked
    state = await db.fetchval("SELECT state FROM run_states WHERE id = $1::uuid",
                              parked.approval_id)
    kept = json.loads(state)["context"]["context"]
    assert kept["tool_calls"] >= 1 and sum(kept["tokens"]) > 0, kept
    await approvals.approve(db, parked.approval_id, by="erin")

    tight = _settings(seeded_db, server, fleet_max_tool_calls=kept["tool_calls"])
    async with agent_worker(tight), client_for(tight) as client:
        reply = await client.wait_for_reply(parked.message_id, timeout=60)
    assert reply.state == "dead", reply
    assert f"tool calls > max {kept['tool_calls']}" in (reply.error or ""), reply.error
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE order_id = $1", order["id"]) == 0
    [exceeded] = [r for r in await _trail(db, session) if r["action"] == "turn_limit_exceeded"]
    assert exceeded["payload"]["used"] == kept["tool_calls"] + 1


# -- acceptance 5: cancellation -------------------------------------------------------------------


async def test_cancelling_a_queued_message_is_immediate_and_audited(
    seeded_db: str, server: RunningServer, db: asyncpg.Connection
) -> None:
    settings = _settings(seeded_db, server)
    session = _session()
    async with client_for(settings) as client:  # no worker: both stay queued
        first = await client.enqueue(session, "hello")
        second = await client.enqueue(session, "are you there?")
        reply = await client.cancel(second, reason="sent by mistake", by="alice")
        assert reply.state == "cancelled"
        assert (await client.get_message(first)).state == "queued"
        await client.cancel(first)
    [row, _] = [r for r in await _trail(db, session) if r["action"] == "message_cancelled"]
    assert row["actor"] == "user:alice"
    assert row["payload"]["message_id"] == second
    assert row["payload"]["was"] == "queued" and row["payload"]["reason"] == "sent by mistake"


async def test_cancelling_a_running_turn_stops_it_at_its_next_step_and_audits_it(
    seeded_db: str, server: RunningServer, db: asyncpg.Connection
) -> None:
    # A slow model (1 s a call, 3 calls) and a 60 s lease: the heartbeat alone would notice the
    # request only after 20 s; the NOTIFY makes the worker see it at once.
    settings = _settings(seeded_db, server, fleet_offline_latency_seconds=1.0,
                         fleet_lease_seconds=60.0)
    order = await _order(db)
    session = _session()
    async with agent_worker(settings), client_for(settings) as client:
        message_id = await client.enqueue(
            session, COMPLAINT.format(order=order["id"]), customer_id=order["customer_id"]
        )

        async def mid_turn() -> bool:  # claimed: the turn is in its first (1 s) model call
            return (await client.get_message(message_id)).state == "running"

        await wait_until(mid_turn, timeout=30, message="the turn to start")
        requested = await client.cancel(message_id, by="bob")
        assert requested.state in ("running", "cancelled")
        final = await client.wait_for_reply(message_id, timeout=15)
        assert final.state == "cancelled", final
        assert final.error == "cancelled while running"
        messages = await client.list_messages(session_id=session)
    assert [m.state for m in messages] == ["cancelled"]

    trail = await _trail(db, session)
    actions = [r["action"] for r in trail]
    assert actions[0] == "message_received"
    assert "cancel_requested" in actions and "message_sent" not in actions, actions
    [stopped] = [r for r in trail if r["action"] == "message_cancelled"]
    assert stopped["payload"]["was"] == "running"
    assert stopped["payload"]["stopped"].startswith(f"message {message_id} was cancelled before")
    assert stopped["payload"]["model_calls"] < 3  # it did not run to the end
    [asked] = [r for r in trail if r["action"] == "cancel_requested"]
    assert asked["actor"] == "user:bob" and asked["payload"]["was"] == "running"
    # Nothing of the cancelled turn entered the conversation's memory.
    assert await db.fetchval(
        "SELECT count(*) FROM agent_session_items WHERE session_id = $1", session) == 0


async def test_cancelling_a_parked_refund_rejects_its_approval_and_no_refund_is_issued(
    seeded_db: str, server: RunningServer, db: asyncpg.Connection
) -> None:
    settings = _settings(seeded_db, server)
    order = await _order(db, unrefunded=True)
    session = _session()
    async with agent_worker(settings), client_for(settings) as client:
        parked = await client.run_sync(
            session, f"please refund order #{order['id']}", timeout=60,
            customer_id=order["customer_id"],
        )
        assert parked.state == "awaiting_approval" and parked.approval_id, parked
        reply = await client.cancel(parked.message_id, reason="customer withdrew", by="carol")
        assert reply.state == "cancelled"
        # An approval now is refused: the run can never resume.
        from fleet import approvals

        with pytest.raises(fleet.errors.FleetError):
            await approvals.approve(client.pool, parked.approval_id, by="dave")
        # The worker keeps running a moment: nothing to resume, nothing claimed.
        await asyncio.sleep(1.0)
        assert (await client.get_message(parked.message_id)).state == "cancelled"

    run = await db.fetchrow("SELECT status, decided_by, decision_note FROM run_states "
                            "WHERE id = $1::uuid", parked.approval_id)
    assert dict(run) == {"status": "rejected", "decided_by": "fleet:cancel",
                         "decision_note": "customer withdrew"}
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE order_id = $1", order["id"]) == 0
    assert await db.fetchval("SELECT status FROM orders WHERE id = $1", order["id"]) == \
        order["status"]
    actions = [r["action"] for r in await _trail(db, session)]
    assert "approval_requested" in actions and "refund_issued" not in actions
    assert actions[-3:] == ["approval_decided", "refund_blocked", "message_cancelled"] or \
        actions[-2:] == ["approval_decided", "message_cancelled"], actions


async def test_fleet_cancel_stops_a_turn_running_in_a_worker_process(
    seeded_db: str, server: RunningServer, db: asyncpg.Connection, fleet_home: Path,
    tmp_path: Path,
) -> None:
    """The same across processes: ``fleet worker`` runs the turn, ``fleet cancel`` (another
    process) asks it to stop and waits; the request reaches the worker by NOTIFY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "OPENAI_"))}
    env.update(
        DATABASE_URL=seeded_db, FLEET_HOME=str(fleet_home), FLEET_MODEL="offline",
        FLEET_OFFLINE_LATENCY_SECONDS="1.5", FLEET_LEASE_SECONDS="60",
        FLEET_POLL_INTERVAL="0.3", FLEET_SHUTDOWN_GRACE="5", FLEET_LOG_LEVEL="INFO",
        CUSTOMER_DATA_URL=server.url, CUSTOMER_DATA_TOKEN=server.token,
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    )
    settings = _settings(seeded_db, server)
    order = await _order(db)
    session = _session()
    log = tmp_path / "worker.log"
    worker = start_fleet("worker", "--handler", "agent", "--concurrency", "2", env=env, log=log)
    try:
        async with client_for(settings) as client:
            message_id = await client.enqueue(
                session, COMPLAINT.format(order=order["id"]), customer_id=order["customer_id"]
            )

            async def running() -> bool:
                assert worker.poll() is None, log.read_text()[-3000:]
                return (await client.get_message(message_id)).state == "running"

            await wait_until(running, timeout=60, message="the worker to start the turn")
            done = fleet_cli("cancel", str(message_id), "--by", "ops", "--reason", "duplicate",
                             "--wait", "15", "--json", env=env, timeout=60)
            assert done.returncode == 0, done.stderr
            reply = json.loads(done.stdout)
            assert (reply["message_id"], reply["state"]) == (message_id, "cancelled"), reply
            assert reply["error"] == "cancelled while running: duplicate"
            again = fleet_cli("cancel", str(message_id), env=env, timeout=60)
            assert again.returncode != 0 and "already cancelled" in again.stderr
    finally:
        assert stop(worker) == 0, log.read_text()[-3000:]
    trail = await _trail(db, session)
    actions = [r["action"] for r in trail]
    assert "cancel_requested" in actions and actions[-1] == "message_cancelled", actions
    assert "message_sent" not in actions
    assert trail[-1]["actor"].startswith("agent:")
    assert "cancelled while running" in log.read_text()
