"""What a worker does with a claimed message: the handler interface and the built-in handlers.

A handler turns one claimed message into a :class:`Reply`, or parks it (:class:`Parked`) after
writing, under its lease, whatever must survive until a human decides. It raises
:class:`~fleet.errors.HandlerError` (or any exception) to fail the attempt; the queue then retries
with backoff or, after the last attempt, marks the message ``dead``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import asyncpg

from fleet import queue
from fleet.audit import TurnAudit
from fleet.errors import ConfigurationError, LeaseLost
from fleet.queue import ClaimedMessage
from fleet.settings import Settings


@dataclass(frozen=True)
class Reply:
    """The turn finished: this text is the message's one reply. ``trail`` holds audit rows
    that say so (the agent's ``message_sent``): the worker commits them in the transaction
    that stores the reply, so neither exists without the other."""

    text: str
    trail: TurnAudit | None = None


@dataclass(frozen=True)
class Parked:
    """The turn paused for a human; the handler already moved the message to ``awaiting_approval``
    inside :meth:`Lease.transaction`. ``approval_id`` names the parked run."""

    approval_id: str


HandlerResult = Reply | Parked


class Lease:
    """The worker's claim on one message, as a handler sees it."""

    def __init__(
        self,
        message: ClaimedMessage,
        pool: asyncpg.Pool,
        *,
        run_inline: Callable[[int], Awaitable[bool]] | None = None,
    ) -> None:
        self.message = message
        self.pool = pool
        #: The worker's way to run a delegation's child message (by id) in this turn's task,
        #: outside the slot count; False if it was not claimable. None outside a worker.
        self.run_inline = run_inline
        #: Set by the worker when someone cancels the message while it runs. A handler whose
        #: ``stops_on_cancel_request`` is true stops at its next step and raises
        #: :class:`~fleet.errors.TurnCancelled`; any other handler's task is cancelled.
        self.cancel_requested = asyncio.Event()
        #: The reason given with that request ('' when none).
        self.cancel_reason: str | None = None

    @property
    def token(self) -> int:
        return self.message.lease_token

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction that commits only while this worker still holds the lease.

        The message row is locked first, so a takeover cannot slip in between the check and the
        commit; writes that must not come from a zombie (parking a run, for one) go in here.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            if not await queue.lease_held(conn, self.message.id, self.token):
                raise LeaseLost(f"message {self.message.id}: lease was taken over")
            yield conn


@runtime_checkable
class Handler(Protocol):
    """The interface every handler implements."""

    name: str
    #: Optional (default False): the handler watches ``lease.cancel_requested`` and stops at its
    #: next step itself, instead of having its task cancelled wherever it is.
    # stops_on_cancel_request: bool

    async def start(self) -> None:
        """Acquire long-lived resources (pools, clients) before the first message. One that
        fails leaves nothing acquired: the worker retries it while the database is away."""

    async def handle(self, message: ClaimedMessage, lease: Lease) -> HandlerResult:
        """Process one message."""
        ...

    async def close(self) -> None:
        """Release what :meth:`start` acquired."""


class NoopHandler:
    """Replies ``ok`` after ``work_delay`` seconds: for benchmarks and fleet-level tests."""

    name = "noop"

    def __init__(self, work_delay: float = 0.0, fail_marker: str | None = "#fail") -> None:
        self.work_delay = work_delay
        self.fail_marker = fail_marker

    async def start(self) -> None:
        return None

    async def handle(self, message: ClaimedMessage, lease: Lease) -> HandlerResult:
        if self.work_delay:
            await asyncio.sleep(self.work_delay)
        if self.fail_marker and self.fail_marker in message.body:
            raise RuntimeError(f"noop handler told to fail by {self.fail_marker!r} in the body")
        return Reply("ok")

    async def close(self) -> None:
        return None


HANDLER_NAMES = ("agent", "noop")


def build_handler(
    name: str, settings: Settings, *, work_delay: float = 0.0, poll_only: bool = False
) -> Handler:
    """The handler ``fleet worker --handler NAME`` runs (``poll_only``: the worker's flag, which
    the agent handler's delegation waits follow)."""
    if name == "noop":
        return NoopHandler(work_delay)
    if name == "agent":
        from fleet.turn import AgentHandler

        return AgentHandler(settings, listen=not poll_only)
    raise ConfigurationError(
        f"unknown handler {name!r}; expected one of: {', '.join(HANDLER_NAMES)}"
    )
