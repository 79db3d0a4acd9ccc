"""Prometheus metrics of every fleet process.

Names follow Prometheus conventions: prefix ``fleet_``, base units, ``_total`` for counters,
``_seconds`` for durations, and no ids as labels. ``fleet up`` runs its children in multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR`` is set before this module is imported) and serves one endpoint
for all of them; ``fleet worker --metrics-port`` serves its own process. Gauges derived from the
database (queue depth, oldest age, live workers, pending and decided approvals) are computed at
scrape time by :class:`fleet.metrics_server.QueueCollector`, in one process only, never by every
worker.

Every label value that is known in advance is created at import (a zero series). In multiprocess
mode a series nobody touched does not exist at all, and a dashboard or alert whose metric is
missing says "no data" instead of "0": an alert on a missing series never fires.

What the rest of the fleet calls (besides the worker's own counters):

* :func:`record_tool_call` from the MCP client (``fleet.tracing.tool_call`` does it for you);
* :func:`record_model_call` after each model response (``fleet.tracing.TracedModel`` does it);
* ``SKILL_ACTIVATIONS.labels(skill).inc()`` when a skill is loaded;
* ``AUDIT_WRITE_FAILURES.inc()`` when an audit write fails (it is retried, never fatal).
"""

from __future__ import annotations

import bisect
import collections
import os
from collections.abc import Sequence
from pathlib import Path

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

#: Outcomes of a handled message as the worker writes them (``fleet.messages.state``).
OUTCOMES = ("done", "dead", "awaiting_approval")
#: The customer-data MCP server's tools (fixed: a new tool is a reviewed change).
TOOLS = (
    "lookup_customer",
    "find_customer_by_email",
    "lookup_order",
    "find_similar_resolved_tickets",
    "issue_refund",
)
#: Same vocabulary as ``capability_invocations.status``.
TOOL_OUTCOMES = ("ok", "error", "blocked", "timeout")
MODEL_OUTCOMES = ("ok", "error")
TOKEN_DIRECTIONS = ("input", "output")

# -- the queue, as the workers see it ---------------------------------------------------------

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
OUTCOMES_DEFERRED = Counter(
    "fleet_outcomes_deferred_total",
    "Outcomes written again later: their session was locked by another head change (an"
    " enqueue's election at commit), which a finish does not wait for",
)
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

# -- inside a turn ----------------------------------------------------------------------------

TOOL_CALLS = Counter(
    "fleet_tool_calls_total", "MCP tool calls made by agent turns", ["tool", "outcome"]
)
TOOL_DURATION = Histogram(
    "fleet_tool_call_duration_seconds",
    "MCP tool call latency seen by the worker (network and server included)",
    ["tool", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
SKILL_ACTIVATIONS = Counter("fleet_skill_activations_total", "Skills loaded into a turn", ["skill"])
MODEL_CALLS = Counter("fleet_model_calls_total", "Model requests made by turns", ["outcome"])
MODEL_DURATION = Histogram(
    "fleet_model_call_duration_seconds", "Latency of one model request", buckets=_LATENCY_BUCKETS
)
MODEL_TOKENS = Counter("fleet_model_tokens_total", "Model tokens used, by direction", ["direction"])
MODEL_COST = Counter(
    "fleet_model_cost_dollars_total",
    "Estimated model spend in US dollars (token counts times the configured prices)",
)
AUDIT_WRITE_FAILURES = Counter(
    "fleet_audit_write_failures_total", "Audit rows that could not be written on the first try"
)

# -- pre-created series: a metric that exists reads 0, not "no data" -----------------------------

for _outcome in OUTCOMES:
    MESSAGES_COMPLETED.labels(_outcome)
for _source in ("notify", "poll", "retry"):
    WAKEUPS.labels(_source)
for _tool in TOOLS:
    for _outcome in TOOL_OUTCOMES:
        TOOL_CALLS.labels(_tool, _outcome)
    TOOL_DURATION.labels(_tool, "ok")
for _outcome in MODEL_OUTCOMES:
    MODEL_CALLS.labels(_outcome)
for _direction in TOKEN_DIRECTIONS:
    MODEL_TOKENS.labels(_direction)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(value)`` for each of ``values``, in one pass: the bucket counts are
    summed first, then each bucket touched and the sum are written once. The worker records a
    claim batch's queue waits and its ended turns this way. One by one, each observation is
    two locked writes (an mmap file's in multiprocess mode), about 1.5 us in a process: 4% of
    what a no-op drain's worker spends on a message (BENCHMARKS.md, 2026-12-08).

    Uses the fields ``Histogram.observe`` itself uses (``_upper_bounds``, ``_buckets``,
    ``_sum``), which prometheus_client has kept since 0.4; tests/test_metrics.py checks that
    the samples come out as ``observe``'s would, so an upgrade that changes them fails there.
    """
    if not values:
        return
    histogram._raise_if_not_observable()  # a labelled parent, as observe() would
    # The first bound >= the value: observe() counts a value in the first bucket it is <= to.
    counts = collections.Counter(bisect.bisect_left(histogram._upper_bounds, v) for v in values)
    histogram._sum.inc(sum(values))
    for bucket, n in counts.items():
        histogram._buckets[bucket].inc(n)


def known_skills(root: Path | None = None) -> list[str]:
    """Skill names shipped in ``skills/`` (each a folder with a ``SKILL.md``)."""
    from fleet.settings import PROJECT_ROOT

    folder = (root or PROJECT_ROOT) / "skills"
    if not folder.is_dir():
        return []
    return sorted(p.parent.name for p in folder.glob("*/SKILL.md"))


for _skill in known_skills():
    SKILL_ACTIVATIONS.labels(_skill)

# -- helpers ----------------------------------------------------------------------------------

#: US dollars per million tokens (input, output); used when ``FLEET_MODEL_PRICES`` is unset.
#: Public list prices at the time of writing; an estimate, not a bill.
MODEL_PRICES: dict[str, tuple[float, float]] = {
    "offline": (0.0, 0.0),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
}


def model_prices(model: str, configured: str | None = None) -> tuple[float, float]:
    """Dollars per million (input, output) tokens: ``FLEET_MODEL_PRICES`` ("0.4,1.6") when set,
    else the table above, else zero (an unknown model is not guessed at)."""
    if configured:
        input_price, output_price = (float(part) for part in configured.split(","))
        return input_price, output_price
    return MODEL_PRICES.get(model, (0.0, 0.0))


def record_tool_call(tool: str, outcome: str, seconds: float) -> None:
    """One MCP tool call finished. ``outcome``: ok, error, blocked or timeout."""
    TOOL_CALLS.labels(tool, outcome).inc()
    TOOL_DURATION.labels(tool, outcome).observe(seconds)


def record_model_call(
    *,
    seconds: float,
    ok: bool = True,
    input_tokens: int = 0,
    output_tokens: int = 0,
    prices: tuple[float, float] = (0.0, 0.0),
) -> None:
    """One model request finished: latency, tokens and their estimated cost."""
    MODEL_CALLS.labels("ok" if ok else "error").inc()
    MODEL_DURATION.observe(seconds)
    if input_tokens:
        MODEL_TOKENS.labels("input").inc(input_tokens)
    if output_tokens:
        MODEL_TOKENS.labels("output").inc(output_tokens)
    cost = (input_tokens * prices[0] + output_tokens * prices[1]) / 1_000_000
    if cost:
        MODEL_COST.inc(cost)
