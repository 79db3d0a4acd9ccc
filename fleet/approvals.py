"""Human approval for the tool that moves money: parked runs in ``run_states``.

A turn that comes back with tool-approval interruptions never blocks its worker. The agent turn
serialises the SDK ``RunState`` and calls :func:`park_run`, which stores it as a ``run_states``
row (status ``awaiting``), moves the message to ``awaiting_approval`` and audits
``approval_requested``, all in one transaction fenced by the worker's lease. The message stays
its session's head, so the session's later messages wait behind it, in order.

A human decides later, from any process (``fleet approve`` / ``fleet reject``, or
:func:`decide`): a compare-and-set ``awaiting -> approved|rejected`` with its audit rows, which
also makes the message claimable again and wakes the fleet (NOTIFY at commit; the workers' poll
is the fallback). Whichever worker claims it calls :func:`take_decided_run`, which moves the row
``approved|rejected -> resumed`` by compare-and-set and hands back the saved state and the
decision; the turn restores the run and resumes it. Undecided approvals past ``expires_at`` are
rejected by :func:`expire_overdue` (every worker's maintenance loop runs it).

Why a status guard and not a lock: the decision and the resume happen in different processes
minutes or hours apart. Every transition names the status it expects in its ``WHERE`` clause,
so of two deciders (or two resumers) exactly one changes the row and the other is told so. The
refund itself is idempotent on the tool call id as a last line of defence.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, Field

from fleet import queue
from fleet.errors import InvalidInput, LeaseLost, NotFound
from fleet.handlers import Lease
from fleet.sql import queries

SQL = queries("approvals.sql")

ApprovalStatus = Literal["awaiting", "approved", "rejected", "resumed"]
APPROVAL_STATUSES: tuple[str, ...] = ApprovalStatus.__args__  # type: ignore[attr-defined]
Decision = Literal["approved", "rejected"]

#: The tool whose approvals carry refund facts and whose rejection is audited ``refund_blocked``.
REFUND_TOOL = "issue_refund"
EXPIRY_ACTOR = "fleet:expiry"
CANCEL_ACTOR = "fleet:cancel"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
_MAX_NAME = 200
_MAX_NOTE = 2000

Executor = asyncpg.Connection | asyncpg.Pool


class Interruption(BaseModel):
    """One pending tool call of a paused run."""

    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    call_id: str


class Approval(BaseModel):
    """A ``run_states`` row as approvers see it (never the serialized run itself)."""

    id: str
    session_id: str
    message_id: int | None
    tool: str
    arguments: dict[str, Any]
    call_id: str
    interruptions: list[Interruption]
    status: ApprovalStatus
    requested_at: datetime
    expires_at: datetime
    decided_by: str | None = None
    decided_at: datetime | None = None
    decision: Literal["approved", "rejected"] | None = None
    """What was decided; kept when ``status`` moves on to ``resumed``."""
    decision_note: str | None = None
    resumed_at: datetime | None = None
    expired: bool = False
    """Awaiting but past ``expires_at`` (the sweep rejects it), or rejected by the sweep."""


class RefundFacts(BaseModel):
    """What an approver needs to judge one refund call: the request and the order behind it."""

    call_id: str
    order_id: str | None
    amount_cents: int | None
    reason: str | None
    order_found: bool = False
    order_status: str | None = None
    order_amount_cents: int | None = None
    already_refunded_cents: int | None = None
    customer_id: str | None = None
    customer_name: str | None = None
    customer_email: str | None = None
    customer_tier: str | None = None


class ApprovalDetail(Approval):
    """``fleet approvals show``: the row, the customer's message, and the refunds' facts."""

    message_body: str | None = None
    refunds: list[RefundFacts] = Field(default_factory=list)


@dataclass(frozen=True)
class DecidedRun:
    """A decided run handed to the worker that claimed its message, to restore and resume."""

    approval_id: str
    state_json: str
    decision: Decision
    reason: str | None
    """The approver's note (approve) or reason (reject): the model is told it on rejection."""
    interruptions: list[dict[str, Any]] = field(default_factory=list)
    """Every pending tool call of the run: ``[{tool, arguments, call_id}]``."""
    agent_graph: dict[str, int] | None = None
    """``{agent: version}`` the run was built from (resumed against exactly those)."""


# -- helpers -------------------------------------------------------------------------------------


@asynccontextmanager
async def _transaction(db: Executor) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on ``db`` (a savepoint if ``db`` is a connection already in one)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db


def _arguments(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {"raw": value}
    return value if isinstance(value, dict) else {"value": value}


def normalize_interruptions(interruptions: Sequence[dict[str, Any]]) -> list[Interruption]:
    """``[{tool|name, arguments (JSON text or object), call_id}]`` as :class:`Interruption`."""
    result = []
    for item in interruptions:
        tool = item.get("tool") or item.get("name") or item.get("tool_name")
        call_id = item.get("call_id") or item.get("id")
        if not tool or not call_id:
            raise ValueError(f"an interruption needs a tool and a call_id, got {item!r}")
        result.append(
            Interruption(
                tool=str(tool), arguments=_arguments(item.get("arguments")), call_id=str(call_id)
            )
        )
    return result


def _approval(row: asyncpg.Record) -> Approval:
    data = dict(row)
    data["session_id"] = data.pop("conversation_id")
    data["interruptions"] = data.get("interruptions") or []
    data["expired"] = data.get("decided_by") == EXPIRY_ACTOR or (
        data["status"] == "awaiting" and data["expires_at"] <= _now(data["expires_at"])
    )
    return Approval(**data)


def _now(like: datetime) -> datetime:
    return datetime.now(like.tzinfo)


def _order_id(arguments: dict[str, Any]) -> str | None:
    value = arguments.get("order_id")
    return None if value is None else str(value).strip().lstrip("#") or None


def _cents(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_id(approval_id: str) -> str:
    approval_id = (approval_id or "").strip()
    if not _UUID.match(approval_id):
        raise NotFound(f"no approval with id {approval_id!r}")
    return approval_id


@dataclass
class _Audit:
    """Audit rows gathered in a transaction and written in one statement."""

    rows: list[tuple[str, str, str, str, str, str | None]] = field(default_factory=list)

    def add(
        self,
        session_id: str,
        actor: str,
        action: str,
        target: str,
        payload: dict[str, Any],
        result: dict[str, Any] | None = None,
    ) -> None:
        self.rows.append(
            (
                session_id,
                actor,
                action,
                target,
                json.dumps(payload, default=str),
                None if result is None else json.dumps(result, default=str),
            )
        )

    def decision(self, approval: Approval, actor: str, action: str) -> None:
        """``approval_decided`` / ``approval_expired``, plus ``refund_blocked`` per refund
        call when the decision is a rejection."""
        decision = "approved" if approval.status == "approved" else "rejected"
        self.add(
            approval.session_id,
            actor,
            action,
            f"approval:{approval.id}",
            {
                "approval_id": approval.id,
                "message_id": approval.message_id,
                "decision": decision,
                "decided_by": approval.decided_by,
                "note": approval.decision_note,
                "tool": approval.tool,
                "calls": [i.model_dump() for i in approval.interruptions],
            },
            {"status": decision},
        )
        if decision == "rejected":
            for item in approval.interruptions:
                if item.tool != REFUND_TOOL:
                    continue
                self.add(
                    approval.session_id,
                    actor,
                    "refund_blocked",
                    f"order:{_order_id(item.arguments)}",
                    {
                        "approval_id": approval.id,
                        "call_id": item.call_id,
                        "arguments": item.arguments,
                        "because": approval.decision_note,
                    },
                    {"status": "blocked"},
                )

    async def write(self, conn: asyncpg.Connection) -> None:
        if self.rows:
            await conn.execute(
                SQL["audit"], *(list(column) for column in zip(*self.rows, strict=True))
            )


# -- the worker's side ---------------------------------------------------------------------------


async def park_run(
    lease: Lease,
    *,
    session_id: str,
    interruptions: list[dict[str, Any]],
    state_json: str,
    ttl_seconds: float | None = None,
    agent_graph: dict[str, int] | None = None,
) -> str:
    """Park a paused run for a human; returns the approval id.

    In one transaction under the worker's lease: the ``run_states`` row (``awaiting``, expiring
    after ``FLEET_APPROVAL_TTL_SECONDS``), the message moved to ``awaiting_approval`` (still its
    session's head, holding no lease), and the ``approval_requested`` audit row. A worker that
    lost its lease parks nothing (:class:`~fleet.errors.LeaseLost`).
    """
    items = normalize_interruptions(interruptions)
    if not items:
        raise ValueError("park_run needs at least one interruption")
    if ttl_seconds is None:
        from fleet.settings import get_settings

        ttl_seconds = get_settings().fleet_approval_ttl_seconds
    first = items[0]
    message = lease.message
    async with lease.transaction() as conn:
        row = await conn.fetchrow(
            SQL["park_insert"],
            session_id,
            message.id,
            first.tool,
            first.arguments,
            first.call_id,
            [i.model_dump() for i in items],
            state_json,
            float(ttl_seconds),
            agent_graph or None,
        )
        approval_id = row["id"]
        if not await queue.park(conn, message.id, lease.token):
            raise LeaseLost(f"message {message.id}: lease was taken over before parking")
        audit = _Audit()
        audit.add(
            session_id,
            f"agent:{message.agent}",
            "approval_requested",
            f"approval:{approval_id}",
            {
                "approval_id": approval_id,
                "message_id": message.id,
                "tool": first.tool,
                "calls": [i.model_dump() for i in items],
                "expires_at": row["expires_at"].isoformat(),
            },
            {"status": "awaiting"},
        )
        await audit.write(conn)
    return approval_id


async def take_decided_run(lease: Lease) -> DecidedRun | None:
    """The decided run of the claimed message, moved to ``resumed``; None for a fresh message.

    Also returns a ``resumed`` run: its message was claimed again, so the resume that started
    never finished (the worker died or the attempt failed). The queue's lease guarantees a
    single holder of the message, and the refund dedupes on the tool call id.
    """
    message = lease.message
    # Fast path for the common case, a message that never parked: one indexed read, no
    # transaction.
    if not await lease.pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM run_states WHERE message_id = $1)", message.id
    ):
        return None
    async with lease.transaction() as conn:
        row = await conn.fetchrow(SQL["latest_for_message"], message.id)
        if row is None or row["status"] == "awaiting":
            return None
        retake = row["status"] == "resumed"
        statement = "retag_resumed" if retake else "mark_resumed"
        if await conn.fetchval(SQL[statement], row["id"], lease.token) is None:
            return None  # pragma: no cover - the row is locked; its status cannot have moved
        audit = _Audit()
        audit.add(
            message.session_id,
            f"agent:{message.agent}",
            "run_resumed",
            f"approval:{row['id']}",
            {
                "approval_id": row["id"],
                "message_id": message.id,
                "decision": row["decision"],
                "decided_by": row["decided_by"],
                "retake": retake,
            },
            {"status": "resumed"},
        )
        await audit.write(conn)
    return DecidedRun(
        approval_id=row["id"],
        state_json=row["state"],
        decision=row["decision"],
        reason=row["decision_note"],
        interruptions=list(row["interruptions"] or []),
        agent_graph=row["agent_graph"] or None,
    )


# -- the approver's side -------------------------------------------------------------------------


async def decide(
    db: Executor,
    approval_id: str,
    *,
    approve: bool,
    by: str,
    note: str | None = None,
) -> Approval:
    """Approve or reject an awaiting approval, once.

    Compare-and-set ``awaiting -> approved|rejected`` with its audit rows (a rejected refund is
    also audited ``refund_blocked``) and the message made claimable again, in one transaction;
    the fleet is woken at commit. Unknown ids raise :class:`~fleet.errors.NotFound`; an id that
    is already decided or has expired raises :class:`~fleet.errors.InvalidInput`, and nothing
    changes. ``note`` is the approver's note, or on rejection the reason the model is told.
    """
    approval_id = _check_id(approval_id)
    by = (by or "").strip()
    if not by:
        raise InvalidInput("--by is required: name who decides (for the audit trail)")
    if len(by) > _MAX_NAME or by.startswith("fleet:"):
        raise InvalidInput(f"--by must be a person's name of at most {_MAX_NAME} characters")
    note = (note or "").strip() or None
    if not approve and not note:
        raise InvalidInput("a rejection needs --reason: the customer is told why")
    if note and len(note) > _MAX_NOTE:
        raise InvalidInput(f"the note or reason is limited to {_MAX_NOTE} characters")
    decision: Decision = "approved" if approve else "rejected"
    async with _transaction(db) as conn:
        row = await conn.fetchrow(SQL["decide"], approval_id, decision, by, note)
        if row is None:
            current = await conn.fetchrow(SQL["get"], approval_id)
            raise _why_not_decidable(approval_id, current)
        approval = _approval(row)
        audit = _Audit()
        audit.decision(approval, f"human:{by}", "approval_decided")
        await audit.write(conn)
        if approval.message_id is not None:
            await queue.unpark(conn, approval.message_id)
    return approval


def _why_not_decidable(approval_id: str, row: asyncpg.Record | None) -> Exception:
    if row is None:
        return NotFound(f"no approval with id {approval_id}")
    approval = _approval(row)
    if approval.status == "awaiting":  # not decided, so it is past expires_at
        return InvalidInput(
            f"approval {approval_id} expired at {approval.expires_at:%Y-%m-%d %H:%M:%S %Z}; it "
            "can no longer be decided (nothing changed)"
        )
    if approval.decided_by == EXPIRY_ACTOR:
        return InvalidInput(
            f"approval {approval_id} expired and was rejected at "
            f"{approval.decided_at:%Y-%m-%d %H:%M:%S %Z}; nothing changed"
        )
    how = approval.status if approval.status != "resumed" else "decided and resumed"
    return InvalidInput(
        f"approval {approval_id} was already {how} by {approval.decided_by} at "
        f"{approval.decided_at:%Y-%m-%d %H:%M:%S %Z}; nothing changed"
    )


async def approve(db: Executor, approval_id: str, *, by: str, note: str | None = None) -> Approval:
    return await decide(db, approval_id, approve=True, by=by, note=note)


async def reject(db: Executor, approval_id: str, *, by: str, reason: str) -> Approval:
    return await decide(db, approval_id, approve=False, by=by, note=reason)


async def expire_overdue(db: Executor, limit: int = 100) -> list[Approval]:
    """Reject undecided approvals past ``expires_at`` (audited ``approval_expired`` and
    ``refund_blocked``) and make their messages claimable, so the customer is told.

    Cheap enough for every worker's maintenance tick: with nothing overdue it is one read of
    ``run_states_status_expires`` and no transaction. Concurrent sweeps skip each other's rows.
    """
    if not await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM run_states "
        "WHERE status = 'awaiting' AND expires_at <= clock_timestamp())"
    ):
        return []
    async with _transaction(db) as conn:
        rows = await conn.fetch(SQL["expire_overdue"], limit)
        expired = [_approval(row) for row in rows]
        audit = _Audit()
        for approval in expired:
            audit.decision(approval, EXPIRY_ACTOR, "approval_expired")
        await audit.write(conn)
        for approval in expired:
            if approval.message_id is not None:
                await queue.unpark(conn, approval.message_id)
    return expired


async def reject_for_cancel(
    conn: asyncpg.Connection, message_id: int, reason: str
) -> list[Approval]:
    """Reject the awaiting run of a message being cancelled (call inside the cancelling
    transaction): it can never resume, and the rejection is audited like any other."""
    rows = await conn.fetch(SQL["reject_for_cancel"], message_id, reason or "cancelled")
    rejected = [_approval(row) for row in rows]
    audit = _Audit()
    for approval in rejected:
        audit.decision(approval, CANCEL_ACTOR, "approval_decided")
    await audit.write(conn)
    return rejected


# -- reading -------------------------------------------------------------------------------------


def validate_status(status: str | None) -> str | None:
    if status is not None and status not in APPROVAL_STATUSES:
        raise InvalidInput(
            f"unknown approval status {status!r}; expected one of: "
            f"{', '.join(APPROVAL_STATUSES)}, all"
        )
    return status


async def list_approvals(
    db: Executor, *, status: str | None = "awaiting", limit: int = 50
) -> list[Approval]:
    """Parked runs, newest first; ``status=None`` lists every status."""
    validate_status(status)
    if limit < 1:
        raise InvalidInput(f"limit must be a positive number, got {limit}")
    return [_approval(row) for row in await db.fetch(SQL["list"], status, limit)]


async def get_approval(db: Executor, approval_id: str) -> Approval:
    approval_id = _check_id(approval_id)
    row = await db.fetchrow(SQL["get"], approval_id)
    if row is None:
        raise NotFound(f"no approval with id {approval_id}")
    return _approval(row)


async def show_approval(db: Executor, approval_id: str) -> ApprovalDetail:
    """One approval with what the approver needs: the customer's message and, for each refund
    call, the order, amount, reason, customer and tier (read from the tool arguments and the
    ``orders``/``customers`` tables)."""
    approval = await get_approval(db, approval_id)
    detail = ApprovalDetail(**approval.model_dump())
    if approval.message_id is not None:
        message = await queue.get_message(db, approval.message_id)
        detail.message_body = message.body if message else None
    for item in approval.interruptions:
        if item.tool != REFUND_TOOL:
            continue
        order_id = _order_id(item.arguments)
        facts = RefundFacts(
            call_id=item.call_id,
            order_id=order_id,
            amount_cents=_cents(item.arguments.get("amount_cents")),
            reason=item.arguments.get("reason"),
        )
        if order_id is not None:
            row = await db.fetchrow(SQL["order_facts"], order_id)
            if row is not None:
                facts = facts.model_copy(update={**dict(row), "order_found": True})
        detail.refunds.append(facts)
    return detail


def money(cents: int | None) -> str:
    """``2999`` -> ``$29.99`` (for the approver's screen)."""
    if cents is None:
        return "-"
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents) // 100:,}.{abs(cents) % 100:02d}"
