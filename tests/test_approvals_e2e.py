"""Issue 5's acceptance, with real processes: worker A parks a refund and exits, the approver
decides from another process, worker B (a new process) resumes it.

One seeded database and one ``fleet mcp serve`` for the module (seeding embeds the corpus once);
every scenario uses its own session and its own order, so scenarios do not see each other. The
agent is the offline policy model (no LLM): "please refund order #NNNN" makes it look the order
up and call ``issue_refund``, which the fleet gates behind a human.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import _admin, _with_database
from tests.processes import ROOT, fleet, start_fleet, stop, wait_until

# About 2.5 minutes on a loaded 2-core machine: a seeded database, an MCP server and a dozen
# worker/approver processes.
pytestmark = pytest.mark.slow


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    logs: Path

    def worker_env(self, **extra: str) -> dict[str, str]:
        return {**self.env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(
    server_url: str, template_url: str, fleet_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    name = f"t_appr_{uuid.uuid4().hex[:10]}"
    asyncio.run(
        _admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_url.rsplit("/", 1)[1]}"')
    )
    url = _with_database(server_url, name)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "OPENAI_"))}
    env.update(
        DATABASE_URL=url,
        FLEET_HOME=str(fleet_home),
        FLEET_MODEL="offline",
        FLEET_LEASE_SECONDS="5",
        FLEET_POLL_INTERVAL="0.5",
        FLEET_RETRY_BASE_SECONDS="0.1",
        FLEET_RETRY_MAX_SECONDS="1",
        FLEET_SHUTDOWN_GRACE="10",
        FLEET_LOG_LEVEL="INFO",
        CUSTOMER_DATA_URL=f"http://127.0.0.1:{port}/mcp",
        CUSTOMER_DATA_TOKEN=secrets.token_urlsafe(24),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    logs = tmp_path_factory.mktemp("approvals-e2e")
    seeded = fleet("seed", env=env, timeout=300)
    assert seeded.returncode == 0, seeded.stderr
    server = start_fleet("mcp", "serve", "--port", str(port), env=env, log=logs / "mcp.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (logs / "mcp.log").read_text()
                assert time.monotonic() < deadline, "the MCP server did not start"
                time.sleep(0.2)
        yield Stack(url=url, env=env, logs=logs)
    finally:
        stop(server)
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    from fleet.database import connect
    from fleet.settings import Settings

    conn = await connect(Settings(database_url=stack.url), "fleet-test", url=stack.url)
    yield conn
    await conn.close()


async def _order(db: asyncpg.Connection, preferred: str | None = None) -> dict[str, Any]:
    """An order nobody has refunded yet (each scenario takes its own)."""
    if preferred and await db.fetchval(
        "SELECT 1 FROM orders o WHERE id = $1 AND status = 'delivered' "
        "AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.id)",
        preferred,
    ):
        row = await db.fetchrow("SELECT * FROM orders WHERE id = $1", preferred)
    else:
        row = await db.fetchrow(
            "SELECT * FROM orders o WHERE status IN ('delivered', 'shipped', 'paid') "
            "AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.id) "
            "AND NOT EXISTS (SELECT 1 FROM run_states s WHERE s.arguments->>'order_id' = o.id) "
            "AND o.id <> '4429' ORDER BY o.id LIMIT 1"
        )
    assert row is not None, "the seed has no unrefunded order left for this scenario"
    return dict(row)


def _run_worker(stack: Stack, label: str, *, timeout: float = 120, **extra: str) -> None:
    """A worker process that drains the queue and exits (worker A, worker B)."""
    log = stack.logs / f"{label}.log"
    with open(log, "w") as out:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fleet",
                "worker",
                "--handler",
                "agent",
                "--drain",
                "--concurrency",
                "4",
            ],
            env=stack.worker_env(**extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            timeout=timeout,
        )
    assert done.returncode == 0, log.read_text()[-4000:]


def _enqueue(stack: Stack, session: str, text: str, customer_id: str) -> int:
    """``fleet enqueue`` in its own process; returns the message id."""
    done = fleet("enqueue", session, text, "--customer-id", customer_id, env=stack.env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


async def _session_state(db: asyncpg.Connection, session: str, order_id: str) -> dict[str, Any]:
    return {
        "run_states": [
            dict(r)
            for r in await db.fetch(
                "SELECT id::text, status, decision, decided_by, tool, arguments, resumed_at "
                "FROM run_states WHERE conversation_id = $1 ORDER BY requested_at",
                session,
            )
        ],
        "refunds": await db.fetchval("SELECT count(*) FROM refunds WHERE order_id = $1", order_id),
        "order_status": await db.fetchval("SELECT status FROM orders WHERE id = $1", order_id),
        "messages": [
            dict(r)
            for r in await db.fetch(
                "SELECT id, state, reply, claimed_at, finished_at FROM fleet.messages "
                "WHERE session_id = $1 ORDER BY id",
                session,
            )
        ],
        "actions": [
            r["action"]
            for r in await db.fetch(
                "SELECT action FROM audit_log WHERE conversation_id = $1 ORDER BY id", session
            )
        ],
    }


async def _park_refund(
    stack: Stack, db: asyncpg.Connection, order: dict[str, Any], **worker_env: str
) -> tuple[str, int, str]:
    """Worker A takes the refund request, parks it and exits, while ``fleet enqueue --wait``
    reports the approval it waits on. Returns (session, message id, approval id)."""
    session = f"refund-{uuid.uuid4().hex[:8]}"
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet",
            "enqueue",
            session,
            f"please refund order #{order['id']}",
            "--customer-id",
            order["customer_id"],
            "--wait",
            "--timeout",
            "120",
            "--json",
        ],
        env=stack.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        async def enqueued() -> bool:
            return await db.fetchval(
                "SELECT count(*) = 1 FROM fleet.messages WHERE session_id = $1", session
            )

        await wait_until(enqueued, timeout=60, message="the refund request to be enqueued")
        _run_worker(stack, f"worker-a-{session}", **worker_env)
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, err
    reply = json.loads(out)
    state = await _session_state(db, session, order["id"])
    assert [r["status"] for r in state["run_states"]] == ["awaiting"], state
    [run] = state["run_states"]
    assert (reply["state"], reply["approval_id"]) == ("awaiting_approval", run["id"])
    assert run["tool"] == "issue_refund"
    assert str(run["arguments"]["order_id"]).lstrip("#") == order["id"]
    assert state["refunds"] == 0 and state["order_status"] == order["status"]
    assert [m["state"] for m in state["messages"]] == ["awaiting_approval"]
    assert "approval_requested" in state["actions"] and "refund_issued" not in state["actions"]
    return session, reply["message_id"], run["id"]


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return fleet(*args, env=stack.env, timeout=60)


# -- 1, 2, 4 (twice), 6: park, approve elsewhere, resume in a new process ---------------------


async def test_a_parked_refund_is_approved_in_another_process_and_resumed_by_a_new_worker(
    stack: Stack, db: asyncpg.Connection
):
    order = await _order(db, "4429")
    session, _, approval_id = await _park_refund(stack, db, order)

    shown = _cli(stack, "approvals", "show", approval_id)
    assert shown.returncode == 0, shown.stderr
    assert f"#{order['id']}" in shown.stdout

    approved = _cli(stack, "approve", approval_id, "--by", "alice", "--note", "photo checked")
    assert approved.returncode == 0, approved.stderr
    again = _cli(stack, "approve", approval_id, "--by", "alice")
    assert again.returncode != 0 and "already approved" in again.stderr

    _run_worker(stack, f"worker-b-{session}")
    state = await _session_state(db, session, order["id"])
    assert state["refunds"] == 1
    assert state["order_status"] == "refunded"
    assert state["actions"].count("refund_issued") == 1
    assert [r["status"] for r in state["run_states"]] == ["resumed"]
    [message] = state["messages"]
    assert message["state"] == "done"
    assert "refund" in message["reply"].lower() and "issued" in message["reply"].lower()

    # Resumed, it still says what was decided, by whom (JSON and text).
    resumed = json.loads(_cli(stack, "approvals", "show", approval_id, "--json").stdout)
    assert (resumed["status"], resumed["decision"], resumed["decided_by"]) == (
        "resumed", "approved", "alice")
    shown = _cli(stack, "approvals", "show", approval_id)
    assert "decided     approved by alice" in shown.stdout, shown.stdout

    # Approving the resumed run once more changes nothing.
    third = _cli(stack, "approve", approval_id, "--by", "bob")
    assert third.returncode != 0
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE order_id = $1", order["id"]) == 1

    # 6. The episode replays from the database alone: the audit trail and the parked run.
    trace = _cli(stack, "trace", session, "--json")
    assert trace.returncode == 0, trace.stderr
    replay = json.dumps(json.loads(trace.stdout))
    order_of = [
        a
        for a in (
            "message_received",
            "approval_requested",
            "approval_decided",
            "run_resumed",
            "refund_issued",
            "message_sent",
        )
    ]
    positions = [replay.find(f'"{a}"') for a in order_of]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), replay[:3000]
    assert approval_id in replay


# -- 3: reject ---------------------------------------------------------------------------------


async def test_a_rejected_refund_writes_nothing_and_the_customer_is_told_no(
    stack: Stack, db: asyncpg.Connection
):
    order = await _order(db)
    before_refunds = await db.fetchval("SELECT count(*) FROM refunds")
    session, _, approval_id = await _park_refund(stack, db, order)
    rejected = _cli(
        stack,
        "reject",
        approval_id,
        "--by",
        "bob",
        "--reason",
        "the order is outside the refund window",
    )
    assert rejected.returncode == 0, rejected.stderr
    _run_worker(stack, f"worker-b-{session}")
    state = await _session_state(db, session, order["id"])
    assert await db.fetchval("SELECT count(*) FROM refunds") == before_refunds
    assert state["order_status"] == order["status"]
    assert "refund_blocked" in state["actions"] and "refund_issued" not in state["actions"]
    assert [r["status"] for r in state["run_states"]] == ["resumed"]
    assert state["run_states"][0]["decision"] == "rejected"
    [message] = state["messages"]
    assert message["state"] == "done"
    assert "can't" in message["reply"].lower() or "cannot" in message["reply"].lower()


# -- 4: two workers racing to resume one approved run ------------------------------------------


async def test_two_workers_racing_to_resume_one_approval_issue_one_refund(
    stack: Stack, db: asyncpg.Connection
):
    order = await _order(db)
    session, _, approval_id = await _park_refund(stack, db, order)
    approvers = [
        subprocess.Popen(
            [sys.executable, "-m", "fleet", "approve", approval_id, "--by", who],
            env=stack.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("alice", "bob")
    ]
    workers = [
        start_fleet(
            "worker",
            "--handler",
            "agent",
            "--concurrency",
            "4",
            env=stack.env,
            log=stack.logs / f"race-{i}-{session}.log",
        )
        for i in range(2)
    ]
    try:
        codes = [p.wait(timeout=60) for p in approvers]
        assert sorted(codes)[0] == 0 and sorted(codes)[1] != 0, codes

        async def answered() -> bool:
            return await db.fetchval(
                "SELECT state = 'done' FROM fleet.messages WHERE session_id = $1", session
            )

        await wait_until(answered, timeout=90, message="the resumed refund to be answered")
    finally:
        for w in workers:
            stop(w)
    state = await _session_state(db, session, order["id"])
    assert state["refunds"] == 1
    assert state["actions"].count("refund_issued") == 1
    assert state["actions"].count("approval_decided") == 1
    assert state["actions"].count("run_resumed") == 1


# -- 5: expiry ---------------------------------------------------------------------------------


async def test_an_undecided_refund_expires_as_a_rejection(stack: Stack, db: asyncpg.Connection):
    order = await _order(db)
    session, _, approval_id = await _park_refund(stack, db, order, FLEET_APPROVAL_TTL_SECONDS="2")
    worker = start_fleet(
        "worker", "--handler", "agent", env=stack.env, log=stack.logs / f"worker-b-{session}.log"
    )
    try:

        async def answered() -> bool:
            return await db.fetchval(
                "SELECT state = 'done' FROM fleet.messages WHERE session_id = $1", session
            )

        await wait_until(answered, timeout=90, message="the expired refund to be answered")
    finally:
        stop(worker)
    state = await _session_state(db, session, order["id"])
    [run] = state["run_states"]
    assert (run["decision"], run["decided_by"]) == ("rejected", "fleet:expiry")
    assert "approval_expired" in state["actions"] and "refund_blocked" in state["actions"]
    assert state["refunds"] == 0 and state["order_status"] == order["status"]
    late = _cli(stack, "approve", approval_id, "--by", "alice")
    assert late.returncode != 0 and "expired" in late.stderr


# -- 7: a message sent while a refund is parked waits for the decision -------------------------


async def test_a_later_message_of_the_session_is_answered_after_the_decision_in_order(
    stack: Stack, db: asyncpg.Connection
):
    order = await _order(db)
    session, first, approval_id = await _park_refund(stack, db, order)
    second = _enqueue(
        stack, session, f"also, what is the status of order #{order['id']}?", order["customer_id"]
    )
    worker = start_fleet(
        "worker", "--handler", "agent", env=stack.env, log=stack.logs / f"worker-c-{session}.log"
    )
    try:
        await asyncio.sleep(3)  # worker C is up and polling: the second message must not move
        assert (
            await db.fetchval("SELECT state FROM fleet.messages WHERE id = $1", second) == "queued"
        )
        decided = _cli(stack, "approve", approval_id, "--by", "alice")
        assert decided.returncode == 0, decided.stderr

        async def both_answered() -> bool:
            return await db.fetchval(
                "SELECT bool_and(state = 'done') FROM fleet.messages WHERE session_id = $1", session
            )

        await wait_until(both_answered, timeout=90, message="both messages to be answered")
    finally:
        stop(worker)
    rows = {
        r["id"]: r
        for r in await db.fetch(
            "SELECT id, claimed_at, finished_at FROM fleet.messages WHERE session_id = $1", session
        )
    }
    decided_at = await db.fetchval(
        "SELECT decided_at FROM run_states WHERE id = $1::uuid", approval_id
    )
    assert rows[second]["claimed_at"] > decided_at
    assert rows[second]["claimed_at"] >= rows[first]["finished_at"]
