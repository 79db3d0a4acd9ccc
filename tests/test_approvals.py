"""Approvals on a real PostgreSQL: parking a claimed message under its lease, deciding once
(compare-and-set, also under concurrent deciders), resuming once, expiry, cancellation, errors,
and the approver CLI in subprocesses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from fleet import approvals, queue
from fleet.approvals import park_run, take_decided_run
from fleet.cancellation import cancel_message
from fleet.database import create_pool
from fleet.errors import InvalidInput, LeaseLost, NotFound
from fleet.handlers import Lease
from fleet.settings import Settings
from fleet.sql import queries
from tests.processes import fleet
from tests.workers import expire_lease

REFUND = {
    "tool": "issue_refund",
    "arguments": json.dumps(
        {"order_id": "4429", "amount_cents": 2999, "reason": "arrived damaged"}
    ),
    "call_id": "call_1",
}
STATE = json.dumps({"$schemaVersion": "test", "note": "a serialized RunState stand-in"})


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings, "fleet-test", min_size=1, max_size=10)
    await _seed(pool)
    yield pool
    await pool.close()


async def _seed(db: asyncpg.Pool) -> None:
    """The business rows an approver looks at (plain SQL: the seed command is not ours)."""
    await db.execute(
        "INSERT INTO customers (id, email, name, metadata) VALUES ('C-001', 'jane@example.com', "
        "'Jane Doe', '{\"tier\": \"enterprise\"}') ON CONFLICT DO NOTHING"
    )
    await db.execute(
        "INSERT INTO orders (id, customer_id, amount_cents, status) "
        "VALUES ('4429', 'C-001', 2999, 'delivered') ON CONFLICT DO NOTHING"
    )


async def _claim(
    pool: asyncpg.Pool, session: str = "s1", body: str = "please refund order #4429"
) -> Lease:
    """Enqueue (if needed) and claim the session's head, as a worker does."""
    await pool.execute(
        "INSERT INTO conversations (session_id, user_id) VALUES ($1, 'C-001') "
        "ON CONFLICT DO NOTHING",
        session,
    )
    if not await pool.fetchval(
        "SELECT 1 FROM fleet.messages WHERE session_id = $1 AND body = $2", session, body
    ):
        await queue.enqueue(pool, session, body)
    claimed = await queue.claim(pool, f"worker-{session}", 10, 30)
    mine = [m for m in claimed if m.session_id == session]
    assert len(mine) == 1, claimed
    return Lease(mine[0], pool)


async def _take_over(pool: asyncpg.Pool, lease: Lease) -> Lease:
    """The lease expires (its worker died); another worker claims the message."""
    await expire_lease(pool, lease.message.id)
    assert lease.message.id in await queue.rescue_expired(pool)
    return await _claim(pool, lease.message.session_id, lease.message.body)


async def _park(
    pool: asyncpg.Pool,
    session: str = "s1",
    *,
    ttl: float = 3600,
    interruptions: list[dict[str, Any]] | None = None,
) -> tuple[Lease, str]:
    lease = await _claim(pool, session)
    approval_id = await park_run(
        lease,
        session_id=session,
        interruptions=interruptions or [REFUND],
        state_json=STATE,
        ttl_seconds=ttl,
    )
    return lease, approval_id


async def _audit(pool: asyncpg.Pool, session: str = "s1") -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT actor, action, target, payload, result FROM audit_log "
        "WHERE conversation_id = $1 ORDER BY id",
        session,
    )


async def _row(pool: asyncpg.Pool, approval_id: str) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM run_states WHERE id = $1::uuid", approval_id)


# -- parking -------------------------------------------------------------------------------------


async def test_park_run_stores_the_run_parks_the_message_and_audits(pool: asyncpg.Pool):
    lease, approval_id = await _park(pool, ttl=600)
    row = await _row(pool, approval_id)
    assert row["status"] == "awaiting"
    assert (row["conversation_id"], row["message_id"], row["tool"], row["call_id"]) == (
        "s1",
        lease.message.id,
        "issue_refund",
        "call_1",
    )
    assert row["arguments"] == {
        "order_id": "4429",
        "amount_cents": 2999,
        "reason": "arrived damaged",
    }
    assert row["interruptions"] == [
        {"tool": "issue_refund", "arguments": row["arguments"], "call_id": "call_1"}
    ]
    assert row["state"] == STATE
    ttl = (row["expires_at"] - row["requested_at"]).total_seconds()
    assert 599 <= ttl <= 601

    message = await queue.get_message(pool, lease.message.id)
    assert message.state == "awaiting_approval" and message.lease_owner is None
    assert (
        await pool.fetchval(queries("queries.sql")["approval_for_message"], lease.message.id)
        == approval_id
    )
    audit = await _audit(pool)
    assert [a["action"] for a in audit] == ["approval_requested"]
    assert audit[0]["target"] == f"approval:{approval_id}"
    assert audit[0]["payload"]["calls"][0]["arguments"]["order_id"] == "4429"
    assert await pool.fetchval("SELECT count(*) FROM refunds") == 0


async def test_a_parked_message_holds_back_its_session_but_not_others(pool: asyncpg.Pool):
    await _park(pool)
    later = await queue.enqueue(pool, "s1", "and where is my other order?")
    other = await queue.enqueue(pool, "s2", "hello")
    claimed = await queue.claim(pool, "w", 10, 30)
    assert [m.id for m in claimed] == [other]
    assert later not in [m.id for m in claimed]


async def test_a_worker_that_lost_its_lease_parks_nothing(pool: asyncpg.Pool):
    stale = await _claim(pool)
    await _take_over(pool, stale)
    with pytest.raises(LeaseLost):
        await park_run(stale, session_id="s1", interruptions=[REFUND], state_json=STATE)
    assert await pool.fetchval("SELECT count(*) FROM run_states") == 0
    assert await pool.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_a_fresh_message_has_no_decided_run(pool: asyncpg.Pool):
    assert await take_decided_run(await _claim(pool)) is None


# -- deciding and resuming ---------------------------------------------------------------------


async def test_approve_wakes_the_fleet_and_one_worker_resumes_the_run(
    pool: asyncpg.Pool, db_url: str
):
    lease, approval_id = await _park(pool)
    listener = await asyncpg.connect(db_url)
    woken = asyncio.Event()
    await listener.add_listener("fleet_wakeup", lambda *_: woken.set())
    try:
        decided = await approvals.approve(pool, approval_id, by="alice", note="verified photo")
        await asyncio.wait_for(woken.wait(), 5)
    finally:
        await listener.close()
    assert decided.status == "approved" and decided.decided_by == "alice"
    assert (await queue.get_message(pool, lease.message.id)).state == "queued"

    lease2 = await _claim(pool)
    run = await take_decided_run(lease2)
    assert run is not None
    assert (run.approval_id, run.decision, run.reason, run.state_json) == (
        approval_id,
        "approved",
        "verified photo",
        STATE,
    )
    assert run.interruptions[0]["call_id"] == "call_1"
    row = await _row(pool, approval_id)
    assert row["status"] == "resumed" and row["decision"] == "approved"
    assert row["resume_token"] == lease2.token and row["resumed_at"] is not None
    assert [a["action"] for a in await _audit(pool)] == [
        "approval_requested",
        "approval_decided",
        "run_resumed",
    ]
    # The old claim is fenced out: it cannot take the run.
    with pytest.raises(LeaseLost):
        await take_decided_run(lease)


async def test_reject_audits_refund_blocked_and_changes_no_business_row(pool: asyncpg.Pool):
    _, approval_id = await _park(pool)
    before = await pool.fetchrow("SELECT status, amount_cents FROM orders WHERE id = '4429'")
    await approvals.reject(pool, approval_id, by="bob", reason="outside the 30-day window")
    run = await take_decided_run(await _claim(pool))
    assert run.decision == "rejected" and run.reason == "outside the 30-day window"
    audit = await _audit(pool)
    assert [a["action"] for a in audit] == [
        "approval_requested",
        "approval_decided",
        "refund_blocked",
        "run_resumed",
    ]
    blocked = audit[2]
    assert blocked["actor"] == "human:bob" and blocked["target"] == "order:4429"
    assert blocked["payload"]["because"] == "outside the 30-day window"
    assert await pool.fetchval("SELECT count(*) FROM refunds") == 0
    assert (
        await pool.fetchrow("SELECT status, amount_cents FROM orders WHERE id = '4429'") == before
    )


async def test_concurrent_deciders_exactly_one_wins(pool: asyncpg.Pool):
    _, approval_id = await _park(pool)

    async def attempt(i: int) -> str:
        try:
            await approvals.decide(
                pool, approval_id, approve=i % 2 == 0, by=f"approver{i}", note=f"reason {i}"
            )
        except InvalidInput as exc:
            assert "already" in str(exc)
            return "refused"
        return "won"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(8)))
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
    decisions = [a for a in await _audit(pool) if a["action"] == "approval_decided"]
    assert len(decisions) == 1
    row = await _row(pool, approval_id)
    assert decisions[0]["actor"] == f"human:{row['decided_by']}"


async def test_two_resumers_of_one_decided_run_cannot_both_take_it(pool: asyncpg.Pool):
    _, approval_id = await _park(pool)
    await approvals.approve(pool, approval_id, by="alice")
    first = await _claim(pool)
    # A second worker cannot even claim the message while the first holds it ...
    assert await queue.claim(pool, "other-worker", 10, 30) == []
    runs = await asyncio.gather(take_decided_run(first), take_decided_run(first))
    assert [r.approval_id for r in runs] == [approval_id, approval_id]
    # ... and the compare-and-set moved the row once: one run_resumed that was not a retake.
    resumed = [a for a in await _audit(pool) if a["action"] == "run_resumed"]
    assert sorted(a["payload"]["retake"] for a in resumed) == [False, True]


async def test_a_resume_cut_short_by_a_dead_worker_is_taken_over(pool: asyncpg.Pool):
    _, approval_id = await _park(pool)
    await approvals.approve(pool, approval_id, by="alice")
    dying = await _claim(pool)
    assert (await take_decided_run(dying)).decision == "approved"
    successor = await _take_over(pool, dying)
    run = await take_decided_run(successor)
    assert run is not None and run.approval_id == approval_id and run.decision == "approved"
    assert (await _row(pool, approval_id))["resume_token"] == successor.token
    with pytest.raises(LeaseLost):
        await take_decided_run(dying)


async def test_a_resumed_run_can_park_again_and_be_decided_again(pool: asyncpg.Pool):
    _, first = await _park(pool)
    await approvals.approve(pool, first, by="alice")
    lease = await _claim(pool)
    await take_decided_run(lease)
    second = await park_run(
        lease, session_id="s1", state_json=STATE, interruptions=[{**REFUND, "call_id": "call_2"}]
    )
    assert second != first
    assert (
        await pool.fetchval(queries("queries.sql")["approval_for_message"], lease.message.id)
        == second
    )
    await approvals.reject(pool, second, by="bob", reason="one refund per order")
    run = await take_decided_run(await _claim(pool))
    assert (run.approval_id, run.decision) == (second, "rejected")


async def test_a_run_with_several_pending_refunds_is_decided_as_one(pool: asyncpg.Pool):
    two = [
        REFUND,
        {
            "tool": "issue_refund",
            "call_id": "call_b",
            "arguments": {"order_id": "#4429", "amount_cents": 500, "reason": "late"},
        },
    ]
    _, approval_id = await _park(pool, interruptions=two)
    await approvals.reject(pool, approval_id, by="bob", reason="no")
    blocked = [a for a in await _audit(pool) if a["action"] == "refund_blocked"]
    assert [b["payload"]["call_id"] for b in blocked] == ["call_1", "call_b"]
    assert {b["target"] for b in blocked} == {"order:4429"}
    run = await take_decided_run(await _claim(pool))
    assert [i["call_id"] for i in run.interruptions] == ["call_1", "call_b"]


# -- errors: nothing changes --------------------------------------------------------------------


async def _snapshot(pool: asyncpg.Pool) -> tuple[Any, ...]:
    return (
        await pool.fetch("SELECT * FROM run_states ORDER BY id"),
        await pool.fetchval("SELECT count(*) FROM audit_log"),
        await pool.fetch("SELECT id, state FROM fleet.messages ORDER BY id"),
    )


async def test_deciding_a_decided_id_again_is_refused_and_changes_nothing(pool: asyncpg.Pool):
    _, approval_id = await _park(pool)
    await approvals.approve(pool, approval_id, by="alice")
    before = await _snapshot(pool)
    with pytest.raises(InvalidInput, match=r"already approved by alice"):
        await approvals.approve(pool, approval_id, by="alice")
    with pytest.raises(InvalidInput, match=r"already approved by alice"):
        await approvals.reject(pool, approval_id, by="mallory", reason="changed my mind")
    assert await _snapshot(pool) == before


@pytest.mark.parametrize("bad_id", ["00000000-0000-0000-0000-000000000000", "nope", ""])
async def test_an_unknown_id_is_not_found(pool: asyncpg.Pool, bad_id: str):
    with pytest.raises(NotFound, match="no approval with id"):
        await approvals.approve(pool, bad_id, by="alice")
    with pytest.raises(NotFound):
        await approvals.show_approval(pool, bad_id)


@pytest.mark.parametrize(
    ("by", "reason", "expected"),
    [
        ("", "x", "--by is required"),
        ("   ", "x", "--by is required"),
        ("fleet:expiry", "x", "a person's name"),
        ("bob", "  ", "a rejection needs --reason"),
    ],
)
async def test_a_decision_needs_a_name_and_a_rejection_a_reason(
    pool: asyncpg.Pool, by: str, reason: str, expected: str
):
    _, approval_id = await _park(pool)
    before = await _snapshot(pool)
    with pytest.raises(InvalidInput, match=expected):
        await approvals.reject(pool, approval_id, by=by, reason=reason)
    assert await _snapshot(pool) == before


# -- expiry and cancellation --------------------------------------------------------------------


async def test_an_undecided_approval_expires_as_a_rejection(pool: asyncpg.Pool):
    lease, approval_id = await _park(pool, ttl=0.3)
    assert await approvals.expire_overdue(pool) == []  # not yet
    await asyncio.sleep(0.4)
    # Past its expiry nobody can approve it, even before the sweep ran.
    before = await _snapshot(pool)
    with pytest.raises(InvalidInput, match="expired"):
        await approvals.approve(pool, approval_id, by="alice")
    assert await _snapshot(pool) == before
    assert (await approvals.get_approval(pool, approval_id)).expired

    expired = await approvals.expire_overdue(pool)
    assert [a.id for a in expired] == [approval_id]
    assert await approvals.expire_overdue(pool) == []
    row = await _row(pool, approval_id)
    assert (row["status"], row["decided_by"]) == ("rejected", "fleet:expiry")
    assert row["decision_note"].startswith("expired")
    actions = [a["action"] for a in await _audit(pool)]
    assert actions == ["approval_requested", "approval_expired", "refund_blocked"]
    assert (await queue.get_message(pool, lease.message.id)).state == "queued"
    with pytest.raises(InvalidInput, match="expired and was rejected"):
        await approvals.approve(pool, approval_id, by="alice")
    run = await take_decided_run(await _claim(pool))
    assert run.decision == "rejected" and run.reason.startswith("expired")


async def test_concurrent_expiry_sweeps_expire_each_approval_once(pool: asyncpg.Pool):
    for session in ("a", "b", "c"):
        await _park(pool, session, ttl=0.1)
    await asyncio.sleep(0.2)
    swept = await asyncio.gather(*(approvals.expire_overdue(pool) for _ in range(4)))
    assert sorted(a.session_id for batch in swept for a in batch) == ["a", "b", "c"]
    assert (
        await pool.fetchval("SELECT count(*) FROM audit_log WHERE action = 'approval_expired'") == 3
    )


async def test_cancelling_a_parked_message_rejects_its_run(pool: asyncpg.Pool):
    lease, approval_id = await _park(pool)
    assert await cancel_message(pool, lease.message.id, "customer withdrew") == "cancelled"
    row = await _row(pool, approval_id)
    assert (row["status"], row["decided_by"], row["decision_note"]) == (
        "rejected",
        "fleet:cancel",
        "customer withdrew",
    )
    assert [a["action"] for a in await _audit(pool)] == [
        "approval_requested",
        "approval_decided",
        "refund_blocked",
        "message_cancelled",  # the cancellation itself, in the same transaction
    ]
    assert (await queue.get_message(pool, lease.message.id)).state == "cancelled"
    with pytest.raises(InvalidInput, match="already rejected by fleet:cancel"):
        await approvals.approve(pool, approval_id, by="alice")


# -- reading ------------------------------------------------------------------------------------


async def test_show_gives_the_approver_the_refund_facts(pool: asyncpg.Pool):
    _, approval_id = await _park(pool)
    detail = await approvals.show_approval(pool, approval_id)
    assert detail.message_body == "please refund order #4429"
    [refund] = detail.refunds
    assert refund.model_dump(exclude={"call_id"}) == {
        "order_id": "4429",
        "amount_cents": 2999,
        "reason": "arrived damaged",
        "order_found": True,
        "order_status": "delivered",
        "order_amount_cents": 2999,
        "already_refunded_cents": 0,
        "customer_id": "C-001",
        "customer_name": "Jane Doe",
        "customer_email": "jane@example.com",
        "customer_tier": "enterprise",
    }
    assert "state" not in detail.model_dump()


async def test_list_filters_by_status_newest_first(pool: asyncpg.Pool):
    _, first = await _park(pool, "a")
    _, second = await _park(pool, "b")
    await approvals.approve(pool, first, by="alice")
    assert [a.id for a in await approvals.list_approvals(pool)] == [second]
    assert [a.id for a in await approvals.list_approvals(pool, status=None)] == [second, first]
    assert [a.id for a in await approvals.list_approvals(pool, status="approved")] == [first]
    with pytest.raises(InvalidInput, match="unknown approval status"):
        await approvals.list_approvals(pool, status="pending")


async def test_the_audit_vocabulary_is_widened_not_opened(pool: asyncpg.Pool):
    await pool.execute(
        "INSERT INTO conversations (session_id, user_id) VALUES ('v', 'u') ON CONFLICT DO NOTHING"
    )
    for verb in (
        "message_received",
        "refund_issued",
        "approval_requested",
        "approval_decided",
        "approval_expired",
        "run_resumed",
    ):
        await pool.execute(
            "INSERT INTO audit_log (conversation_id, actor, action, target, payload)"
            " VALUES ('v', 't', $1, 't', '{}')",
            verb,
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "INSERT INTO audit_log (conversation_id, actor, action, target, payload)"
            " VALUES ('v', 't', 'approval_pondered', 't', '{}')"
        )


# -- the approver CLI (real processes) ---------------------------------------------------------


async def test_cli_lists_shows_and_decides_with_clear_errors(
    pool: asyncpg.Pool, fleet_env: dict[str, str]
):
    _, approval_id = await _park(pool)

    def cli(*args: str) -> Any:
        return asyncio.to_thread(fleet, *args, env=fleet_env, timeout=60)

    listed, table, shown, no_by, unknown = await asyncio.gather(
        cli("approvals", "list", "--json"),
        cli("approvals", "list"),
        cli("approvals", "show", approval_id),
        cli("approve", approval_id),
        cli("approve", "0" * 32, "--by", "alice"),
    )
    assert listed.returncode == 0, listed.stderr
    # the contract's columns: id, session, tool, ...
    assert table.stdout.splitlines()[0].split()[:3] == ["id", "session", "tool"], table.stdout
    [row] = json.loads(listed.stdout)
    assert (row["id"], row["tool"], row["status"]) == (approval_id, "issue_refund", "awaiting")
    assert "state" not in row
    assert shown.returncode == 0, shown.stderr
    for fact in ("$29.99", "#4429", "arrived damaged", "Jane Doe", "enterprise", "delivered"):
        assert fact in shown.stdout
    assert no_by.returncode != 0 and "--by" in no_by.stderr
    assert unknown.returncode != 0 and "no approval with id" in unknown.stderr
    assert "Traceback" not in no_by.stderr + unknown.stderr

    approved = await cli("approve", approval_id, "--by", "alice", "--note", "ok", "--json")
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["status"] == "approved"
    again = await cli("reject", approval_id, "--by", "bob", "--reason", "no")
    assert again.returncode != 0
    assert f"approval {approval_id} was already approved by alice" in again.stderr
    assert (await _row(pool, approval_id))["status"] == "approved"


async def test_a_running_worker_expires_overdue_approvals(pool: asyncpg.Pool, settings: Settings):
    from fleet.handlers import NoopHandler
    from fleet.worker import Worker
    from tests.processes import wait_until

    lease, approval_id = await _park(pool, ttl=0.3)
    worker = Worker(settings, NoopHandler(), concurrency=2)
    task = asyncio.create_task(worker.run())
    try:

        async def finished() -> bool:
            message = await queue.get_message(pool, lease.message.id)
            return message.state == "done"

        await wait_until(finished, timeout=20, message="the expired message to be answered")
    finally:
        worker.stop()
        await task
    row = await _row(pool, approval_id)
    assert (row["status"], row["decided_by"]) == ("rejected", "fleet:expiry")
