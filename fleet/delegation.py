"""Delegation: a parent agent asks a sub-agent (``ask_<name>``); the child turn is a message in
the same queue.

Why a queued message rather than a nested ``Runner.run``: the child turn then has everything a
turn has (a lease and fencing, retries, its own memory and audit trail, metrics, approvals) and
shows up in ``fleet messages`` and ``fleet trace`` like any other.

How one delegation runs (:class:`Delegator`):

1. **Depth**: the child's depth is the parent's plus one (a top-level message is depth 0; the
   depth travels in the child message's ``metadata.delegation``). Beyond
   ``FLEET_MAX_DELEGATION_DEPTH`` the delegation is refused at run time: the parent's model gets
   an ``error:`` result saying so and the refusal is audited. Cycles never get this far: they are
   refused when agents are defined (:func:`fleet.agents.validate`).
2. **Enqueue** the child: session ``<parent session>/<child agent>`` (its own session, so the
   parent, which holds its own session's head while it waits, cannot block it; the specialist
   keeps a memory per parent conversation), dedupe key
   ``delegation:<parent message>:<child>:<hash of the request>``: a parent that asks the same
   thing again (a retried attempt, whose model issues new tool call ids, or a resumed run) gets
   the child it already has, finished or not, instead of a second one, so a child's effects
   happen once per question however often the parent's turn is retried.
3. **Run it inline**: the parent's worker claims that very message under its own lease
   (``queue.claim_message``) and runs it while the parent waits, through the worker's normal
   path (in flight, heartbeat, outcome written by the completer, retry or dead on failure;
   cancelling the parent cancels the child first). So a delegation
   never waits for a free worker slot: with every slot of every worker busy with parents, each
   parent still runs its child itself, and the fleet cannot deadlock on delegations. If another
   worker claimed the child first (it was woken by the enqueue), the parent waits for that
   worker's outcome; if that worker dies, the lease expires and the child comes back, and the
   parent claims it then.

   Waiting for the child's outcome (once run inline, until the completer has written it; or
   while another worker runs it) LISTENs on ``fleet_outcome`` (:class:`OutcomeListener`, one
   connection per worker, opened at the first wait), marks the child as awaited
   (``queue.await_reply``: its finish then notifies, naming it) and re-reads the message when
   told, at most every 50 ms and at least every 2 s (what no outcome announces, e.g. a child
   released by a worker shutting down, and a lost notification): polling fast instead cost a
   primary-key read every 50-500 ms per waiting parent for the whole child turn. Without
   LISTEN (a ``fleet worker --poll-only``, i.e. behind PgBouncer in transaction mode, or the
   connection refused) it polls as before, backing off from 50 to 500 ms.
4. **Result**: the child's reply is the tool result. A child that ends ``dead`` or ``cancelled``
   gives an ``error:`` result; one that parks for a human approval gives a result saying so
   (the parent never waits on a person), and so does one queued behind an earlier delegation
   of the conversation that waits for a person; one that does not finish within
   :data:`WAIT_SECONDS` gives an ``error:`` result and stays in its queue.

Every delegation writes a ``delegated`` audit row in the parent's conversation: the child's
agent, session and message id, the depth and the outcome, so ``fleet trace`` of the parent
points at the child's own trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg

from fleet import queue
from fleet.audit import now
from fleet.database import connect, resolve_url
from fleet.outcomes import OutcomeWaits
from fleet.settings import Settings

log = logging.getLogger("fleet.delegation")

#: How long a parent waits for its child turn before giving up on it (the child stays queued).
WAIT_SECONDS = 300.0
#: Polling without LISTEN: from _POLL, times 1.5 per read, up to _POLL_MAX. With LISTEN, reads
#: are at least _POLL apart (every finished batch in the fleet notifies, not only our child's)
#: and _FALLBACK apart at most: what no outcome announces (a child released by a worker shutting
#: down, or back from an expired lease) is seen that late at worst; a retry is read when due.
_POLL = 0.05
_POLL_MAX = 0.5
_FALLBACK = 2.0
#: After the LISTEN connection could not be opened, how long waits poll before trying again.
_LISTEN_RETRY = 10.0
_LISTEN_TIMEOUT = 5.0


def delegation_depth(metadata: dict[str, Any] | None) -> int:
    """How deep a message is in a chain of delegations (0: a customer's message)."""
    info = (metadata or {}).get("delegation")
    if isinstance(info, dict):
        try:
            return max(int(info.get("depth", 0)), 0)
        except (TypeError, ValueError):
            return 0
    return 0


def delegation_key(parent_message_id: int, child: str, request: str) -> str:
    """The child message's dedupe key: one child per parent message, sub-agent and question."""
    digest = hashlib.sha256(request.encode()).hexdigest()[:24]
    return f"delegation:{parent_message_id}:{child}:{digest}"


def child_session(parent_session: str, child: str) -> str:
    """``<parent session>/<child>``; a hash of the parent when that would pass 128 chars."""
    session = f"{parent_session}/{child}"
    if len(session) <= 128:
        return session
    digest = hashlib.sha256(parent_session.encode()).hexdigest()[:24]
    return f"{parent_session[:40]}~{digest}/{child}"[:128]


class OutcomeListener:
    """One LISTEN connection on ``fleet_outcome`` shared by a worker's waiting delegations.

    Opened at the first wait that needs it (a worker whose agents never delegate holds no
    extra connection), reopened at a later wait after it was lost; a wait that cannot have it
    polls. Each waiter subscribes an event for its message: set by a notification that names
    it (or names none), and by the loss of the connection."""

    def __init__(self, settings: Settings, *, listen: bool = True) -> None:
        self.settings = settings
        #: False for a ``--poll-only`` worker: LISTEN would hear nothing through PgBouncer's
        #: transaction pooling, so every wait polls.
        self.listen = listen
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._retry_at = 0.0
        self._waits = OutcomeWaits()
        self._closed = False

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def ensure(self) -> bool:
        """True when notifications are being received (opening the connection if needed)."""
        if not self.listen:
            return False
        async with self._lock:
            if self.listening:
                return True
            if self._closed or time.monotonic() < self._retry_at:
                return False
            try:
                # Bounded: the other waits that need LISTEN queue behind this lock meanwhile.
                conn = await asyncio.wait_for(self._open(), timeout=_LISTEN_TIMEOUT)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._retry_at = time.monotonic() + _LISTEN_RETRY
                log.warning("delegation waits poll: cannot LISTEN on %s (%s: %s)",
                            queue.OUTCOME_CHANNEL, type(exc).__name__, exc)
                return False
            conn.add_termination_listener(self._lost)
            self._conn = conn
            return True

    async def _open(self) -> asyncpg.Connection:
        conn = await connect(self.settings, "fleet-delegation-listen",
                             url=await resolve_url(self.settings))
        try:
            await conn.add_listener(queue.OUTCOME_CHANNEL, self._notify)
        except BaseException:  # failed or cancelled (a timeout): not left open
            conn.terminate()
            raise
        return conn

    def _notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._waits.notified(payload)

    def _lost(self, *_: object) -> None:
        # Outcomes notified while the connection was down are not heard: wake every waiter to
        # read once (and, at its next wait, reopen the connection).
        self._conn = None
        self._waits.wake(None)

    def subscribe(self, message_id: int) -> contextlib.AbstractContextManager[asyncio.Event]:
        """An event set, while the block runs, by each notification naming ``message_id``."""
        return self._waits.waiting_on(message_id)

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=5.0)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()


class Delegator:
    """Runs ``ask_<child>`` calls for one worker's agent handler (module docstring)."""

    def __init__(self, settings: Settings, pool_of: Any, *, listen: bool = True) -> None:
        self.settings = settings
        #: () -> asyncpg.Pool: the handler's pool (created at start, after this object).
        self._pool_of = pool_of
        self.outcomes = OutcomeListener(settings, listen=listen)

    async def close(self) -> None:
        """Close the LISTEN connection, if a wait opened one (the handler's close)."""
        await self.outcomes.close()

    async def __call__(
        self, turn: Any, parent: str, child: str, request: str, call_id: str
    ) -> str:
        started = time.monotonic()
        at = now()
        depth = getattr(turn, "depth", 0) + 1
        limit = self.settings.fleet_max_delegation_depth
        payload: dict[str, Any] = {
            "parent_agent": parent,
            "agent": child,
            "depth": depth,
            "call_id": call_id,
            "request": request[:500],
            "parent_message_id": turn.message_id,
        }
        if depth > limit:
            error = (
                f"delegation refused: {parent} -> {child} would be delegation depth {depth}, "
                f"beyond FLEET_MAX_DELEGATION_DEPTH={limit}"
            )
            turn.audit.event("delegated", f"agent:{child}", payload,
                             {"status": "blocked", "error": error}, at=at)
            return f"error: {error}"

        pool: asyncpg.Pool = self._pool_of()
        session = child_session(turn.session_id, child)
        message_id = await queue.enqueue(
            pool,
            session,
            request,
            customer_id=turn.customer_id,
            dedupe_key=delegation_key(turn.message_id, child, request),
            agent=child,
            variables=turn.variables,
            max_attempts=self.settings.fleet_max_attempts,
            metadata={"delegation": {
                "depth": depth,
                "parent_message_id": turn.message_id,
                "parent_session": turn.session_id,
                "parent_agent": parent,
                "call_id": call_id,
            }},
        )
        payload.update(child_session=session, child_message_id=message_id)
        lease = getattr(turn, "lease", None)
        run_inline = getattr(lease, "run_inline", None)
        outcome = await self._wait(pool, message_id, run_inline)
        latency = int((time.monotonic() - started) * 1000)
        state = outcome.state if outcome else "timeout"
        result: dict[str, Any] = {"status": _STATUS.get(state, "error"), "state": state,
                                  "latency_ms": latency}
        if outcome is not None and outcome.state == "done":
            reply = outcome.reply or ""
            result["reply"] = reply[:500]
            text = reply
        elif outcome is not None and outcome.state in ("awaiting_approval", "queued"):
            what = ("'s action is waiting" if outcome.state == "awaiting_approval"
                    else " is busy with an earlier request waiting")
            text = (
                f"The {child} agent{what} for a human approval; its answer will "
                f"follow in session {session} (message {message_id})."
            )
        elif outcome is None:
            text = (
                f"error: the {child} agent did not answer within {WAIT_SECONDS:.0f}s; its "
                f"message {message_id} stays in the queue"
            )
            result["error"] = text
        else:
            text = f"error: the {child} agent's turn ended {outcome.state}: {outcome.error}"
            result["error"] = text[:1000]
        turn.audit.event("delegated", f"agent:{child}", payload, result, at=at)
        return text

    async def _wait(
        self, pool: asyncpg.Pool, message_id: int, run_inline: Any
    ) -> queue.Message | None:
        """The child's final (or parked) state; runs it here whenever it is claimable.

        Between reads it waits for a ``fleet_outcome`` notification naming the child (module
        docstring): after an inline run the child's outcome is still on its way through the
        completer, and a child another worker runs is done when that worker writes its
        outcome."""
        deadline = time.monotonic() + WAIT_SECONDS
        listening: bool | None = None  # not asked yet: a child done at once needs no LISTEN
        pause = _POLL
        marked = False  # the child marked as awaited (its finish will notify)
        with self.outcomes.subscribe(message_id) as notified:
            while time.monotonic() < deadline:
                notified.clear()  # before the read: an outcome written after it is heard
                read_at = time.monotonic()
                message = await queue.get_message(pool, message_id)
                if message is None:  # pragma: no cover - messages are never deleted
                    return None
                if message.state in queue.FINISHED_STATES or message.state == "awaiting_approval":
                    return message
                if message.state == "queued" and run_inline is not None:
                    if await run_inline(message_id):
                        pause = _POLL
                        continue  # read once: done, parked, or its outcome still being written
                if message.state == "queued":
                    # Behind an earlier delegation of this conversation that waits for a human:
                    # it runs only after that decision, so waiting here would only hold the
                    # parent.
                    blocker = await queue.parked_ahead(pool, message.session_id, message_id)
                    if blocker is not None:
                        return message  # still queued: the caller says what it waits behind
                if listening is None or (listening and not self.outcomes.listening):
                    heard = self.outcomes.listening
                    listening = await self.outcomes.ensure()
                    if listening and not marked:
                        await queue.await_reply(pool, message_id)
                        marked = True
                        continue  # read again: the finish before the mark did not notify
                    if listening and not heard:
                        continue  # notifications before LISTEN began are not heard: read again
                left = max(deadline - time.monotonic(), 0)
                if not listening:
                    await asyncio.sleep(min(pause, left))
                    pause = min(pause * 1.5, _POLL_MAX)
                    continue
                wait = min(_FALLBACK, left)
                if message.state == "queued":  # a retry not due yet: claim it when it is
                    due = (message.run_after - datetime.now(UTC)).total_seconds()
                    wait = min(wait, max(due, _POLL))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(notified.wait(), timeout=wait)
                # Read at most every _POLL (an empty payload wakes every waiter).
                await asyncio.sleep(max(_POLL - (time.monotonic() - read_at), 0))
        return None


_STATUS = {"done": "ok", "awaiting_approval": "awaiting", "queued": "awaiting", "dead": "error",
           "cancelled": "error", "timeout": "timeout"}


__all__ = ["Delegator", "OutcomeListener", "child_session", "delegation_depth", "delegation_key"]
