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
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

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
SQL = queries("queries.sql")
METRICS_SQL = queries("metrics.sql")

#: A worker counts as alive when it was seen within this many seconds (it checks in every 10 s).
LIVE_WORKER_SECONDS = 60.0
#: Buckets of ``fleet_approval_decision_seconds``: a minute to a day, the human time scale.
APPROVAL_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 86_400.0)
#: A scrape must answer even when the database does not.
SCRAPE_TIMEOUT_SECONDS = 5.0
#: Counting finished messages reads every one of them (377 ms of two cores on 3 million, by
#: hand). A count that took longer than FREE_RECOUNT_SECONDS is repeated only once
#: FINISHED_RECOUNT_FACTOR times its duration has passed (at most about 2% of the time, however
#: long the history: every minute or so on tens of millions); a cheaper one, at every scrape.
#: Waiting and running messages are counted at every scrape.
FREE_RECOUNT_SECONDS = 0.25
FINISHED_RECOUNT_FACTOR = 50.0


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
    conn: asyncpg.Connection, finished: Mapping[str, Mapping[str, float]] | None = None
) -> QueueSnapshot:
    """Counts per state, oldest ages, live workers and approvals (one connection, a few reads).
    ``finished``: the finished states' counts as already read (the collector's budget), else
    they are counted now."""
    from fleet import queue

    counts = {**await queue.live_state_counts(conn),
              **(finished if finished is not None else await queue.finished_state_counts(conn))}
    states = {
        state: StateCount(
            count=int(counts.get(state, {}).get("count", 0)),
            oldest_age_seconds=float(counts.get(state, {}).get("oldest_age_seconds") or 0.0),
        )
        for state in queue.MESSAGE_STATES
    }
    workers = await conn.fetch(SQL["live_workers"], LIVE_WORKER_SECONDS)
    pending, oldest_pending = 0, 0.0
    decided: dict[str, ApprovalDecisions] = {}
    if await conn.fetchval(METRICS_SQL["approvals_table_exists"]):
        row = await conn.fetchrow(METRICS_SQL["approvals_pending"])
        pending, oldest_pending = int(row["n"]), float(row["oldest_age"])
        for row in await conn.fetch(METRICS_SQL["approvals_decided"], list(APPROVAL_BUCKETS)):
            decided[row["kind"]] = ApprovalDecisions(
                count=row["n"], seconds_sum=row["seconds_sum"], buckets=list(row["buckets"])
            )
    return QueueSnapshot(
        states=states,
        oldest_ready_age_seconds=float(await queue.oldest_queued_age(conn)),
        live_workers=[dict(w) for w in workers],
        approvals_pending=pending,
        approvals_oldest_pending_age_seconds=oldest_pending,
        approvals_decided=decided,
    )


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


class FinishedCounts:
    """Done, dead and cancelled messages per state for the collector, counted again on a
    budget: a count reads the whole history (FINISHED_RECOUNT_FACTOR). Between counts the
    numbers stand as read and their oldest ages go on growing."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, float]] | None = None
        self._read_at = 0.0
        #: monotonic time from which the next read counts again
        self.due = 0.0

    async def current(self, conn: asyncpg.Connection) -> dict[str, dict[str, float]]:
        from fleet import queue

        started = time.monotonic()
        if self._counts is None or started >= self.due:
            self._counts = await queue.finished_state_counts(conn)
            self._read_at = time.monotonic()
            took = self._read_at - started
            self.due = self._read_at + (
                FINISHED_RECOUNT_FACTOR * took if took > FREE_RECOUNT_SECONDS else 0.0)
        aged = time.monotonic() - self._read_at
        return {state: {**entry, "oldest_age_seconds": entry["oldest_age_seconds"] + aged}
                for state, entry in self._counts.items()}


class QueueCollector(Collector):
    """Gauges computed from the database when Prometheus scrapes.

    ``collect`` runs in the HTTP server's thread, so it opens its own event loop and connection;
    a failed read yields ``fleet_queue_collector_up 0`` (alertable) instead of breaking the
    endpoint that also carries the workers' own metrics.
    """

    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        self.url = url
        self.finished = FinishedCounts()

    def describe(self) -> list[Metric]:
        # Registering must not query the database (it may run inside the worker's event loop).
        return []

    async def _read(self) -> QueueSnapshot:
        from fleet.database import connect

        conn = await connect(self.settings, "fleet-metrics", url=self.url)
        try:
            return await read_snapshot(conn, finished=await self.finished.current(conn))
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
