"""Waiting for messages' outcomes in one process: who waits on which message, and the
``fleet_outcome`` notifications that tell them.

A waiter marks its message first (:func:`fleet.queue.await_reply`, migration 0017); finishing or
parking a marked message sends one ``fleet_outcome`` notification whose payload names the
marked ids, comma-separated, or nothing when they would not fit in a payload. So a waiter
wakes for its own message, not for every batch of outcomes in the fleet. Used by
``fleet.Client`` and by delegations (``fleet.delegation.OutcomeListener``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


def outcome_ids(payload: str) -> frozenset[int] | None:
    """The message ids a ``fleet_outcome`` notification names; None when it names none (an
    empty payload, sent when the ids would not fit): every waiter should read its message."""
    try:
        return frozenset(int(part) for part in payload.split(",")) if payload else None
    except ValueError:
        return None


class OutcomeWaits:
    """The waits under way, by message id; several may wait on one message."""

    def __init__(self) -> None:
        self._events: dict[int, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def waiting_on(self, message_id: int) -> Iterator[asyncio.Event]:
        """An event set, while the block runs, when a notification names ``message_id``."""
        event = asyncio.Event()
        events = self._events.setdefault(message_id, set())
        events.add(event)
        try:
            yield event
        finally:
            events.discard(event)
            if not events:
                self._events.pop(message_id, None)

    def notified(self, payload: str) -> None:
        """A ``fleet_outcome`` notification arrived with this payload."""
        self.wake(outcome_ids(payload))

    def wake(self, named: frozenset[int] | None) -> None:
        """Set the events of the waits on the ``named`` messages; all of them for None (a
        payload naming none, or notifications that may have been missed)."""
        waited = self._events.keys()
        for message_id in waited if named is None else named & waited:
            for event in self._events[message_id]:
                event.set()
