"""Prometheus metrics of every fleet process.

Names follow Prometheus conventions: prefix ``fleet_``, base units, ``_total`` for counters,
``_seconds`` for durations, and no ids as labels. ``fleet up`` runs its children in multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR`` is set before this module is imported) and serves one endpoint
for all of them; ``fleet worker --metrics-port`` serves its own process. Gauges derived from the
database (queue depth, oldest age, live workers, pending approvals) are computed at scrape time by
:class:`QueueCollector`, in one process only, never by every worker.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)

MESSAGES_ENQUEUED = Counter(
    "fleet_messages_enqueued_total", "Messages enqueued through the fleet's own client and CLI"
)
MESSAGES_CLAIMED = Counter("fleet_messages_claimed_total", "Messages claimed by workers")
MESSAGES_COMPLETED = Counter(
    "fleet_messages_completed_total", "Messages finished by workers, by outcome", ["outcome"]
)
MESSAGE_RETRIES = Counter("fleet_message_retries_total", "Failed attempts put back for a retry")
LEASE_TAKEOVERS = Counter(
    "fleet_lease_takeovers_total", "Messages rescued from a worker whose lease expired"
)
LEASES_LOST = Counter("fleet_leases_lost_total", "Leases this worker found taken over")
WAKEUPS = Counter("fleet_wakeups_total", "Producer wake-ups, by source", ["source"])
QUEUE_WAIT = Histogram("fleet_queue_wait_seconds", "Enqueue to claim", buckets=_LATENCY_BUCKETS)
TURN_DURATION = Histogram(
    "fleet_turn_duration_seconds",
    "Claim to outcome of one handler run",
    ["handler"],
    buckets=_LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "fleet_in_flight_turns", "Messages being handled right now", multiprocess_mode="livesum"
)
WORKER_UP = Gauge("fleet_worker_processes", "Worker processes running", multiprocess_mode="livesum")
