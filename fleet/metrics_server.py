"""Serving metrics: the database-derived collector and the per-process endpoint.

:class:`QueueCollector` reads queue depth, oldest ages and live workers from the database at
scrape time. It is registered in exactly one process (``fleet up``'s supervisor, or a lone
``fleet worker --metrics-port``), so N workers do not run N copies of the same queries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleet.settings import Settings
from fleet.sql import queries

log = logging.getLogger("fleet.metrics")
SQL = queries("queries.sql")


class QueueCollector(Collector):
    """Gauges computed from the database when Prometheus scrapes."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        self.url = url

    async def _read(self) -> dict[str, object]:
        from fleet import queue
        from fleet.database import connect

        conn = await connect(self.settings, "fleet-metrics", url=self.url)
        try:
            counts = await queue.state_counts(conn)
            oldest = await queue.oldest_queued_age(conn)
            workers = await conn.fetch(SQL["live_workers"], 60.0)
            pending = 0
            oldest_pending = 0.0
            if await conn.fetchval("SELECT to_regclass('public.run_states') IS NOT NULL"):
                row = await conn.fetchrow(
                    "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(requested_at)),"
                    " 0)::float8 AS age FROM run_states WHERE status = 'awaiting'"
                )
                pending, oldest_pending = row["n"], row["age"]
            return {
                "counts": counts,
                "oldest": oldest,
                "workers": len(workers),
                "pending": pending,
                "oldest_pending": oldest_pending,
            }
        finally:
            await conn.close()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            data = asyncio.run(self._read())
        except Exception as exc:  # a scrape must not crash the endpoint
            log.warning("queue metrics unavailable: %s", exc)
            return
        depth = GaugeMetricFamily("fleet_queue_messages", "Messages per state", labels=["state"])
        age = GaugeMetricFamily(
            "fleet_queue_oldest_age_seconds",
            "Age of the oldest message per state",
            labels=["state"],
        )
        from fleet.queue import MESSAGE_STATES

        counts = data["counts"]
        for state in MESSAGE_STATES:
            entry = counts.get(state, {"count": 0, "oldest_age_seconds": 0.0})
            depth.add_metric([state], entry["count"])
            age.add_metric([state], entry["oldest_age_seconds"] or 0.0)
        yield depth
        yield age
        yield GaugeMetricFamily(
            "fleet_queue_oldest_ready_age_seconds",
            "Age of the oldest message due and waiting for a worker",
            value=data["oldest"],
        )
        yield GaugeMetricFamily(
            "fleet_workers_alive", "Workers seen in the last minute", value=data["workers"]
        )
        yield GaugeMetricFamily(
            "fleet_approvals_pending", "Parked runs awaiting a human", value=data["pending"]
        )
        yield GaugeMetricFamily(
            "fleet_approvals_oldest_pending_age_seconds",
            "Age of the oldest undecided approval",
            value=data["oldest_pending"],
        )


def serve_process_metrics(port: int, settings: Settings, url: str) -> None:
    """``fleet worker --metrics-port``: this process's metrics plus the queue gauges."""
    from prometheus_client import REGISTRY, start_http_server

    REGISTRY.register(QueueCollector(settings, url))
    start_http_server(port, addr="0.0.0.0")
