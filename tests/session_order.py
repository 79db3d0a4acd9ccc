"""The per-session order check the fleet's order tests share, read from ``fleet.messages``."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any


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
