"""Conversation memory: an asyncpg-native implementation of the Agents SDK's ``Session``.

The SDK calls ``add_items`` several times per turn (the input, each batch of tool calls and
outputs, the reply), each its own write in the SDK's own backends. Here a turn is one unit: the
session reads the history once when the turn opens (in the same round trip that upserts the
``conversations`` row), buffers whatever the SDK adds during the turn, and writes the buffer in
one statement when the turn ends or parks (:meth:`PostgresSession.flush`), fenced by the
message's lease token. So:

* a turn costs two database round trips for its memory, whatever the SDK does in between;
* a failed attempt, or a worker that lost its lease, leaves no half turn in the history (the
  queue retries the whole turn);
* a retried attempt first deletes what an earlier attempt of the same message managed to write
  (``message_id``/``resume_of`` tag every row), so history never holds a turn twice.

``get_items`` during the turn returns history + buffer, exactly what a write-through session
would return, which is what the SDK's resume and reconciliation logic compares against.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import asyncpg
from agents.memory.session_settings import SessionSettings

from fleet.errors import LeaseLost
from fleet.sql import queries

SQL = queries("agent_runtime.sql")


def _plain(item: Any) -> dict[str, Any]:
    """A session item as a JSON object (the SDK hands over dicts, sometimes pydantic models)."""
    if isinstance(item, dict):
        return json.loads(json.dumps(item, default=_default))
    dump = getattr(item, "model_dump", None)
    if dump is not None:
        return dump(mode="json", exclude_unset=True)
    raise TypeError(f"cannot store a {type(item).__name__} in a session")


def _default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json", exclude_unset=True)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class PostgresSession:
    """One conversation's items for one turn (see the module docstring)."""

    session_settings: SessionSettings | None = None

    def __init__(
        self,
        pool: asyncpg.Pool,
        session_id: str,
        *,
        message_id: int | None = None,
        resume_of: str | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        self.pool = pool
        self.session_id = session_id
        self.message_id = message_id
        self.resume_of = resume_of
        self._history: list[dict[str, Any]] | None = history
        self._buffer: list[dict[str, Any]] = []

    @classmethod
    async def open_turn(
        cls,
        pool: asyncpg.Pool,
        session_id: str,
        *,
        message_id: int,
        user_id: str,
        metadata: dict[str, Any] | None = None,
        resume_of: str | None = None,
    ) -> PostgresSession:
        """Upsert the conversation, drop an earlier attempt's rows, read the history: one trip."""
        rows = await pool.fetch(
            SQL["turn_open"], session_id, user_id, metadata or {}, message_id, resume_of
        )
        return cls(
            pool,
            session_id,
            message_id=message_id,
            resume_of=resume_of,
            history=[row["item"] for row in rows],
        )

    # -- the SDK's Session protocol ------------------------------------------------------------

    async def get_items(self, limit: int | None = None) -> list[Any]:
        if self._history is None:
            rows = await self.pool.fetch(SQL["session_items"], self.session_id, None)
            self._history = [row["item"] for row in rows]
        items = self._history + self._buffer
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return copy.deepcopy(items)

    async def add_items(self, items: list[Any]) -> None:
        self._buffer.extend(_plain(item) for item in items)

    async def pop_item(self) -> Any | None:
        if self._buffer:
            return self._buffer.pop()
        row = await self.pool.fetchrow(SQL["session_pop"], self.session_id)
        if row is None:
            return None
        if self._history:
            self._history.pop()
        return row["item"]

    async def clear_session(self) -> None:
        await self.pool.execute(SQL["session_clear"], self.session_id)
        self._history = []
        self._buffer = []

    # -- the turn's end ------------------------------------------------------------------------

    @property
    def pending(self) -> list[dict[str, Any]]:
        return list(self._buffer)

    async def flush(self, lease_token: int, summary: str | None = None) -> int:
        """Write the buffered items (and the conversation summary) while the lease is held.

        Raises :class:`~fleet.errors.LeaseLost` when another worker owns the message now.
        Returns the number of items written.
        """
        if self.message_id is None:
            raise ValueError("flush needs the session opened for a message (open_turn)")
        items = self._buffer
        held = await self.pool.fetchval(
            SQL["session_flush"],
            self.session_id,
            self.message_id,
            lease_token,
            self.resume_of,
            items,
            summary,
        )
        if not held:
            raise LeaseLost(f"message {self.message_id}: lease lost before its turn was saved")
        if self._history is not None:
            self._history.extend(items)
        self._buffer = []
        return len(items)
