"""Cancelling a message, whatever state it is in.

* queued: cancelled at once (the session's next message moves up);
* awaiting approval: cancelled at once, and its parked run is rejected (no refund can follow);
* running: the worker is asked to stop; it notices at its next heartbeat or step.
"""

from __future__ import annotations

import asyncpg

from fleet import queue
from fleet.errors import InvalidInput, NotFound


async def cancel_message(pool: asyncpg.Pool, message_id: int, reason: str = "cancelled") -> str:
    """Cancel ``message_id``; returns what happened: ``cancelled`` or ``cancel_requested``."""
    message = await queue.get_message(pool, message_id)
    if message is None:
        raise NotFound(f"no message with id {message_id}")
    if message.state in queue.FINISHED_STATES:
        raise InvalidInput(f"message {message_id} is already {message.state}")
    if message.state == "running":
        await queue.request_cancel(pool, message_id)
        return "cancel_requested"
    async with pool.acquire() as conn, conn.transaction():
        if message.state == "awaiting_approval":
            try:
                from fleet.approvals import reject_for_cancel
            except ImportError:  # approvals not installed in this build
                pass
            else:
                await reject_for_cancel(conn, message_id, reason)
        if not await queue.cancel(conn, message_id, reason):
            raise InvalidInput(f"message {message_id} changed state; try again")
    return "cancelled"
