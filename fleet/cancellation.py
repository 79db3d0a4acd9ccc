"""Cancelling a message, whatever state it is in; every cancellation leaves an audit row.

* queued: cancelled at once (the session's next message moves up), audited
  ``message_cancelled`` in the same transaction;
* awaiting approval: cancelled at once, and its parked run is rejected (no refund can follow;
  ``approval_decided`` and ``refund_blocked`` by ``fleet:cancel``), audited the same way;
* running: the request is recorded on the row and audited ``cancel_requested`` in one
  transaction, whose commit NOTIFYs ``fleet_cancel``: the worker holding the message sees it at
  once (or at its next heartbeat without LISTEN, e.g. behind PgBouncer), the agent turn stops
  before its next model or tool call, audits ``message_cancelled`` (with the calls in flight)
  and the message ends ``cancelled``.
"""

from __future__ import annotations

from typing import Any, Literal

import asyncpg

from fleet import queue
from fleet.errors import InvalidInput, NotFound
from fleet.sql import queries

SQL = queries("cancellation.sql")

CancelOutcome = Literal["cancelled", "cancel_requested"]


def _actor(by: str | None) -> str:
    return f"user:{by}" if by else "fleet:cancel"


async def _audit(
    conn: asyncpg.Connection,
    message: queue.Message,
    action: str,
    by: str | None,
    payload: dict[str, Any],
    result: dict[str, Any],
) -> None:
    await conn.execute(SQL["conversation_ensure"], message.session_id, message.customer_id)
    await conn.execute(
        SQL["audit"],
        message.session_id,
        _actor(by),
        action,
        f"message:{message.id}",
        payload,
        result,
    )


class _Moved(Exception):
    """The message changed state between the read and the write: read again."""


async def cancel_message(
    pool: asyncpg.Pool, message_id: int, reason: str | None = None, *, by: str | None = None
) -> CancelOutcome:
    """Cancel ``message_id``; returns what happened: ``cancelled`` or ``cancel_requested``
    (running: the worker stops it at its next step). A message claimed or parked while this
    runs is read again (a few times), so a race with a worker is not the caller's problem."""
    for _ in range(5):
        message = await queue.get_message(pool, message_id)
        if message is None:
            raise NotFound(f"no message with id {message_id}")
        if message.state in queue.FINISHED_STATES:
            raise InvalidInput(f"message {message_id} is already {message.state}")
        try:
            return await _cancel(pool, message, reason, by)
        except _Moved:
            continue
    raise InvalidInput(f"message {message_id} keeps changing state; try again")


async def _cancel(
    pool: asyncpg.Pool, message: queue.Message, reason: str | None, by: str | None
) -> CancelOutcome:
    payload: dict[str, Any] = {
        "message_id": message.id, "was": message.state, "reason": reason, "by": by
    }
    async with pool.acquire() as conn, conn.transaction():
        if message.state == "running":
            if not await queue.request_cancel(conn, message.id, reason):
                raise _Moved
            await _audit(conn, message, "cancel_requested", by, payload, {"status": "requested"})
            await conn.execute(SQL["notify_cancel"], message.id)
            return "cancel_requested"
        if message.state == "awaiting_approval":
            from fleet.approvals import reject_for_cancel

            rejected = await reject_for_cancel(conn, message.id, reason or "cancelled")
            payload["approvals_rejected"] = [a.id for a in rejected]
        if not await queue.cancel(conn, message.id, reason or "cancelled"):
            raise _Moved
        await _audit(conn, message, "message_cancelled", by, payload, {"status": "cancelled"})
    return "cancelled"
