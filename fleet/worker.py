"""One worker process: claims messages, runs the handler on each, writes outcomes.

The pieces, each an asyncio task started and stopped the same way:

* **listener**: a dedicated connection LISTENing on ``fleet_wakeup``, ``fleet_cancel`` and
  ``fleet_repair``; it reconnects after the database restarts and wakes the producer after
  every reconnect (NOTIFYs sent while it was away are lost, the queue is not).
  ``--poll-only`` skips it (PgBouncer transaction pooling).
* **producer**: when woken (NOTIFY, a finished handler, or the poll interval) writes the
  outcomes that finished since its last call and claims for the free slots (at most
  ``claim_batch``) in one statement and one commit (``fleet.finish_and_claim``), then starts
  one handler task per message claimed. Each call runs in its own task, so the next claim
  overlaps the handlers just started; with ``claim_batch`` at most half the concurrency a
  second call may run beside the first while a backlog drains, or when a NOTIFY comes during
  the first.
* **completer**: writes outcomes in batches when the producer will not: while stopping, or
  with no slot free (so nothing to claim).
* **heartbeat**: extends the leases held; a lease found taken over cancels its handler task.
  A message someone asked to cancel (``fleet cancel``; the request NOTIFYs ``fleet_cancel``,
  which makes the heartbeat run at once) is stopped: a handler that can stop between steps
  (the agent) is told through its lease and stops before its next model or tool call; any
  other handler's task is cancelled. One lease period later a turn still running is cancelled
  regardless.
* **repairer** (beside the listener): gives each session ``fleet_repair`` names its head, if it
  has none, as soon as the NOTIFY comes: an enqueue in a REPEATABLE READ or SERIALIZABLE
  transaction leaves its session's head election to the workers (``queue_sql/functions.sql``).
* **maintenance**: gives expired leases of dead workers back to the queue, repairs heads no
  worker heard of (reading every waiting message, every few minutes), keeps this worker's row
  in ``fleet.workers`` fresh.

Shutdown (SIGTERM/SIGINT): stop claiming, let handlers finish within the grace period, cancel
the rest and release their messages so another worker takes them at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg

from fleet import approvals, audit, metrics, queue, tracing
from fleet.database import TRANSIENT, close_pool, connect, create_pool, resolve_url
from fleet.errors import ConfigurationError, LeaseLost, PermanentHandlerError, TurnCancelled
from fleet.handlers import Handler, Lease, Parked, Reply
from fleet.queue import ClaimedMessage, Outcome
from fleet.settings import Settings
from fleet.sql import queries

log = logging.getLogger("fleet.worker")
SQL = queries("queries.sql")
T = TypeVar("T")
#: ``fleet cancel`` on a running message NOTIFYs this (payload: the message id).
CANCEL_CHANNEL = "fleet_cancel"
#: How often a listening worker reads every waiting message for sessions that lost their head
#: (fleet.repair_heads), in seconds: the notifications it hears cover the rest.
FULL_REPAIR_INTERVAL = 300.0
#: The same for a ``--poll-only`` worker, which hears no notification.
POLL_ONLY_REPAIR_INTERVAL = 30.0
#: Connections of a worker's pool (claims, outcome writes, heartbeats, rescues; RELIABILITY.md
#: counts them): two claims can be in flight beside the completer and the heartbeat.
POOL_SIZE = 4
#: How soon an outcome whose session was busy (another head change under way) is written
#: again, in seconds: such a lock is held for the rest of a commit, not longer.
DEFERRED_RETRY_SECONDS = 0.005


class _Stopped(Exception):
    """Asked to stop while waiting for the database at start-up."""


async def _require_read_committed(pool: asyncpg.Pool) -> None:
    """The queue's functions take a session's row lock and then read what committed before
    it, which each statement of a READ COMMITTED transaction does and a REPEATABLE READ one
    does not (it reads the snapshot its transaction began with): a finish would miss a
    message enqueued just before it and leave its session without a head. The worker's
    statements run in their own transactions at the database's default isolation, so a
    default other than READ COMMITTED is refused at start rather than lose heads."""
    isolation = await pool.fetchval("SELECT current_setting('transaction_isolation')")
    if isolation != "read committed":
        raise ConfigurationError(
            f"the database's default_transaction_isolation is {isolation!r}; fleet workers"
            " need 'read committed' (set it for their role: ALTER ROLE ... SET"
            " default_transaction_isolation = 'read committed')"
        )


def retry_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, capped."""
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass
class _InFlight:
    message: ClaimedMessage
    task: asyncio.Task[None]
    lease: Lease
    started: float = field(default_factory=time.monotonic)


class Worker:
    """A worker process's main object. ``await Worker(...).run()`` until :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        handler: Handler,
        *,
        concurrency: int = 10,
        claim_batch: int | None = None,
        poll_only: bool = False,
        drain: bool = False,
        worker_id: str | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if claim_batch is not None and claim_batch < 1:
            raise ValueError("claim_batch must be at least 1")
        self.settings = settings
        self.handler = handler
        self.concurrency = concurrency
        #: At most this many messages per claim. Below ``concurrency`` (e.g. half of it, the
        #: ratio PgQueuer requires of its own cap) the next claim is already under way while
        #: the previous batch's handlers run, instead of waiting for all of them to finish.
        self.claim_batch = min(claim_batch or concurrency, concurrency)
        self.poll_only = poll_only
        self.drain = drain
        #: Called once connected, the handler started and the worker registered, before the
        #: first claim (``fleet worker`` settles the garbage collector there).
        self.on_ready = on_ready
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_seconds = settings.fleet_lease_seconds
        self.poll_interval = settings.fleet_poll_interval
        self.in_flight: dict[int, _InFlight] = {}
        #: leases held, including outcomes not yet written (the heartbeat keeps them alive)
        self.held: dict[int, int] = {}
        #: running messages whose cancellation was requested -> when this worker first saw it
        self._cancelling: dict[int, float] = {}
        #: parent message id -> its delegations' child messages running inline (fleet.delegation)
        self._children: dict[int, set[int]] = {}
        #: set by a ``fleet_cancel`` NOTIFY for a message in flight: heartbeat now
        self._heartbeat_now = asyncio.Event()
        #: sessions ``fleet_repair`` NOTIFYs named, for the repairer (which ``_repair_due`` wakes)
        self._to_repair: set[str] = set()
        self._repair_due = asyncio.Event()
        self._pending: list[Outcome] = []
        self._pending_event = asyncio.Event()
        #: Outcomes the database did not take, while their leases are asked about (_settle)
        self._rechecks: set[asyncio.Task[None]] = set()
        #: The completer's writes and shutdown's last one, one at a time: shutdown never
        #: releases a lease whose outcome is being written (the release could win). The
        #: producer's cycles have ended by then (shutdown waits for them first).
        self._flush_lock = asyncio.Lock()
        #: The producer's calls under way (at most ``_max_claims_in_flight``), the slots their
        #: claims have reserved, whether the last claim came back full (a backlog), and when a
        #: failed call may be retried.
        self._cycles: set[asyncio.Task[None]] = set()
        self._max_claims_in_flight = 2 if 2 * self.claim_batch <= concurrency else 1
        self._reserved = 0
        self._backlog = False
        #: Told of new work (NOTIFY, poll, LISTEN reconnected) since the last claim started: a
        #: call that ends with it set is followed by another claim.
        self._new_work = True
        self._backoff = 0.1
        self._retry_at = 0.0
        self._cycle_error: Exception | None = None
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.pool: asyncpg.Pool | None = None
        self.url: str | None = None
        self.processed = 0
        # Metric children looked up once, not per message.
        self._turn_duration = metrics.TURN_DURATION.labels(handler.name)
        self._completed_done = metrics.MESSAGES_COMPLETED.labels("done")
        #: The durations of the turns ended since the last _record_turns, which puts them in
        #: the metrics a batch at a time (metrics.observe_many).
        self._turns_ended: list[float] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler)."""
        self._stopping.set()
        self._wakeup.set()

    async def run(self) -> None:
        self.url = await resolve_url(self.settings)
        started = False
        try:
            self.pool = await self._despite_outages("connecting to the database", self._open_pool)
            await self._despite_outages(f"starting the {self.handler.name} handler",
                                        self.handler.start)
            started = True
            await self._despite_outages("registering", self._register)
            await self._fill_pool()
        except _Stopped:  # asked to stop before the database let us in: nothing was claimed
            if started:
                await self.handler.close()
            if self.pool is not None:
                await close_pool(self.pool)
            return
        metrics.WORKER_UP.inc()
        if self.on_ready is not None:
            self.on_ready()
        log.info(
            "worker %s started: concurrency=%d handler=%s poll_only=%s",
            self.worker_id,
            self.concurrency,
            self.handler.name,
            self.poll_only,
        )
        self._tasks = [
            asyncio.create_task(self._complete_loop(), name="completer"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
        ]
        if not self.poll_only:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="listener"))
            self._tasks.append(asyncio.create_task(self._repair_loop(), name="repairer"))
        try:
            await self._produce_loop()
        finally:
            await self._shutdown()

    async def _despite_outages(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """``step()``, tried again with backoff while the database is away (down, restarting,
        at its connection limit) instead of exiting: a starved fleet slows down rather than
        crash-looping, and a replacement started while PostgreSQL restarts waits for it. A
        failed handler start leaves nothing open (the Handler protocol), so it can be retried.
        Raises :class:`_Stopped` when asked to stop while waiting."""
        attempt = 0
        while True:
            try:
                return await step()
            except TRANSIENT as exc:
                if self._stopping.is_set():
                    raise _Stopped from exc
                attempt += 1
                delay = retry_delay(attempt, 0.2, 5.0)
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
                await self._sleep(delay)

    async def _open_pool(self) -> asyncpg.Pool:
        # No session reset on release: the queue's statements and Lease.transaction() leave
        # no session state, and the reset's round trip sat on every claim. Connections are
        # kept while idle and opened ahead of need (_fill_pool), not in the middle of a burst.
        # No statement of the worker's may take longer than a lease (none needs to: claims and
        # heartbeats never wait for a lock, a finish skips busy sessions): a connection the
        # network dropped without a word (a failover, a NAT's expired entry) otherwise held a
        # call, and with it the worker's claims, until TCP gave up.
        pool = await create_pool(
            self.settings, "fleet-worker", url=self.url, min_size=1, max_size=POOL_SIZE,
            reset_sessions=False, keep_idle=True, command_timeout=self.lease_seconds,
        )
        try:
            await _require_read_committed(pool)
        except BaseException:
            await close_pool(pool)
            raise
        return pool

    async def _fill_pool(self) -> None:
        """Open the pool's other connections before the first claim, as far as the database
        allows. A pool that grows under load opens its next connection in the middle of a
        burst, and the claims queued behind it waited for a new backend (connect, codecs, the
        functions' first plans): in the queue bench's sustained phase each such moment showed
        as 100-300 messages claimed 15-40 ms late, enough to double the p99 (BENCHMARKS.md).
        A database at its connection limit leaves the pool smaller; it grows on demand later,
        as before. Done after the handler has its own pools, so it cannot starve them."""
        assert self.pool is not None
        held: list[asyncpg.Connection] = []
        try:
            while len(held) < POOL_SIZE:
                held.append(await self.pool.acquire())
        except TRANSIENT as exc:
            log.info("worker pool opened %d of %d connections for now (%s)",
                     len(held), POOL_SIZE, exc)
        finally:
            for conn in held:
                await self.pool.release(conn)

    async def _register(self) -> None:
        """This worker's row in ``fleet.workers``."""
        await self.pool.execute(
            SQL["worker_register"],
            self.worker_id,
            socket.gethostname(),
            os.getpid(),
            self.concurrency,
            self.handler.name,
        )

    async def _shutdown(self) -> None:
        grace = self.settings.fleet_shutdown_grace
        if self._cycles:  # claims under way: their messages are drained with the rest
            await asyncio.gather(*self._cycles, return_exceptions=True)
        if self.in_flight:
            log.info("draining %d in-flight messages (grace %.0fs)", len(self.in_flight), grace)
            tasks = [f.task for f in self.in_flight.values()]
            _, still_running = await asyncio.wait(tasks, timeout=grace)
            for task in still_running:
                task.cancel()
            if still_running:
                await asyncio.wait(still_running)
        self._record_turns()
        await self._flush_outcomes()
        deadline = time.monotonic() + grace
        while (self._pending or self._rechecks) and time.monotonic() < deadline:  # (_settle)
            if self._rechecks:
                await asyncio.wait(set(self._rechecks), timeout=max(deadline - time.monotonic(), 0))
            await self._flush_outcomes()
        leftover = dict(self.held)
        if leftover:
            try:
                released = await queue.release(self.pool, leftover.items())
                log.info("released %d messages back to the queue", len(released))
            except TRANSIENT as exc:
                log.warning(
                    "could not release %d messages (%s); their leases will expire",
                    len(leftover),
                    exc,
                )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        metrics.WORKER_UP.dec()
        try:
            await self.pool.execute(SQL["worker_unregister"], self.worker_id)
        except TRANSIENT:
            pass
        await self.handler.close()
        await close_pool(self.pool)
        log.info("worker %s stopped after %d messages", self.worker_id, self.processed)

    # -- producer ----------------------------------------------------------------------------

    async def _produce_loop(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()
            if self._cycle_error is not None:
                raise self._cycle_error
            self._start_cycles()
            if self.drain:
                # Decide on what the claims under way find: exit once one found nothing and
                # nothing is left anywhere (other workers' messages, retries not yet due).
                if self._cycles:
                    await asyncio.wait(set(self._cycles), return_when=asyncio.FIRST_COMPLETED)
                if self._idle() and not await queue.has_unfinished_work(self.pool):
                    log.info("queue drained")
                    return
                if self._wakeup.is_set():
                    continue
            await self._wait_for_work()

    def _start_cycles(self) -> None:
        """Start the cycles there is room and reason for. One runs whenever there are free
        slots or outcomes to write. A second runs beside it, when the claim batch leaves slots
        for it, while a backlog is being drained (the last claim came back full) or when new
        work is announced (a NOTIFY, the poll) during the first call: that call's claim may
        have started before the new message committed, and waiting for it to end before
        claiming again put a whole call's time (2-3 ms here) on the message's enqueue-to-claim
        latency. Slots are reserved when a claim starts, so no more than ``concurrency``
        handlers ever run.

        Told of new work with both calls under way, it looks again when one ends
        (``_new_work`` still set). An outcome needs no such care: the next call carries
        whatever is pending."""
        self._record_turns()
        while time.monotonic() >= self._retry_at:
            free = min(self.concurrency - len(self.in_flight) - self._reserved, self.claim_batch)
            free = max(free, 0)
            if not free and not self._pending:
                break
            if self._cycles and (
                len(self._cycles) >= self._max_claims_in_flight
                or not (free and (self._backlog or self._new_work))
            ):
                break
            self._reserved += free
            self._cycles.add(asyncio.create_task(self._cycle(free), name="claim"))
            if not free:
                break
            self._new_work = False  # this claim sees it

    async def _cycle(self, free: int) -> None:
        """One call: write the outcomes so far and claim ``free`` messages, start their
        handlers. A transient failure (the database away) retries with backoff; anything
        else is handed to the producer loop, which stops the worker with it."""
        try:
            claimed = await self._finish_and_claim(free)
        except TRANSIENT as exc:
            log.warning("claim failed (%s); retrying in %.1fs", exc, self._backoff)
            self._retry_at = time.monotonic() + self._backoff
            asyncio.get_running_loop().call_later(self._backoff, self._wakeup.set)
            self._backoff = min(self._backoff * 2, 5.0)
            return
        except Exception as exc:
            self._cycle_error = exc
            self._wakeup.set()
            return
        finally:
            self._reserved -= free
            self._cycles.discard(asyncio.current_task())  # type: ignore[arg-type]
        self._backoff = 0.1
        self._start_batch(claimed)
        # A full batch: there may be more, claim again at once (the call runs while the
        # handlers just started do, and carries the outcomes they produce meanwhile).
        self._backlog = free > 0 and len(claimed) == free
        if self._backlog or self._pending or self._new_work:
            self._wakeup.set()

    def _record_turns(self) -> None:
        """The turns that ended since the last call, into the metrics. A turn's end wakes the
        producer, which calls this first thing (``_start_cycles``), so they are recorded
        within one turn of its event loop; shutdown records the last ones."""
        if self._turns_ended:
            ended, self._turns_ended = self._turns_ended, []
            metrics.observe_many(self._turn_duration, ended)
            metrics.IN_FLIGHT.dec(len(ended))

    def _idle(self) -> bool:
        """Nothing claimed, running or to write, and the last claim found the queue empty."""
        return not (
            self._cycles
            or self.in_flight
            or self._pending
            or self._rechecks
            or self._backlog
            or time.monotonic() < self._retry_at
        )

    async def _finish_and_claim(self, free: int) -> list[ClaimedMessage]:
        """One cycle's call: the outcomes written so far and a claim for the free slots, in
        one statement and one commit (``fleet.finish_and_claim``) instead of two; the claim
        sees the successors the finish promoted. Without free slots only the outcomes are
        written. Outcomes that could not be written go back to the pending list."""
        batch, self._pending = self._pending, []
        try:
            accepted, claimed = await self._write_outcomes(batch, free)
        except BaseException:
            self._pending = batch + self._pending
            raise
        self._settle(batch, accepted)
        return claimed

    async def _write_outcomes(
        self, batch: list[Outcome], free: int
    ) -> tuple[set[int], list[ClaimedMessage]]:
        """Write ``batch`` and claim up to ``free`` messages. A batch without audit trails
        (every no-op handler's) is one statement. Outcomes with one (an agent's reply and its
        ``message_sent``) are written in a transaction with the trails of those accepted under
        their leases, so a reply and its row commit together: BEGIN, the statement, the rows in
        a savepoint, COMMIT, round trips that are nothing next to an agent turn."""
        if not any(outcome.trail for outcome in batch):
            return await self._finish_and_claim_on(self.pool, batch, free)
        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            accepted, claimed = await self._finish_and_claim_on(conn, batch, free)
            await audit.write_with_outcomes(
                conn,
                [o.trail for o in batch if o.trail is not None and o.message_id in accepted],
            )
        return accepted, claimed

    async def _finish_and_claim_on(
        self, db: queue.Executor, batch: list[Outcome], free: int
    ) -> tuple[set[int], list[ClaimedMessage]]:
        if free > 0:
            tools, skills = self._capabilities()
            return await queue.finish_and_claim(
                db, self.worker_id, free, self.lease_seconds, batch, tools=tools, skills=skills
            )
        return await queue.finish(db, batch), []

    def _capabilities(self) -> tuple[list[str] | None, list[str] | None]:
        """The MCP tools and skills the handler has: only messages for agents within them are
        claimed (``fleet.servable_agents``). A handler without ``capabilities`` serves any."""
        capabilities = getattr(self.handler, "capabilities", None)
        if capabilities is None:
            return None, None
        tools, skills = capabilities()
        return list(tools), list(skills)

    async def _run_child(self, parent_id: int, message_id: int) -> bool:
        """Claim one given message (a delegation's child turn) and run it for the calling
        (parent's) task, outside the slot count, through the normal path: its lease is
        heartbeated, its outcome goes through the completer, a failure is retried or dead. It
        is in flight like any message, so cancelling it stops it; cancelling the parent stops
        it too (:meth:`_stop_cancelled`), and a parent stopped where it is (lost lease,
        shutdown) takes the child down with it and gives its lease back. False if it was not
        claimable (another worker has it, or its retry is not due yet)."""
        message = await queue.claim_message(
            self.pool, self.worker_id, message_id, self.lease_seconds
        )
        if message is None:
            return False
        metrics.MESSAGES_CLAIMED.inc()
        metrics.IN_FLIGHT.inc()
        task = self._launch(message)
        self._children.setdefault(parent_id, set()).add(message.id)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            [ended] = await asyncio.gather(task, return_exceptions=True)
            # Stopped where it was (nothing written for it): give the message back now. Had it
            # ended on its own (an outcome queued), the completer owns its lease.
            if isinstance(ended, asyncio.CancelledError) and self.held.pop(message.id, None):
                try:
                    await queue.release(self.pool, [(message.id, message.lease_token)])
                except TRANSIENT as exc:  # its lease will expire instead
                    log.warning("message %d: could not release (%s)", message.id, exc)
            raise
        finally:
            children = self._children.get(parent_id)
            if children is not None:
                children.discard(message.id)
                if not children:
                    self._children.pop(parent_id, None)
        return True

    def _lease(self, message: ClaimedMessage) -> Lease:
        # Delegations run their child turns inline (fleet.delegation).
        return Lease(message, self.pool, run_inline=functools.partial(self._run_child, message.id))

    async def _wait_for_work(self) -> None:
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=self.poll_interval)
        except TimeoutError:
            metrics.WAKEUPS.labels("poll").inc()
            self._new_work = True

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    def _start_batch(self, claimed: list[ClaimedMessage]) -> None:
        """Start a handler task per claimed message (counters updated once per batch)."""
        if not claimed:
            return
        metrics.MESSAGES_CLAIMED.inc(len(claimed))
        metrics.IN_FLIGHT.inc(len(claimed))
        metrics.observe_many(
            metrics.QUEUE_WAIT,
            [max((m.claimed_at - m.enqueued_at).total_seconds(), 0.0) for m in claimed],
        )
        for message in claimed:
            self._launch(message)

    def _launch(self, message: ClaimedMessage) -> asyncio.Task[None]:
        """Hold the message's lease (the heartbeat keeps it) and run its handler in a task."""
        self.held[message.id] = message.lease_token
        lease = self._lease(message)
        task = asyncio.create_task(self._execute(message, lease), name=f"message-{message.id}")
        self.in_flight[message.id] = _InFlight(message, task, lease)
        return task

    # -- executor ----------------------------------------------------------------------------

    async def _handle(self, message: ClaimedMessage, lease: Lease) -> Reply | Parked:
        if not tracing.enabled():  # no span machinery per message when tracing is off
            return await self.handler.handle(message, lease)
        with tracing.span(
            "fleet.turn",
            **{
                "fleet.message_id": message.id,
                "fleet.session_id": message.session_id,
                "fleet.attempt": message.attempts,
                "fleet.handler": self.handler.name,
            },
        ):
            return await self.handler.handle(message, lease)

    async def _execute(self, message: ClaimedMessage, lease: Lease) -> None:
        started = time.monotonic()
        try:
            result = await self._handle(message, lease)
            if isinstance(result, Reply):
                self._queue_outcome(
                    Outcome(
                        message_id=message.id,
                        lease_token=message.lease_token,
                        state="done",
                        reply=result.text,
                        trail=result.trail,
                    )
                )
            elif isinstance(result, Parked):
                self.held.pop(message.id, None)
                metrics.MESSAGES_COMPLETED.labels("awaiting_approval").inc()
            else:
                raise TypeError(f"handler returned {type(result).__name__}, not Reply or Parked")
        except TurnCancelled as exc:
            # Someone cancelled this message; the handler stopped before its next step.
            self._finish_cancelled(message, str(exc))
        except asyncio.CancelledError:
            if message.id in self._cancelling:
                # Someone cancelled this message; its task was stopped where it was.
                self._finish_cancelled(message, "interrupted")
                return
            # Shutdown past the grace period or a lost lease: the message is released (or is
            # already someone else's). Nothing to write.
            raise
        except LeaseLost as exc:
            metrics.LEASES_LOST.inc()
            self.held.pop(message.id, None)
            log.warning("message %d: %s", message.id, exc)
        except Exception as exc:  # a failed attempt, whatever the handler raised
            await self._fail(message, exc)
        finally:
            self._turns_ended.append(time.monotonic() - started)
            self.in_flight.pop(message.id, None)
            self._cancelling.pop(message.id, None)
            self.processed += 1
            self._wakeup.set()

    def _finish_cancelled(self, message: ClaimedMessage, how: str) -> None:
        self._cancelling.pop(message.id, None)
        log.info("message %d cancelled while running (%s)", message.id, how)
        flight = self.in_flight.get(message.id)
        reason = flight.lease.cancel_reason if flight is not None else None
        self._queue_outcome(
            Outcome(
                message_id=message.id,
                lease_token=message.lease_token,
                state="cancelled",
                error="cancelled while running" + (f": {reason}" if reason else ""),
            )
        )

    async def _fail(self, message: ClaimedMessage, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        final = isinstance(exc, PermanentHandlerError) or message.attempts >= message.max_attempts
        if final:
            log.warning(
                "message %d dead after %d attempts: %s", message.id, message.attempts, error
            )
            self._queue_outcome(
                Outcome(
                    message_id=message.id,
                    lease_token=message.lease_token,
                    state="dead",
                    error=error,
                )
            )
            return
        delay = retry_delay(
            message.attempts,
            self.settings.fleet_retry_base_seconds,
            self.settings.fleet_retry_max_seconds,
        )
        log.info(
            "message %d attempt %d failed (%s); retry in %.2fs",
            message.id,
            message.attempts,
            error,
            delay,
        )
        try:
            await queue.retry(self.pool, message.id, message.lease_token, error, delay)
            metrics.MESSAGE_RETRIES.inc()
            # Nobody NOTIFYs when a retry falls due: look then, not at the next poll.
            asyncio.get_running_loop().call_later(delay + 0.01, self._told_of_work, "retry")
        except TRANSIENT as exc2:
            log.warning(
                "message %d: could not schedule retry (%s); lease will expire", message.id, exc2
            )
        self.held.pop(message.id, None)

    # -- completer ---------------------------------------------------------------------------

    def _queue_outcome(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._pending_event.set()
        self._wakeup.set()  # the producer writes it with its next claim

    async def _complete_loop(self) -> None:
        """Writes outcomes the producer will not: while stopping (no more claims) or with no
        slot free (nothing to claim). Otherwise the producer, woken by the same outcome,
        writes them in its next ``finish_and_claim``."""
        while True:
            await self._pending_event.wait()
            self._pending_event.clear()
            if not self._stopping.is_set() and len(self.in_flight) < self.concurrency:
                continue
            try:
                await self._flush_outcomes()
            except TRANSIENT as exc:
                log.warning("writing outcomes failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                self._pending_event.set()

    async def _flush_outcomes(self) -> None:
        async with self._flush_lock:
            await self._flush_outcomes_locked()

    async def _flush_outcomes_locked(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            accepted, _ = await self._write_outcomes(batch, 0)
        except BaseException:
            self._pending = batch + self._pending
            raise
        self._settle(batch, accepted)
        self._wakeup.set()  # a successor may have been promoted: claim it

    def _settle(self, batch: list[Outcome], accepted: set[int]) -> None:
        """Account for a written batch. An outcome the database did not take was either
        refused (its lease taken over: fencing) or deferred: its session was locked by another
        head change under way (an enqueue's election at commit), which the finish does not
        wait for (``fleet.finish_messages``). Which one, its lease tells, asked apart from the
        cycle (the messages just claimed start meanwhile)."""
        self._account([o for o in batch if o.message_id in accepted], accepted)
        refused = [o for o in batch if o.message_id not in accepted]
        if refused:
            task = asyncio.create_task(self._recheck(refused), name="recheck")
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)

    async def _recheck(self, refused: list[Outcome]) -> None:
        """Outcomes whose lease is still ours go back to be written again after
        ``DEFERRED_RETRY_SECONDS``; the rest were taken over."""
        leases = [(o.message_id, o.lease_token) for o in refused]
        try:
            held = set(await queue.heartbeat(self.pool, leases, self.lease_seconds))
        except TRANSIENT as exc:  # cannot tell: write them again, fencing decides then
            log.warning("checking %d unwritten outcomes failed (%s)", len(refused), exc)
            held = {o.message_id for o in refused}
        self._account([o for o in refused if o.message_id not in held], set())
        deferred = [o for o in refused if o.message_id in held]
        if deferred:
            log.debug("%d outcomes wait for their sessions' locks", len(deferred))
            metrics.OUTCOMES_DEFERRED.inc(len(deferred))
            await asyncio.sleep(DEFERRED_RETRY_SECONDS)
            for outcome in deferred:
                self._queue_outcome(outcome)

    def _account(self, batch: list[Outcome], accepted: set[int]) -> None:
        """Outcomes written: their leases are no longer held; refused ones were taken over."""
        done = 0
        for outcome in batch:
            self.held.pop(outcome.message_id, None)
            if outcome.message_id not in accepted:
                metrics.LEASES_LOST.inc()
                log.warning(
                    "message %d: outcome refused, the lease was taken over", outcome.message_id
                )
            elif outcome.state == "done":
                done += 1
            else:
                metrics.MESSAGES_COMPLETED.labels(outcome.state).inc()
        if done:
            self._completed_done.inc(done)

    # -- heartbeat ---------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = max(self.lease_seconds / 3, 0.05)
        while True:
            try:
                await asyncio.wait_for(self._heartbeat_now.wait(), timeout=interval)
            except TimeoutError:
                pass
            self._heartbeat_now.clear()
            leases = list(self.held.items())
            if not leases:
                continue
            try:
                kept = await queue.heartbeat(self.pool, leases, self.lease_seconds)
            except TRANSIENT as exc:
                log.warning("heartbeat failed (%s)", exc)
                continue
            for message_id, token in leases:
                flight = self.in_flight.get(message_id)
                reason = kept.get(message_id)
                if reason is not None and flight is not None:
                    self._stop_cancelled(flight, reason)
                    continue
                if message_id in kept or self.held.get(message_id) != token:
                    continue
                self.held.pop(message_id, None)
                metrics.LEASES_LOST.inc()
                flight = self.in_flight.get(message_id)
                if flight is not None:
                    log.warning("message %d: lease lost; stopping its handler", message_id)
                    flight.task.cancel()

    def _stop_cancelled(self, flight: _InFlight, reason: str) -> None:
        """Someone asked to cancel this running message (seen by a heartbeat), for ``reason``."""
        message_id = flight.message.id
        for child_id in list(self._children.get(message_id, ())):
            child = self.in_flight.get(child_id)
            if child is not None:  # the parent waits on it: it stops first
                self._stop_cancelled(child, reason)
        first_seen = self._cancelling.get(message_id)
        if first_seen is None:
            self._cancelling[message_id] = time.monotonic()
            flight.lease.cancel_reason = reason
            flight.lease.cancel_requested.set()
            if not getattr(self.handler, "stops_on_cancel_request", False):
                flight.task.cancel()
            return
        if time.monotonic() - first_seen > self.lease_seconds and not flight.task.done():
            # A step that does not end (a hung call): stop the task where it is.
            log.warning("message %d: cancelled turn still running; interrupting it", message_id)
            flight.task.cancel()

    # -- maintenance -------------------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        last_repair = last_seen = 0.0
        # The full scan reads every waiting message. A listening worker hears each session
        # that needs a look (fleet_repair), so the scan only catches what no worker heard; a
        # --poll-only worker hears nothing, so it scans as often as it used to.
        full_repair_every = POLL_ONLY_REPAIR_INTERVAL if self.poll_only else FULL_REPAIR_INTERVAL
        while True:
            try:
                rescued = await queue.rescue_expired(self.pool)
                if rescued:
                    metrics.LEASE_TAKEOVERS.inc(len(rescued))
                    log.warning("took over %d messages with expired leases", len(rescued))
                    self._wakeup.set()
                now = time.monotonic()
                if now - last_seen > 10:
                    await self.pool.execute(SQL["worker_seen"], self.worker_id)
                    await self.pool.execute(SQL["workers_prune"], 300.0)
                    last_seen = now
                if now - last_repair > full_repair_every:
                    if await queue.repair_heads(self.pool):
                        self._wakeup.set()
                    last_repair = now
                # Undecided approvals past their TTL are rejected and their messages unparked
                # (one indexed read when nothing is overdue).
                if await approvals.expire_overdue(self.pool):
                    self._wakeup.set()
            except TRANSIENT as exc:
                log.warning("maintenance failed (%s)", exc)
            await asyncio.sleep(min(self.poll_interval, self.lease_seconds / 2))

    # -- listener ----------------------------------------------------------------------------

    def _on_notify(self, *_: object) -> None:
        self._told_of_work("notify")

    def _told_of_work(self, source: str) -> None:
        """Work may be claimable (a NOTIFY, a retry falling due): claim again now."""
        metrics.WAKEUPS.labels(source).inc()
        self._new_work = True
        self._wakeup.set()

    def _on_repair_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        """A session whose enqueue left its head election to the workers: look at it now."""
        if payload:
            self._to_repair.add(payload)
            self._repair_due.set()

    async def _repair_loop(self) -> None:
        """Give the sessions ``fleet_repair`` named a head if they have none (every listening
        worker hears each one; all but the first find the session headed without locking it,
        ``fleet.repair_sessions``). Those a failed call did not repair are tried again after a
        poll interval."""
        while True:
            await self._repair_due.wait()
            self._repair_due.clear()
            sessions, self._to_repair = self._to_repair, set()
            try:
                if await queue.repair_sessions(self.pool, sorted(sessions)):
                    self._wakeup.set()
            except TRANSIENT as exc:
                log.warning("repairing %d sessions failed (%s)", len(sessions), exc)
                self._to_repair |= sessions
                await asyncio.sleep(self.poll_interval)
                self._repair_due.set()

    def _on_cancel_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        """A running message was asked to stop: if it is ours, heartbeat now (the heartbeat
        reads the request from the database, so a stray NOTIFY cancels nothing)."""
        try:
            message_id = int(payload)
        except ValueError:
            return
        if message_id in self.in_flight:
            self._heartbeat_now.set()

    async def _listen_loop(self) -> None:
        backoff = 0.2
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self.settings, "fleet-listener", url=self.url)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(queue.WAKEUP_CHANNEL, self._on_notify)
                await conn.add_listener(CANCEL_CHANNEL, self._on_cancel_notify)
                await conn.add_listener(queue.REPAIR_CHANNEL, self._on_repair_notify)
                backoff = 0.2
                self._new_work = True  # NOTIFYs sent while we were away are gone: look once
                self._wakeup.set()
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), timeout=5.0)
                    except TimeoutError:
                        await conn.fetchval("SELECT 1", timeout=5.0)  # detects a dead socket
            except asyncio.CancelledError:
                raise
            except TRANSIENT as exc:
                log.warning("LISTEN connection lost (%s); reconnecting in %.1fs", exc, backoff)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
