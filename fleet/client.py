"""``fleet.Client``: enqueue messages and wait for their replies from Python.

    async with fleet.Client() as client:
        reply = await client.run_sync("session-1", "Where is my order #4429?")

``enqueue(..., conn=my_conn)`` runs inside the caller's own transaction (AgentPG's ``RunTx``):
rolled back, nothing is processed; committed, a worker is woken at commit. A wait marks the
message as awaited (``fleet.queue.await_reply``), so that finishing or parking it sends a
``fleet_outcome`` notification naming it, and re-reads the message when one does, with a polling
fallback: a lost notification costs at most one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg
from pydantic import BaseModel

from fleet import metrics, queue
from fleet.database import TRANSIENT, close_pool, connect, create_pool, resolve_url
from fleet.errors import InvalidInput, NotFound
from fleet.outcomes import OutcomeWaits
from fleet.queue import Message, NewMessage
from fleet.settings import Settings, get_settings
from fleet.sql import queries

SQL = queries("queries.sql")
log = logging.getLogger("fleet.client")


class Reply(BaseModel):
    """Where a message stands for whoever waits on it."""

    message_id: int
    state: str
    reply: str | None = None
    error: str | None = None
    approval_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in queue.FINISHED_STATES


class Client:
    """An async client of the fleet's queue (asyncpg underneath)."""

    def __init__(
        self,
        database_url: str | None = None,
        *,
        settings: Settings | None = None,
        poll_interval: float = 0.5,
        statement_timeout: float | None = 60.0,
    ) -> None:
        """``statement_timeout``: the seconds any one statement of the client's may take
        before it is cancelled and raises :class:`TimeoutError` (None: no limit). Without a
        limit, a connection the network dropped without a word (a failover, a NAT's expired
        entry) holds a call until TCP gives up, about 15 minutes on Linux, whatever timeout
        the call itself was given. Raise it for :meth:`enqueue_many` batches of hundreds of
        thousands of messages."""
        if statement_timeout is not None and statement_timeout <= 0:
            raise InvalidInput("statement_timeout must be positive (or None: no limit)")
        self.settings = settings or get_settings()
        self._database_url = database_url
        self.poll_interval = poll_interval
        self.statement_timeout = statement_timeout
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._waits = OutcomeWaits()
        #: False once the database refused a mark (queue.await_reply) to this client's role
        self._can_mark = True

    async def __aenter__(self) -> Client:
        url = self._database_url or await resolve_url(self.settings)
        self._pool = await create_pool(self.settings, "fleet-client", url=url, max_size=4,
                                       command_timeout=self.statement_timeout)
        try:
            self._listener = await connect(self.settings, "fleet-client-listen", url=url)
            await self._listener.add_listener(queue.OUTCOME_CHANNEL, self._on_outcome)
        except (OSError, asyncpg.PostgresError):
            self._listener = None  # e.g. behind PgBouncer: polling alone still works
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._listener is not None:
            # A connection the network dropped never answers the goodbye: close() gives up
            # after the timeout and aborts it (asyncpg), which is all there is left to do.
            with contextlib.suppress(*TRANSIENT):
                await self._listener.close(timeout=self.statement_timeout or 5.0)
        if self._pool is not None:
            await close_pool(self._pool)

    def _on_outcome(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._waits.notified(payload)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("use the client as `async with fleet.Client() as client:`")
        return self._pool

    async def enqueue(
        self,
        session_id: str,
        body: str,
        *,
        agent: str | None = None,
        customer_id: str | None = None,
        variables: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        dedupe_key: str | None = None,
        conn: asyncpg.Connection | None = None,
        max_attempts: int | None = None,
    ) -> int:
        """Enqueue a message; with ``conn``, inside that connection's current transaction.
        ``max_attempts``: handler failures before it is ``dead`` (``FLEET_MAX_ATTEMPTS``)."""
        message_id = await queue.enqueue(
            conn if conn is not None else self.pool,
            session_id,
            body,
            customer_id=customer_id,
            dedupe_key=dedupe_key,
            metadata=metadata,
            agent=agent,
            variables=variables,
            max_attempts=(self.settings.fleet_max_attempts if max_attempts is None
                          else max_attempts),
        )
        metrics.MESSAGES_ENQUEUED.inc()
        return message_id

    async def enqueue_many(
        self,
        messages: Iterable[NewMessage | Mapping[str, Any]],
        *,
        conn: asyncpg.Connection | None = None,
    ) -> list[int]:
        """Enqueue a batch in one statement, all or nothing; the ids in order. Each message has
        :meth:`enqueue`'s arguments (a :class:`fleet.queue.NewMessage` or a dict); a message
        without ``max_attempts`` gets ``FLEET_MAX_ATTEMPTS``, as with :meth:`enqueue`."""
        ids = await queue.enqueue_many(
            conn if conn is not None else self.pool,
            messages,
            default_max_attempts=self.settings.fleet_max_attempts,
        )
        metrics.MESSAGES_ENQUEUED.inc(len(ids))
        return ids

    async def get_message(self, message_id: int) -> Message:
        message = await queue.get_message(self.pool, message_id)
        if message is None:
            raise NotFound(f"no message with id {message_id}")
        return message

    async def list_messages(
        self, session_id: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[Message]:
        return await queue.list_messages(self.pool, session_id=session_id, state=state, limit=limit)

    async def _reply(self, message_id: int) -> Reply:
        message = await self.get_message(message_id)
        approval_id = None
        if message.state == "awaiting_approval":
            approval_id = await self._approval_for(message_id)
        return Reply(
            message_id=message.id,
            state=message.state,
            reply=message.reply,
            error=message.error,
            approval_id=approval_id,
        )

    async def _approval_for(self, message_id: int) -> str | None:
        try:
            return await self.pool.fetchval(SQL["approval_for_message"], message_id)
        except asyncpg.UndefinedTableError:
            return None

    async def wait_for_reply(self, message_id: int, timeout: float = 60.0) -> Reply:
        """Wait until the message is finished or parked for approval, or ``timeout`` passes
        (then the current state is returned, e.g. ``queued`` or ``running``)."""
        if timeout < 0:
            raise InvalidInput("timeout must not be negative")
        queue.check_message_id(message_id)
        deadline = time.monotonic() + timeout
        with self._waits.waiting_on(message_id) as told:
            if self._listener is not None and self._can_mark:  # before the first read
                await self._mark_awaited(message_id)
            while True:
                told.clear()
                reply = await self._reply(message_id)
                if reply.finished or reply.state == "awaiting_approval":
                    return reply
                left = deadline - time.monotonic()
                if left <= 0:
                    return reply
                try:
                    await asyncio.wait_for(told.wait(), timeout=min(left, self.poll_interval))
                except TimeoutError:
                    pass

    async def _mark_awaited(self, message_id: int) -> None:
        """Have the message's finish notify this client. A role that may not UPDATE
        fleet.messages cannot mark it; this client's waits then poll, and stop trying."""
        try:
            await queue.await_reply(self.pool, message_id)
        except asyncpg.InsufficientPrivilegeError as exc:
            log.warning("waits for replies poll every %.1fs: %s", self.poll_interval, exc)
            self._can_mark = False

    async def run_sync(
        self, session_id: str, body: str, *, timeout: float = 60.0, **enqueue_kwargs: Any
    ) -> Reply:
        """Enqueue and wait for the reply. Bad arguments are refused before anything is
        enqueued. No ``conn``: a message in the caller's open transaction cannot be processed
        before it commits (enqueue with ``conn``, commit, then :meth:`wait_for_reply`)."""
        if timeout < 0:
            raise InvalidInput("timeout must not be negative")
        if "conn" in enqueue_kwargs:
            raise InvalidInput(
                "run_sync takes no conn: a message in your open transaction cannot be processed "
                "before it commits; enqueue(..., conn=conn), commit, then wait_for_reply(id)"
            )
        message_id = await self.enqueue(session_id, body, **enqueue_kwargs)
        return await self.wait_for_reply(message_id, timeout=timeout)

    async def cancel(
        self,
        message_id: int,
        *,
        reason: str | None = None,
        by: str | None = None,
        wait: float = 0.0,
    ) -> Reply:
        """Cancel a message: at once when queued; a parked approval is rejected; a running one
        stops at its next step. Returns where it stands: ``cancelled``, or ``running`` while a
        running turn has yet to stop (with ``wait`` > 0, up to that many seconds are spent
        waiting for it to end). Every cancellation is audited in the session's trail; ``reason``
        is kept there and in the message's error."""
        from fleet.cancellation import cancel_message

        outcome = await cancel_message(self.pool, message_id, reason, by=by)
        if outcome == "cancel_requested" and wait > 0:
            return await self.wait_for_reply(message_id, timeout=wait)
        return await self._reply(message_id)
