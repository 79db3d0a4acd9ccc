"""The per-session order checks the fleet's order tests share, read from ``fleet.messages``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from fleet.database import TRANSIENT


def assert_session_order(rows: Sequence[Mapping[str, Any]]) -> int:
    """Each session's messages ran one at a time, in enqueue order: every message was claimed
    at or after the moment the one before it in its session finished.

    ``rows``: ``fleet.messages`` rows ``ORDER BY session_id, id``, each with ``session_id``,
    ``id``, ``claimed_at`` and ``finished_at``. Returns how many sessions there were, for the
    caller to check against what it enqueued."""
    seen: set[str] = set()
    for session, group in itertools.groupby(rows, key=lambda r: r["session_id"]):
        assert session not in seen, "rows must come ordered by session_id, id"
        seen.add(session)
        for earlier, later in itertools.pairwise(group):
            assert earlier["id"] < later["id"], "rows must come ordered by session_id, id"
            assert earlier["finished_at"] <= later["claimed_at"], (
                f"session {session!r}: message {later['id']} was claimed at"
                f" {later['claimed_at']}, before message {earlier['id']} finished at"
                f" {earlier['finished_at']}")
    return len(seen)


async def sessions_with_two_heads(url: str, stop: asyncio.Event, every: float = 0.02) -> set[str]:
    """Until ``stop`` is set, the sessions seen with more than one head at once, sampled every
    ``every`` seconds (each look one snapshot). A session's head is the one message of it a
    worker may claim, so two would let two of its messages run at once. A look that fails (the
    server restarting under a chaos test) is made again after a reconnect."""
    seen: set[str] = set()
    conn: asyncpg.Connection | None = None
    try:
        while not stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(url)
                seen.update(await conn.fetchval(
                    "SELECT coalesce(array_agg(session_id), '{}') FROM"
                    " (SELECT session_id FROM fleet.messages WHERE is_head"
                    "  GROUP BY session_id HAVING count(*) > 1) AS twice"))
            except (*TRANSIENT, asyncpg.PostgresError):
                if conn is not None:
                    conn.terminate()
                conn = None
            await asyncio.sleep(every)
    finally:
        if conn is not None and not conn.is_closed():
            await conn.close()
    return seen
