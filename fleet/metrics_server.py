"""Serving metrics: the database-derived collector and the per-process endpoint.

:class:`QueueCollector` reads queue depth, oldest ages, live workers and approvals from the
database at scrape time. It is registered in exactly one process per host (``fleet up``'s
supervisor, or a lone ``fleet worker --metrics-port``), so N workers do not run N copies of the
same queries. Several hosts each report the same global numbers: dashboards aggregate them with
``max``, never ``sum``.

``fleet status`` prints the same :class:`QueueSnapshot` (:func:`read_snapshot`), so the terminal
and the dashboard cannot disagree about what they count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Generic, TypeVar

import asyncpg
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import BaseModel

from fleet.errors import ConfigurationError
from fleet.settings import Settings
from fleet.sql import queries

log = logging.getLogger("fleet.metrics")
T = TypeVar("T")
SQL = queries("queries.sql")
METRICS_SQL = queries("metrics.sql")

#: A worker counts as alive when it was seen within this many seconds (it checks in every 10 s).
LIVE_WORKER_SECONDS = 60.0
#: Buckets of ``fleet_approval_decision_seconds``: a minute to a day, the human time scale.
APPROVAL_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 86_400.0)
#: A scrape must answer even when the database does not.
SCRAPE_TIMEOUT_SECONDS = 5.0
#: Two reads behind the endpoint grow with the history: counting finished messages (125 ms at
#: a million, 377 ms of two cores at 3 million) and binning every decided approval (67 ms at
#: 100,000, 196 ms at 300,000; bench/queue_probes.py history-reads). The collector repeats one
#: that took over HISTORY_READ_FREE_SECONDS only once HISTORY_READ_FACTOR times its duration
#: has passed (at most about 2% of the time, however long the history); a cheaper one, at
#: every scrape. Everything else, at every scrape.
HISTORY_READ_FREE_SECONDS = 0.25
HISTORY_READ_FACTOR = 50.0


class StateCount(BaseModel):
    count: int
    oldest_age_seconds: float


class ApprovalDecisions(BaseModel):
    """Decisions of one kind (approved, rejected, expired, cancelled) and how long they took."""

    count: int
    seconds_sum: float
    buckets: list[int]


class QueueSnapshot(BaseModel):
    """What the fleet looks like right now, read in one go from the database."""

    states: dict[str, StateCount]
    oldest_ready_age_seconds: float
    live_workers: list[dict[str, object]]
    approvals_pending: int
    approvals_oldest_pending_age_seconds: float
    approvals_decided: dict[str, ApprovalDecisions]


async def read_snapshot(
    conn: asyncpg.Connection,
    finished: Mapping[str, Mapping[str, float]] | None = None,
    decided: dict[str, ApprovalDecisions] | None = None,
) -> QueueSnapshot:
    """Counts per state, oldest ages, live workers and approvals (one connection, a few reads).
    ``finished`` and ``decided``: the two reads of history (finished messages per state,
    decisions made) as already read, on the collector's budget; else they are read now."""
    from fleet import queue

    if finished is None:
        finished = await queue.finished_state_counts(conn)
    counts = {**await queue.live_state_counts(conn), **finished}
    states = {
        state: StateCount(
            count=int(counts.get(state, {}).get("count", 0)),
            oldest_age_seconds=float(counts.get(state, {}).get("oldest_age_seconds") or 0.0),
        )
        for state in queue.MESSAGE_STATES
    }
    workers = await conn.fetch(SQL["live_workers"], LIVE_WORKER_SECONDS)
    pending, oldest_pending = 0, 0.0
    if await conn.fetchval(METRICS_SQL["approvals_table_exists"]):
        row = await conn.fetchrow(METRICS_SQL["approvals_pending"])
        pending, oldest_pending = int(row["n"]), float(row["oldest_age"])
        if decided is None:
            decided = await _decisions(conn)
    return QueueSnapshot(
        states=states,
        oldest_ready_age_seconds=float(await queue.oldest_queued_age(conn)),
        live_workers=[dict(w) for w in workers],
        approvals_pending=pending,
        approvals_oldest_pending_age_seconds=oldest_pending,
        approvals_decided=decided or {},
    )


async def read_decisions(conn: asyncpg.Connection) -> dict[str, ApprovalDecisions]:
    """Every decision ever made, by kind, with its time-to-decision histogram (none before
    the system-of-record migration creates run_states)."""
    if not await conn.fetchval(METRICS_SQL["approvals_table_exists"]):
        return {}
    return await _decisions(conn)


async def _decisions(conn: asyncpg.Connection) -> dict[str, ApprovalDecisions]:
    """The histogram itself (run_states known to exist)."""
    return {
        row["kind"]: ApprovalDecisions(
            count=row["n"], seconds_sum=row["seconds_sum"], buckets=list(row["buckets"])
        )
        for row in await conn.fetch(METRICS_SQL["approvals_decided"], list(APPROVAL_BUCKETS))
    }


def snapshot_metrics(snapshot: QueueSnapshot) -> list[Metric]:
    """The snapshot as Prometheus metric families."""
    depth = GaugeMetricFamily("fleet_queue_messages", "Messages per state", labels=["state"])
    age = GaugeMetricFamily(
        "fleet_queue_oldest_age_seconds",
        "Age of the oldest message per state (since it was enqueued)",
        labels=["state"],
    )
    for state, entry in snapshot.states.items():
        depth.add_metric([state], entry.count)
        age.add_metric([state], entry.oldest_age_seconds)
    decided = CounterMetricFamily(
        "fleet_approvals_decided",
        "Approvals decided, by decision (approved, rejected, expired, cancelled)",
        labels=["decision"],
    )
    wait = HistogramMetricFamily(
        "fleet_approval_decision_seconds",
        "Time from an approval request to its decision",
        labels=["decision"],
    )
    for kind in ("approved", "rejected", "expired", "cancelled"):
        entry = snapshot.approvals_decided.get(
            kind, ApprovalDecisions(count=0, seconds_sum=0.0, buckets=[0] * len(APPROVAL_BUCKETS))
        )
        decided.add_metric([kind], entry.count)
        buckets = [
            (f"{bound:g}", count)
            for bound, count in zip(APPROVAL_BUCKETS, entry.buckets, strict=True)
        ]
        wait.add_metric([kind], [*buckets, ("+Inf", entry.count)], entry.seconds_sum)
    return [
        depth,
        age,
        GaugeMetricFamily(
            "fleet_queue_oldest_ready_age_seconds",
            "Age of the oldest message that is due and waiting for a worker",
            value=snapshot.oldest_ready_age_seconds,
        ),
        GaugeMetricFamily(
            "fleet_workers_alive",
            f"Workers that checked in within the last {LIVE_WORKER_SECONDS:g} s, on any host",
            value=len(snapshot.live_workers),
        ),
        GaugeMetricFamily(
            "fleet_approvals_pending",
            "Parked runs awaiting a human",
            value=snapshot.approvals_pending,
        ),
        GaugeMetricFamily(
            "fleet_approvals_oldest_pending_age_seconds",
            "Age of the oldest undecided approval",
            value=snapshot.approvals_oldest_pending_age_seconds,
        ),
        decided,
        wait,
    ]


class HistoryRead(Generic[T]):
    """One of the collector's reads of history, repeated on a budget (HISTORY_READ_FACTOR):
    between reads the collector exports the value as last read."""

    def __init__(self, read: Callable[[asyncpg.Connection], Awaitable[T]]) -> None:
        self._read = read
        self._value: T | None = None
        self._read_at = 0.0
        #: monotonic time from which the next call reads again
        self.due = 0.0

    async def current(self, conn: asyncpg.Connection) -> tuple[T, float]:
        """The value, read now or earlier, and how many seconds ago it was read."""
        started = time.monotonic()
        if self._value is None or started >= self.due:
            self._value = await self._read(conn)
            self._read_at = time.monotonic()
            took = self._read_at - started
            self.due = self._read_at + (
                HISTORY_READ_FACTOR * took if took > HISTORY_READ_FREE_SECONDS else 0.0)
        return self._value, time.monotonic() - self._read_at


class QueueCollector(Collector):
    """Gauges computed from the database when Prometheus scrapes.

    ``collect`` runs in the HTTP server's thread, so it opens its own event loop and connection;
    a failed read yields ``fleet_queue_collector_up 0`` (alertable) instead of breaking the
    endpoint that also carries the workers' own metrics.
    """

    def __init__(self, settings: Settings, url: str) -> None:
        from fleet import queue

        self.settings = settings
        self.url = url
        self.finished = HistoryRead(queue.finished_state_counts)
        self.decided = HistoryRead(read_decisions)

    def describe(self) -> list[Metric]:
        # Registering must not query the database (it may run inside the worker's event loop).
        return []

    async def _read(self) -> QueueSnapshot:
        from fleet.database import connect

        conn = await connect(self.settings, "fleet-metrics", url=self.url)
        try:
            finished, age = await self.finished.current(conn)
            decided, _ = await self.decided.current(conn)
            # The counts stand as read; their oldest messages have aged since.
            finished = {
                state: {**entry, "oldest_age_seconds": entry["oldest_age_seconds"] + age}
                for state, entry in finished.items()
            }
            return await read_snapshot(conn, finished=finished, decided=decided)
        finally:
            await conn.close()

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        try:
            snapshot = asyncio.run(asyncio.wait_for(self._read(), SCRAPE_TIMEOUT_SECONDS))
        except Exception as exc:  # a scrape must not crash the endpoint
            log.warning("queue metrics unavailable: %s", exc)
            snapshot = None
        if snapshot is not None:
            yield from snapshot_metrics(snapshot)
        yield GaugeMetricFamily(
            "fleet_queue_collector_up",
            "1 when the database-derived metrics could be read at this scrape",
            value=1 if snapshot is not None else 0,
        )
        yield GaugeMetricFamily(
            "fleet_queue_collector_duration_seconds",
            "Time spent reading the database-derived metrics",
            value=time.monotonic() - started,
        )


def prune_dead_processes(path: str) -> list[int]:
    """Drop the live gauges of processes that are gone (``mark_process_dead`` for each).

    Workers started by systemd or by hand share ``PROMETHEUS_MULTIPROC_DIR`` on one host with
    no supervisor to report their exits; without this, a crashed worker would stay counted in
    ``fleet_worker_processes`` and ``fleet_in_flight_turns`` forever. Counters of dead processes
    are kept on purpose: a restart must not make a counter go down.
    """
    from prometheus_client import multiprocess

    dead: set[int] = set()
    for file in Path(path).glob("gauge_live*_*.db"):
        try:
            pid = int(file.stem.rsplit("_", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            dead.add(pid)
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)
    return sorted(dead)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def multiprocess_registry(path: str, settings: Settings, url: str | None) -> CollectorRegistry:
    """One registry for every process writing to ``path``, plus the queue gauges when ``url``."""
    from prometheus_client.multiprocess import MultiProcessCollector

    class PruningCollector(MultiProcessCollector):
        def collect(self) -> Iterable[Metric]:
            prune_dead_processes(path)
            return super().collect()

    registry = CollectorRegistry()
    PruningCollector(registry, path=path)
    if url is not None:
        registry.register(QueueCollector(settings, url))
    return registry


def listen(port: int, host: str, registry: CollectorRegistry | None = None) -> None:
    """Serve ``registry`` (default: this process's) at ``host:port/metrics`` in a thread. A port
    that cannot be had is a :class:`ConfigurationError` naming it, not an error that reads as
    if the database were away."""
    from prometheus_client import REGISTRY, start_http_server

    try:
        start_http_server(port, addr=host, registry=registry or REGISTRY)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}"
        ) from exc


def serve_process_metrics(port: int, settings: Settings, url: str) -> None:
    """``fleet worker --metrics-port``: this process's metrics, plus the queue gauges unless
    ``FLEET_QUEUE_METRICS=false`` (another process exports them: ``fleet metrics serve``)."""
    from prometheus_client import REGISTRY

    if settings.fleet_queue_metrics:
        REGISTRY.register(QueueCollector(settings, url))
    listen(port, settings.fleet_metrics_host)
