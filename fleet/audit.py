"""The agent-side audit trail: ``audit_log`` and ``capability_invocations`` rows for every turn.

Course Concept 10 and Decision 7: every meaningful action of a turn leaves a row (the message
received, each skill activated, each MCP tool call with its arguments, result, status and
latency, each guardrail trip, the reply sent), so ``fleet trace`` can replay the turn without the
model. The MCP server writes its own business receipts (``refund_issued``) inside its own
transactions; this module never goes through the MCP boundary.

Design:

* **Its own pool** (``fleet-audit``): audit must not be starved by the pools it audits.
* **Group commit**: a turn collects its rows in a :class:`TurnAudit` and hands them over once;
  one background writer puts everything that is waiting into ONE statement (``audit_write``),
  so under load many turns share a round trip. The turn waits for its rows to be durable before
  it replies, so a reply never exists without its trail (unless the audit database is down).
* **The reply's own row commits with the reply**: ``message_sent`` is not the writer's. It goes
  with the turn's :class:`~fleet.handlers.Reply` to the worker, which writes it with
  :func:`write_with_outcomes` in the transaction that marks the message done, under the lease.
  A worker that dies before that commit, or lost its lease, leaves no ``message_sent`` for a
  reply that was never stored; the attempt that does store one leaves exactly one.
* **Never crashes the worker**: a failed write is retried with backoff; rows that still cannot
  be written are counted (``fleet_audit_write_failures_total``) and logged, and the turn goes
  on. Payloads carry no secrets: the turn passes only ids, arguments and results.
* **Times are event times**: each row carries the moment it happened (not the flush time), so
  the trail orders by ``created_at`` even though rows are written later in batches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg

from fleet import metrics
from fleet.database import TRANSIENT, close_pool, create_pool
from fleet.queue import Executor
from fleet.settings import Settings
from fleet.sql import queries

log = logging.getLogger("fleet.audit")
SQL = queries("agent_runtime.sql")

Status = Literal["ok", "error", "blocked", "timeout"]

#: Tool results longer than this are cut in the audit row (the full text stays in the session).
MAX_RESULT_CHARS = 4000


def now() -> datetime:
    return datetime.now(UTC)


def clip(value: Any, limit: int = MAX_RESULT_CHARS) -> Any:
    """A tool result as JSON for the audit row: decoded when it is JSON text, cut when long."""
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value if len(value) <= limit else value[:limit] + "…"
        text = json.dumps(decoded)
        return decoded if len(text) <= limit else text[:limit] + "…"
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = str(value)
    return value if len(text) <= limit else text[:limit] + "…"


@dataclass
class AuditRow:
    action: str
    target: str | None
    payload: dict[str, Any]
    result: Any
    created_at: datetime
    actor: str


@dataclass
class InvocationRow:
    capability: str
    arguments: dict[str, Any]
    result: Any
    status: Status
    latency_ms: int | None
    created_at: datetime


@dataclass
class TurnAudit:
    """The rows one turn produced, in the order they happened."""

    session_id: str
    actor: str
    rows: list[AuditRow] = field(default_factory=list)
    invocations: list[InvocationRow] = field(default_factory=list)

    def event(
        self,
        action: str,
        target: str | None,
        payload: dict[str, Any],
        result: Any = None,
        *,
        at: datetime | None = None,
    ) -> None:
        self.rows.append(AuditRow(action, target, payload, result, at or now(), self.actor))

    def capability(
        self,
        capability: str,
        *,
        action: str,
        arguments: dict[str, Any],
        result: Any,
        status: Status,
        latency_ms: int | None,
        payload: dict[str, Any] | None = None,
        at: datetime | None = None,
    ) -> None:
        """One tool or skill call: its audit row and its capability_invocations row."""
        at = at or now()
        clipped = clip(result)
        self.rows.append(
            AuditRow(
                action,
                capability,
                {**(payload or {}), "arguments": arguments},
                {"status": status, "latency_ms": latency_ms, "output": clipped},
                at,
                self.actor,
            )
        )
        self.invocations.append(
            InvocationRow(capability, arguments, {"output": clipped}, status, latency_ms, at)
        )

    def take(self) -> tuple[list[AuditRow], list[InvocationRow]]:
        rows, invocations = self.rows, self.invocations
        self.rows, self.invocations = [], []
        return rows, invocations


@dataclass
class _Batch:
    """Rows handed to the writer (taken from a turn's :class:`TurnAudit`) and their waiter."""

    trail: TurnAudit
    done: asyncio.Future[bool]


#: The columns of ``audit_write``'s two unnests after the conversation id, as attribute names.
_AUDIT_COLUMNS = ("actor", "action", "target", "payload", "result", "created_at")
_INVOCATION_COLUMNS = ("capability", "arguments", "result", "status", "latency_ms", "created_at")


def _columns(trails: Sequence[TurnAudit], kind: str, names: tuple[str, ...]) -> list[list[Any]]:
    """One list per column of every trail's ``kind`` rows: the conversation, then ``names``."""
    items = [(trail.session_id, item) for trail in trails for item in getattr(trail, kind)]
    return [[session for session, _ in items]] + [
        [getattr(item, name) for _, item in items] for name in names
    ]


async def insert(db: Executor, trails: Sequence[TurnAudit]) -> None:
    """Insert ``trails``' rows in one statement (``audit_write``) on ``db``."""
    await db.fetchrow(
        SQL["audit_write"],
        *_columns(trails, "rows", _AUDIT_COLUMNS),
        *_columns(trails, "invocations", _INVOCATION_COLUMNS),
        timeout=10,
    )


async def write_with_outcomes(conn: asyncpg.Connection, trails: Sequence[TurnAudit]) -> None:
    """Write ``trails`` inside the caller's transaction, the one that writes the messages'
    outcomes (the worker's), so each row commits with its message's reply or not at all.

    In a savepoint: a row the table refuses (a constraint) is counted and logged and the
    outcomes still commit, since an audit failure never costs a turn its reply. A lost
    connection is raised: the whole transaction is gone, and the worker writes the outcomes,
    with their rows, again."""
    count = sum(len(t.rows) + len(t.invocations) for t in trails)
    if not count:
        return
    try:
        async with conn.transaction():
            await insert(conn, trails)
    except TRANSIENT:
        raise
    except asyncpg.PostgresError as exc:
        metrics.AUDIT_WRITE_FAILURES.inc(count)
        log.error("audit: %d rows written with their replies were refused: %s", count, exc)


class AuditWriter:
    """Writes turns' audit rows on its own pool, batched, retried, never raising."""

    def __init__(
        self,
        settings: Settings,
        *,
        url: str | None = None,
        attempts: int = 4,
        backoff: float = 0.05,
        pool_size: int = 2,
    ) -> None:
        self.settings = settings
        self.url = url
        self.attempts = attempts
        self.backoff = backoff
        self.pool_size = pool_size
        self.pool: asyncpg.Pool | None = None
        self._waiting: list[_Batch] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight = 0
        self.failed_rows = 0
        self.written_rows = 0

    async def start(self) -> None:
        # Its statements are single INSERTs: no session state to reset on every release.
        self.pool = await create_pool(
            self.settings, "fleet-audit", url=self.url, min_size=1, max_size=self.pool_size,
            reset_sessions=False, command_timeout=self.settings.fleet_lease_seconds,
        )
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def close(self) -> None:
        if self._task is not None:
            while self._waiting or self._inflight:
                self._wake.set()
                await asyncio.sleep(0.01)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.pool is not None:
            await close_pool(self.pool)

    async def write(self, turn: TurnAudit) -> bool:
        """Make the turn's rows so far durable; True when they were written."""
        rows, invocations = turn.take()
        if not rows and not invocations:
            return True
        if self._task is None:
            raise RuntimeError("AuditWriter.start() was not called")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append(
            _Batch(TurnAudit(turn.session_id, turn.actor, rows, invocations), done)
        )
        self._wake.set()
        # Shielded: a cancelled turn (lost lease, shutdown) still leaves its trail.
        return await asyncio.shield(done)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                batch, self._waiting = self._waiting, []
                self._inflight = len(batch)
                try:
                    outcomes = await self._write_with_retries(batch)
                finally:
                    self._inflight = 0
                for item, ok in zip(batch, outcomes, strict=True):
                    if not item.done.done():
                        item.done.set_result(ok)

    async def _write_with_retries(
        self, batch: list[_Batch], *, first: bool = True
    ) -> list[bool]:
        """Write ``batch``; per turn, whether its rows were written."""
        count = sum(len(b.trail.rows) + len(b.trail.invocations) for b in batch)
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                await self._write(batch)
                self.written_rows += count
                return [True] * len(batch)
            except TRANSIENT as exc:
                if attempt == 1 and first:
                    metrics.AUDIT_WRITE_FAILURES.inc(count)
                if attempt == self.attempts:
                    break
                log.warning("audit write failed (%s); retry %d in %.2fs", exc, attempt, delay)
                await asyncio.sleep(delay)
                delay *= 4
            except asyncpg.PostgresError as exc:
                # One turn's bad row (a constraint) must not cost the other turns their trail.
                if first:
                    metrics.AUDIT_WRITE_FAILURES.inc(count)
                if len(batch) > 1:
                    return [(await self._write_with_retries([b], first=False))[0] for b in batch]
                session = batch[0].trail.session_id
                log.error("audit: %d rows of session %s refused: %s", count, session, exc)
                self.failed_rows += count
                return [False]
            except Exception:  # a bug here must not take the worker down
                metrics.AUDIT_WRITE_FAILURES.inc(count)
                log.exception("audit: unexpected error writing %d rows", count)
                self.failed_rows += count
                return [False] * len(batch)
        self.failed_rows += count
        log.error("audit: %d rows for %d turns could not be written", count, len(batch))
        return [False] * len(batch)

    async def _write(self, batch: list[_Batch]) -> None:
        assert self.pool is not None
        started = time.monotonic()
        await insert(self.pool, [b.trail for b in batch])
        elapsed_ms = (time.monotonic() - started) * 1e3
        log.debug("audit: %d turns written in %.1f ms", len(batch), elapsed_ms)
