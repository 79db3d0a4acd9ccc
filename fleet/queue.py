"""The queue: typed methods over the named statements in ``queue_sql/queries.sql``.

This module and the MCP server are the only places that talk SQL. Every write a worker makes on
a message it claimed carries the claim's lease token, and the statement itself refuses the write
when the token no longer matches (fencing): a worker that lost its lease cannot overwrite the
new owner's result, however late its write arrives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet import json_codec
from fleet.errors import InvalidInput
from fleet.sql import queries

if TYPE_CHECKING:
    from fleet.audit import TurnAudit

SQL = queries("queries.sql")

MessageState = Literal["queued", "running", "awaiting_approval", "done", "dead", "cancelled"]
MESSAGE_STATES: tuple[str, ...] = MessageState.__args__  # type: ignore[attr-defined]
FINISHED_STATES = frozenset({"done", "dead", "cancelled"})

#: NOTIFY channels of queue_sql/functions.sql: a claimable head appeared (workers listen);
#: messages someone waits on (:func:`await_reply`) finished or parked, their ids in the payload
#: (reply waiters listen: fleet.Client, delegations; see fleet.outcomes); a session whose head
#: an enqueue under REPEATABLE READ or SERIALIZABLE may have missed, its id in the payload
#: (workers listen, and call :func:`repair_sessions`).
WAKEUP_CHANNEL = "fleet_wakeup"
OUTCOME_CHANNEL = "fleet_outcome"
REPAIR_CHANNEL = "fleet_repair"

#: One connection or a pool: everything here works with either.
Executor = asyncpg.Connection | asyncpg.Pool


class NewMessage(BaseModel):
    """One message of :func:`enqueue_many`: :func:`enqueue`'s arguments, the same rules."""

    model_config = ConfigDict(extra="forbid")

    session_id: str
    body: str
    customer_id: str | None = None
    dedupe_key: str | None = None
    metadata: dict[str, Any] | None = None
    agent: str | None = None
    variables: dict[str, Any] | None = None
    max_attempts: int | None = None


class ClaimedMessage(NamedTuple):
    """A message this worker holds a lease on.

    Made from a claim's row, field by field in the order the claim statements return their
    columns (``claim``, ``claim_message``, ``fleet.finish_and_claim``; a test keeps them in
    step). The column types are the table's, so nothing is left to validate. A named tuple:
    immutable, and built at a tuple's speed, 0.3 us a message by hand against 1.4 for a frozen
    dataclass (which sets each field through ``object.__setattr__``) and 4.7 for pydantic's
    validation; a no-op drain is bound by the worker's Python per message (BENCHMARKS.md,
    2026-12-07 and 2026-12-08)."""

    id: int
    session_id: str
    agent: str
    body: str
    customer_id: str | None
    variables: dict[str, Any]
    metadata: dict[str, Any]
    attempts: int
    max_attempts: int
    takeovers: int
    lease_token: int
    enqueued_at: datetime
    claimed_at: datetime


class Message(BaseModel):
    """A message as ``fleet messages`` and ``Client.get_message`` show it."""

    id: int
    session_id: str
    agent: str
    body: str
    customer_id: str | None = None
    variables: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    dedupe_key: str | None = None
    state: MessageState
    attempts: int
    max_attempts: int
    takeovers: int
    enqueued_at: datetime
    claimed_at: datetime | None = None
    finished_at: datetime | None = None
    run_after: datetime
    lease_owner: str | None = None
    reply: str | None = None
    error: str | None = None


class Outcome(NamedTuple):
    """How a claimed message ends: ``done`` with its reply, ``dead`` with its error, or
    ``cancelled`` on request while it ran. Made by the worker for every message, from values it
    already holds, so nothing to validate: a named tuple, 0.5 us to build by hand against 1.0
    for a frozen dataclass (a pydantic model's validation had cost 1.2 us more than that)."""

    message_id: int
    lease_token: int
    state: Literal["done", "dead", "cancelled"]
    reply: str | None = None
    error: str | None = None
    #: Audit rows to commit in the transaction that writes this outcome (the reply's
    #: ``message_sent``), only if it is accepted under its lease token.
    trail: TurnAudit | None = None


def _invalid(exc: asyncpg.PostgresError) -> InvalidInput:
    message = getattr(exc, "message", None) or str(exc)
    for call in ("fleet.enqueue: ", "fleet.enqueue_many: "):
        message = message.removeprefix(call)
    return InvalidInput(message)


def validate_state(state: str | None) -> str | None:
    if state is not None and state not in MESSAGE_STATES:
        raise InvalidInput(
            f"unknown message state {state!r}; expected one of: {', '.join(MESSAGE_STATES)}"
        )
    return state


async def enqueue(
    db: Executor,
    session_id: str,
    body: str,
    *,
    customer_id: str | None = None,
    dedupe_key: str | None = None,
    metadata: dict[str, Any] | None = None,
    agent: str | None = None,
    variables: dict[str, Any] | None = None,
    max_attempts: int | None = None,
) -> int:
    """Enqueue one message; inside ``db``'s transaction when ``db`` is a connection in one."""
    _refuse_nul({"session_id": session_id, "body": body, "customer_id": customer_id,
                 "dedupe_key": dedupe_key, "agent": agent})
    try:
        return await db.fetchval(
            SQL["enqueue"],
            session_id,
            body,
            customer_id,
            dedupe_key,
            _json_text("metadata", metadata),
            agent,
            _json_text("variables", variables),
            max_attempts,
        )
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
        raise _invalid(exc) from exc
    except asyncpg.RaiseError as exc:  # pragma: no cover - RAISE without a data errcode
        raise _invalid(exc) from exc


async def enqueue_many(
    db: Executor,
    messages: Iterable[NewMessage | Mapping[str, Any]],
    *,
    default_max_attempts: int | None = None,
) -> list[int]:
    """Enqueue a batch in one statement, all or nothing: the same as :func:`enqueue` for each
    message in turn (rules, dedupe keys, session metadata, wake-ups), for less of the
    database's time per message (README). Returns the ids in order (the existing id where a
    dedupe key repeats). A bad message raises :class:`InvalidInput` naming its position (from 1) and
    field, and nothing is written. ``default_max_attempts`` goes to messages without their
    own (else the database's ``fleet.max_attempts`` setting, else 5, as in SQL)."""
    batch: list[dict[str, Any]] = []
    for position, message in enumerate(messages, start=1):
        try:
            new = message if isinstance(message, NewMessage) else NewMessage.model_validate(message)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "message"
            raise InvalidInput(f"message {position}: {field}: {error['msg']}") from exc
        if new.max_attempts is None and default_max_attempts is not None:
            new = new.model_copy(update={"max_attempts": default_max_attempts})
        fields = new.model_dump(exclude_none=True)
        _refuse_nul(fields, f"message {position}: ")
        batch.append(fields)
    if not batch:
        return []
    try:
        payload = json_codec.dumps(batch)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"messages are not JSON-serialisable: {exc}") from exc
    try:
        return list(await db.fetchval(SQL["enqueue_many"], payload))
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
        raise _invalid(exc) from exc


def _refuse_nul(fields: Mapping[str, object], where: str = "") -> None:
    """PostgreSQL text cannot hold NUL: say which field, instead of an encoding error."""
    for field, value in fields.items():
        if isinstance(value, str) and "\x00" in value:
            raise InvalidInput(f"{where}{field} must not contain NUL bytes")


def _json_text(field: str, value: dict[str, Any] | None) -> str:
    try:
        return json_codec.dumps(value or {})
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{field} is not JSON-serialisable: {exc}") from exc


async def claim(
    db: Executor,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    *,
    tools: Sequence[str] | None = None,
    skills: Sequence[str] | None = None,
) -> list[ClaimedMessage]:
    """Claim up to ``limit`` heads. With ``tools`` (and ``skills``) given, only messages for
    agents whose tools and skills (and their sub-agents') are within them; None: any agent."""
    if limit <= 0:
        return []
    rows = await db.fetch(
        SQL["claim"],
        worker_id,
        limit,
        lease_seconds,
        None if tools is None else list(tools),
        None if tools is None else list(skills or ()),
    )
    return [_claimed(row) for row in rows]


def _claimed(row: asyncpg.Record) -> ClaimedMessage:
    """A claimed row as a message: positionally (``**row`` looks each column up by name: 4.2
    us a message by hand, against 1.6)."""
    return ClaimedMessage(*row)


async def finish_and_claim(
    db: Executor,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    outcomes: Sequence[Outcome],
    *,
    tools: Sequence[str] | None = None,
    skills: Sequence[str] | None = None,
) -> tuple[set[int], list[ClaimedMessage]]:
    """Write ``outcomes`` (as :func:`finish`) and claim up to ``limit`` heads (as :func:`claim`)
    in one statement and one transaction: one round trip and one commit per worker cycle.
    Returns the ids finished under their tokens and the messages claimed."""
    if not outcomes:
        return set(), await claim(db, worker_id, limit, lease_seconds, tools=tools,
                                  skills=skills)
    rows = await db.fetch(
        SQL["finish_and_claim"],
        worker_id,
        max(limit, 0),
        lease_seconds,
        None if tools is None else list(tools),
        None if tools is None else list(skills or ()),
        [o.message_id for o in outcomes],
        [o.lease_token for o in outcomes],
        [o.state for o in outcomes],
        [o.reply for o in outcomes],
        [o.error for o in outcomes],
    )
    finished = {row["id"] for row in rows if row["lease_token"] is None}
    return finished, [_claimed(row) for row in rows if row["lease_token"] is not None]


async def claim_message(
    db: Executor, worker_id: str, message_id: int, lease_seconds: float
) -> ClaimedMessage | None:
    """Claim one given message if it is a claimable head (a delegation's child, run inline)."""
    row = await db.fetchrow(SQL["claim_message"], worker_id, message_id, lease_seconds)
    return _claimed(row) if row else None


async def heartbeat(
    db: Executor, leases: Sequence[tuple[int, int]], lease_seconds: float
) -> dict[int, str | None]:
    """Extend leases; returns ``{message id: cancel reason}`` for the leases still ours: None
    when no one asked to cancel it, the reason given ('' when none) when someone did. Never
    waits for a row lock: a message another transaction holds locked is returned with None,
    not extended this time (the heartbeat's SQL says why)."""
    if not leases:
        return {}
    ids, tokens = zip(*leases, strict=True)
    rows = await db.fetch(SQL["heartbeat"], list(ids), list(tokens), lease_seconds)
    return {row["id"]: row["cancel_reason"] for row in rows}


async def parked_ahead(db: Executor, session_id: str, message_id: int) -> int | None:
    """The id of a message ahead of ``message_id`` in its session that waits for a human."""
    return await db.fetchval(SQL["parked_ahead"], session_id, message_id)


async def finish(db: Executor, outcomes: Sequence[Outcome]) -> set[int]:
    """Write final outcomes in one statement; returns the ids accepted under their tokens."""
    if not outcomes:
        return set()
    rows = await db.fetch(
        SQL["finish"],
        [o.message_id for o in outcomes],
        [o.lease_token for o in outcomes],
        [o.state for o in outcomes],
        [o.reply for o in outcomes],
        [o.error for o in outcomes],
    )
    return {row["id"] for row in rows}


async def retry(db: Executor, message_id: int, token: int, error: str, delay: float) -> bool:
    return await db.fetchval(SQL["retry"], message_id, token, error, delay) is not None


async def release(db: Executor, leases: Iterable[tuple[int, int]]) -> set[int]:
    leases = list(leases)
    if not leases:
        return set()
    ids, tokens = zip(*leases, strict=True)
    rows = await db.fetch(SQL["release"], list(ids), list(tokens))
    return {row["id"] for row in rows}


async def rescue_expired(db: Executor) -> list[int]:
    return [row["id"] for row in await db.fetch(SQL["rescue_expired"])]


async def repair_heads(db: Executor) -> int:
    """The safety net: find sessions that lost their head by reading every waiting message."""
    return await db.fetchval(SQL["repair_heads"])


async def repair_sessions(db: Executor, sessions: Sequence[str]) -> int:
    """Give these sessions (named by ``fleet_repair`` notifications) a head where they lost it."""
    return await db.fetchval(SQL["repair_sessions"], list(sessions))


async def park(conn: asyncpg.Connection, message_id: int, token: int) -> bool:
    """Mark a running message as waiting for a human (call inside the parking transaction)."""
    return await conn.fetchval(SQL["park"], message_id, token) is not None


async def unpark(conn: asyncpg.Connection, message_id: int) -> bool:
    """Make a parked message claimable again once its approval is decided."""
    return await conn.fetchval(SQL["unpark"], message_id) is not None


async def lease_held(conn: asyncpg.Connection, message_id: int, token: int) -> bool:
    """Row-lock the message if the lease is still ours (use inside a transaction)."""
    return await conn.fetchval(SQL["lease_held"], message_id, token) is not None


async def cancel(db: Executor, message_id: int, reason: str) -> bool:
    """Cancel a queued or parked message at once; False if it is in another state."""
    return bool(await db.fetchval(SQL["cancel"], message_id, reason))


async def await_reply(db: Executor, message_id: int) -> None:
    """Mark a message as waited on: finishing or parking it then NOTIFYs ``fleet_outcome`` with
    its id (migration 0017). Call before the first read of the message you wait for."""
    await db.execute(SQL["await_reply"], message_id)


async def request_cancel(db: Executor, message_id: int, reason: str | None = None) -> bool:
    return await db.fetchval(SQL["request_cancel"], message_id, reason) is not None


def check_message_id(message_id: object) -> int:
    """A message id as the caller gave it: a positive integer that fits fleet.messages.id."""
    if isinstance(message_id, bool) or not isinstance(message_id, int) \
            or not 0 < message_id < 2**63:
        raise InvalidInput(f"a message id is an integer from 1 to {2**63 - 1}, not {message_id!r}")
    return message_id


async def get_message(db: Executor, message_id: int) -> Message | None:
    row = await db.fetchrow(SQL["get_message"], check_message_id(message_id))
    return Message(**dict(row)) if row else None


async def list_messages(
    db: Executor, *, session_id: str | None = None, state: str | None = None, limit: int = 100
) -> list[Message]:
    validate_state(state)
    if limit < 1:
        raise InvalidInput(f"limit must be a positive number, got {limit}")
    if session_id is None:
        rows = await db.fetch(SQL["list_messages"], state, limit)
    else:
        rows = await db.fetch(SQL["list_session_messages"], session_id, state, limit)
    return [Message(**dict(row)) for row in rows]


async def prune_finished(db: Executor, older_than: timedelta, *, batch: int = 10_000) -> int:
    """Delete finished messages (done, dead, cancelled) that finished more than ``older_than``
    ago by the database's clock (the one that stamped them), ``batch`` messages a transaction,
    oldest ids first; returns how many went. Live messages stay, and so does any message an
    approval refers to. A dedupe key is remembered as long as its message is kept: once
    pruned, the key can be enqueued again. Needs DELETE on fleet.messages (the schema owner;
    the worker roles have none)."""
    if batch < 1:
        raise InvalidInput("batch must be at least 1")
    deleted, after = 0, 0
    while True:
        row = await db.fetchrow(SQL["prune_finished"], after, batch, older_than)
        deleted += row["deleted"]
        if row["last_id"] is None or row["past_cutoff"]:
            return deleted
        after = row["last_id"]


async def has_unfinished_work(db: Executor) -> bool:
    """True while any message is queued or running (cheap: the live-messages index)."""
    return bool(await db.fetchval(SQL["has_unfinished_work"]))


async def live_state_counts(db: Executor) -> dict[str, dict[str, float]]:
    """Queued, running and parked messages per state, with the age of each state's oldest
    (cheap: the live-messages indexes). States with no message are left out."""
    return _state_counts(await db.fetch(SQL["live_state_counts"]))


async def finished_state_counts(db: Executor) -> dict[str, dict[str, float]]:
    """Done, dead and cancelled messages per state, with the age of each state's oldest. Reads
    the whole history: its cost grows with every message ever finished."""
    return _state_counts(await db.fetch(SQL["finished_state_counts"]))


def _state_counts(rows: Sequence[asyncpg.Record]) -> dict[str, dict[str, float]]:
    return {
        row["state"]: {"count": row["n"], "oldest_age_seconds": row["oldest_age_seconds"]}
        for row in rows
    }


async def oldest_queued_age(db: Executor) -> float:
    return await db.fetchval(SQL["oldest_queued_age"])
