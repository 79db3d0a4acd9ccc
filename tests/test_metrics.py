"""Metrics from real processes: ``fleet up``'s one endpoint for all children, checked against
the database; ``fleet status`` against the same endpoint; the pieces that need no processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet import metrics
from tests.processes import fleet_json, start_fleet, stop, wait_until
from tests.scrape import Scrape, free_port, scrape
from tests.workers import listening


async def _done(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM fleet.messages WHERE state = 'done'")


async def _enqueue(conn: asyncpg.Connection, first: int, count: int) -> None:
    await conn.execute(
        """SELECT fleet.enqueue(session_id => 's-' || (g % 7), body => 'message ' || g)
           FROM generate_series($1::int, $2::int) AS g""",
        first,
        first + count - 1,
    )


async def _scrape_when(port: int, predicate, message: str, timeout: float = 30.0) -> Scrape:
    """The first scrape for which ``predicate`` holds (counters land a moment after commits)."""
    result: list[Scrape] = []

    async def check() -> bool:
        try:
            current = await asyncio.to_thread(scrape, port)
        except OSError:
            return False
        result[:] = [current]
        return bool(predicate(current))

    await wait_until(check, timeout=timeout, interval=0.2, message=message)
    return result[0]


def _worker_pids(rows: list[asyncpg.Record]) -> set[int]:
    return {r["pid"] for r in rows}


async def test_fleet_up_endpoint_counts_every_message_of_every_worker(
    conn, fleet_env, tmp_path: Path
):
    port = free_port()
    env = {**fleet_env, "FLEET_METRICS_HOST": "127.0.0.1"}
    up = start_fleet(
        "up", "--workers", "2", "--handler", "noop", "--concurrency", "4",
        "--work-delay", "0.02", "--metrics-port", str(port),
        env=env, log=tmp_path / "up.log",
    )  # fmt: skip
    try:
        workers = await wait_until(
            lambda: conn.fetch("SELECT pid FROM fleet.workers"),
            timeout=60,
            message="workers registered",
        )
        await wait_until(
            lambda: conn.fetchval("SELECT count(*) = 2 FROM fleet.workers"), timeout=60
        )
        await _enqueue(conn, 1, 80)
        await wait_until(lambda: _done_is(conn, 80), timeout=60, message="80 messages done")
        first = await _scrape_when(
            port,
            lambda s: s.value("fleet_messages_completed_total", outcome="done") >= 80,
            "the completed counter to reach 80",
        )
        assert first.value("fleet_messages_completed_total", outcome="done") == 80
        assert first.value("fleet_messages_claimed_total") == 80
        assert first.value("fleet_queue_wait_seconds_count") == 80
        assert first.value("fleet_turn_duration_seconds_count", handler="noop") == 80
        # The +Inf bucket holds every observation; turns took at least the work delay.
        assert first.value("fleet_turn_duration_seconds_bucket", le="+Inf") == 80
        assert first.value("fleet_turn_duration_seconds_bucket", le="0.01") == 0
        assert first.value("fleet_turn_duration_seconds_sum") >= 80 * 0.02
        assert first.value("fleet_worker_processes") == 2
        assert first.value("fleet_in_flight_turns") == 0
        # The database-derived gauges come once, from the supervisor.
        assert first.values("fleet_queue_messages", state="done") == [80]
        assert first.value("fleet_queue_messages", state="queued") == 0
        assert first.value("fleet_workers_alive") == 2
        assert first.value("fleet_queue_collector_up") == 1
        # Both workers' samples are in the one endpoint: the series are per-process files.
        workers = await conn.fetch("SELECT pid FROM fleet.workers")
        assert len(_worker_pids(workers)) == 2

        # A worker dies without a goodbye: the supervisor restarts it, the dead process's
        # counters stay in the sum and its live gauges go.
        victim = next(iter(_worker_pids(workers)))
        os.kill(victim, signal.SIGKILL)
        await wait_until(
            lambda: _new_worker(conn, _worker_pids(workers)), timeout=60, message="a restart"
        )
        await _enqueue(conn, 81, 40)
        await wait_until(lambda: _done_is(conn, 120), timeout=60, message="120 messages done")
        second = await _scrape_when(
            port,
            lambda s: s.value("fleet_messages_completed_total", outcome="done") >= 120,
            "the completed counter to reach 120",
        )
        done = await _done(conn)
        assert done == 120
        assert second.value("fleet_messages_completed_total", outcome="done") == done
        assert second.value("fleet_queue_wait_seconds_count") == done
        assert second.value("fleet_turn_duration_seconds_count") == done
        assert second.value("fleet_worker_processes") == 2  # not 3: the dead pid is gone
        assert second.value("fleet_messages_completed_total", outcome="dead") == 0

        # `fleet status` prints the numbers the endpoint exports.
        status = await asyncio.to_thread(fleet_json, "status", env=fleet_env)
        third = await asyncio.to_thread(scrape, port)
        for state, count in status["counts"].items():
            assert third.value("fleet_queue_messages", state=state) == count, state
        assert third.value("fleet_workers_alive") == len(status["live_workers"])
        assert third.value("fleet_approvals_pending") == status["awaiting_approvals"]
        assert third.value("fleet_queue_oldest_ready_age_seconds") == pytest.approx(
            status["oldest_queued_age_seconds"], abs=1.0
        )
    finally:
        assert stop(up) == 0


async def _done_is(conn: asyncpg.Connection, count: int) -> bool:
    return await _done(conn) == count


async def _new_worker(conn: asyncpg.Connection, old: set[int]) -> bool:
    rows = await conn.fetch("SELECT pid FROM fleet.workers")
    return bool(_worker_pids(rows) - old)


async def test_lone_worker_serves_its_own_metrics_with_queue_gauges(
    conn, fleet_env, tmp_path: Path
):
    port = free_port()
    env = {**fleet_env, "FLEET_METRICS_HOST": "127.0.0.1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = start_fleet(
        "worker", "--handler", "noop", "--metrics-port", str(port),
        env=env, log=tmp_path / "worker.log",
    )  # fmt: skip
    try:
        # Registered is not yet listening (the worker opens its pool in between): wait for
        # its LISTEN connection, so the messages wake it by NOTIFY, not by the poll.
        await listening(conn)
        await _enqueue(conn, 1, 10)
        await wait_until(lambda: _done_is(conn, 10), timeout=60, message="10 messages done")
        result = await _scrape_when(
            port,
            lambda s: s.value("fleet_messages_completed_total", outcome="done") == 10,
            "the worker's counter",
        )
        assert result.value("fleet_queue_messages", state="done") == 10
        assert result.value("fleet_worker_processes") == 1
        assert result.value("fleet_wakeups_total", source="notify") >= 1
    finally:
        stop(worker)
    assert "queue metrics unavailable" not in (tmp_path / "worker.log").read_text()


async def test_queue_gauges_off_on_a_worker_when_told(fleet_env, tmp_path: Path):
    port = free_port()
    env = {**fleet_env, "FLEET_METRICS_HOST": "127.0.0.1", "FLEET_QUEUE_METRICS": "false"}
    worker = start_fleet(
        "worker", "--handler", "noop", "--metrics-port", str(port),
        env=env, log=tmp_path / "worker.log",
    )  # fmt: skip
    try:
        result = await _scrape_when(port, lambda s: "fleet_worker_processes" in s.names, "up")
        assert "fleet_queue_messages" not in result.names
        assert "fleet_messages_completed_total" in result.names
    finally:
        stop(worker)


async def test_metrics_serve_aggregates_a_shared_directory_and_prunes_dead_pids(
    fleet_env, tmp_path: Path, conn
):
    """systemd layout: workers share PROMETHEUS_MULTIPROC_DIR, `fleet metrics serve` exports."""
    shared = tmp_path / "prom"
    shared.mkdir()
    env = {**fleet_env, "PROMETHEUS_MULTIPROC_DIR": str(shared), "FLEET_METRICS_HOST": "127.0.0.1"}
    port = free_port()
    server = start_fleet("metrics", "serve", "--port", str(port), env=env, log=tmp_path / "m.log")
    workers = [
        start_fleet("worker", "--handler", "noop", env=env, log=tmp_path / f"w{i}.log")
        for i in range(2)
    ]
    try:
        result = await _scrape_when(
            port, lambda s: s.values("fleet_worker_processes") == [2], "two workers counted"
        )
        await _enqueue(conn, 1, 6)
        await wait_until(lambda: _done_is(conn, 6), timeout=60, message="6 messages done")
        result = await _scrape_when(
            port,
            lambda s: s.value("fleet_messages_completed_total", outcome="done") == 6,
            "6 completions",
        )
        stop(workers[0], signal.SIGKILL)
        result = await _scrape_when(
            port, lambda s: s.values("fleet_worker_processes") == [1], "the dead worker dropped"
        )
        assert result.value("fleet_messages_completed_total", outcome="done") == 6
        assert result.value("fleet_queue_messages", state="done") == 6
    finally:
        for w in workers:
            stop(w)
        stop(server)


def test_every_known_label_value_exists_before_it_is_used():
    """A series that does not exist reads "no data" and never fires an alert."""
    from prometheus_client import generate_latest

    if metrics.MULTIPROCESS:
        pytest.skip("the test process runs in multiprocess mode")
    text = generate_latest().decode()
    found = {
        (s.name, tuple(sorted(s.labels.items())))
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    for outcome in metrics.OUTCOMES:
        assert ("fleet_messages_completed_total", (("outcome", outcome),)) in found
    for tool in metrics.TOOLS:
        assert ("fleet_tool_calls_total", (("outcome", "error"), ("tool", tool))) in found
    for skill in metrics.known_skills():
        assert ("fleet_skill_activations_total", (("skill", skill),)) in found


def test_observe_many_records_what_observe_would():
    """The worker records a batch's queue waits and ended turns with metrics.observe_many,
    which writes the histogram's fields itself: the samples must be observe()'s, bucket by
    bucket (edges included), for an unlabelled histogram and a labelled child alike."""
    from prometheus_client import CollectorRegistry, Histogram

    values = [0.0, 0.001, 0.0010001, 0.004, 0.25, 0.25, 7.0, 300.0, 301.0, -0.5] * 3

    def samples(registry: CollectorRegistry) -> dict[tuple, float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    for labels in ((), ("handler",)):
        one_by_one, batched = CollectorRegistry(), CollectorRegistry()
        kwargs = {"buckets": metrics.QUEUE_WAIT._upper_bounds[:-1], "labelnames": labels}
        a = Histogram("h", "h", registry=one_by_one, **kwargs)
        b = Histogram("h", "h", registry=batched, **kwargs)
        if labels:
            a, b = a.labels("noop"), b.labels("noop")
        for value in values:
            a.observe(value)
        metrics.observe_many(b, values[:7])
        metrics.observe_many(b, [])
        metrics.observe_many(b, values[7:])
        expected, got = samples(one_by_one), samples(batched)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value), key
    with pytest.raises(ValueError):  # a labelled parent, as observe() says
        metrics.observe_many(Histogram("p", "p", ["x"], registry=CollectorRegistry()), [1.0])


def test_model_cost_and_tool_helpers():
    before_in = metrics.MODEL_TOKENS.labels("input")._value.get()
    before_cost = metrics.MODEL_COST._value.get()
    metrics.record_model_call(
        seconds=0.2, input_tokens=1_000_000, output_tokens=500_000, prices=(0.4, 1.6)
    )
    assert metrics.MODEL_TOKENS.labels("input")._value.get() - before_in == 1_000_000
    assert metrics.MODEL_COST._value.get() - before_cost == pytest.approx(0.4 + 0.8)
    assert metrics.model_prices("gpt-4.1-mini") == (0.40, 1.60)
    assert metrics.model_prices("gpt-4.1-mini", "1,2") == (1.0, 2.0)
    assert metrics.model_prices("some-local-model") == (0.0, 0.0)
    before = metrics.TOOL_CALLS.labels("lookup_order", "timeout")._value.get()
    metrics.record_tool_call("lookup_order", "timeout", 5.0)
    assert metrics.TOOL_CALLS.labels("lookup_order", "timeout")._value.get() == before + 1


async def test_approval_metrics_come_from_the_database(conn, settings):
    """Decided counts and time-to-decision histograms, whichever process decided."""
    from fleet.metrics_server import APPROVAL_BUCKETS, read_snapshot, snapshot_metrics

    if not await conn.fetchval("SELECT to_regclass('public.run_states') IS NOT NULL"):
        pytest.skip("run_states not migrated yet")
    await conn.execute("INSERT INTO conversations (session_id, user_id) VALUES ('appr', 'c1')")
    rows = [
        ("approved", "ana", "2 minutes"),
        ("approved", "ana", "5 minutes"),  # exactly on a bound: within it (`le`)
        ("rejected", "ana", "10 minutes"),
        ("rejected", "fleet:expiry", "1 day"),
    ]
    for decision, by, age in rows:
        await conn.execute(
            """INSERT INTO run_states (conversation_id, tool, arguments, call_id, state, status,
                   decision, decided_by, requested_at, decided_at, expires_at)
               VALUES ('appr', 'issue_refund', '{}'::jsonb, gen_random_uuid()::text, '{}',
                       $1, $1, $2, now() - $3::text::interval, now(), now() + interval '1 day')""",
            decision,
            by,
            age,
        )
    await conn.execute(
        """INSERT INTO run_states (conversation_id, tool, arguments, call_id, state,
               requested_at, expires_at)
           VALUES ('appr', 'issue_refund', '{}'::jsonb, 'c-open', '{}',
                   now() - interval '90 seconds', now() + interval '1 day')"""
    )
    snap = await read_snapshot(conn)
    assert snap.approvals_pending == 1
    assert 85 < snap.approvals_oldest_pending_age_seconds < 200
    assert {k: v.count for k, v in snap.approvals_decided.items()} == {
        "approved": 2,
        "rejected": 1,
        "expired": 1,
    }
    families = {f.name: f for f in snapshot_metrics(snap)}
    buckets = {
        (s.labels["decision"], s.labels["le"]): s.value
        for s in families["fleet_approval_decision_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert buckets[("approved", "60")] == 0
    assert buckets[("approved", "300")] == 2 and buckets[("approved", "+Inf")] == 2
    assert buckets[("rejected", "300")] == 0 and buckets[("rejected", "900")] == 1
    assert buckets[("expired", "43200")] == 0 and buckets[("expired", "+Inf")] == 1
    assert len(APPROVAL_BUCKETS) + 1 == len([k for k in buckets if k[0] == "approved"])


def test_collector_says_when_the_database_is_away(settings):
    from fleet.metrics_server import QueueCollector

    collector = QueueCollector(settings, "postgresql://nobody@127.0.0.1:1/none")
    text = Scrape(_render(collector)).text
    assert "fleet_queue_collector_up 0.0" in text
    assert "fleet_queue_messages" not in text


def _render(collector) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def _gauges(collector) -> dict[tuple[str, str], float]:
    """One scrape of the collector: (metric, state) -> value of its per-state gauges."""
    return {
        (family.name, sample.labels["state"]): sample.value
        for family in collector.collect()
        for sample in family.samples
        if "state" in sample.labels
    }


async def test_finished_messages_are_recounted_on_a_budget_and_live_ones_every_scrape(
    settings, conn, db_url, monkeypatch
):
    """Counting finished messages reads the whole history, so the collector repeats a count
    that was slow only after HISTORY_READ_FACTOR times its duration, keeping the counts
    (their oldest ages go on growing); waiting and running messages, read through their own
    indexes, are counted at every scrape. Here every count is "slow"
    (HISTORY_READ_FREE_SECONDS 0) and the factor large, so the second scrape still shows the
    first one's finished count."""
    from fleet import metrics_server, queue
    from fleet.queue import Outcome

    monkeypatch.setattr(metrics_server, "HISTORY_READ_FREE_SECONDS", 0.0)
    monkeypatch.setattr(metrics_server, "HISTORY_READ_FACTOR", 1e6)
    collector = metrics_server.QueueCollector(settings, db_url)
    await _enqueue(conn, 1, 3)
    [claimed] = await queue.claim(conn, "w", 1, 30)
    await queue.finish(conn, [Outcome(message_id=claimed.id, lease_token=claimed.lease_token,
                                      state="done", reply="ok")])
    first = await asyncio.to_thread(_gauges, collector)
    assert first[("fleet_queue_messages", "done")] == 1
    assert first[("fleet_queue_messages", "queued")] == 2

    await asyncio.sleep(0.2)
    for message in await queue.claim(conn, "w", 10, 30):
        await queue.finish(conn, [Outcome(message_id=message.id, lease_token=message.lease_token,
                                          state="dead", error="boom")])
    second = await asyncio.to_thread(_gauges, collector)
    assert second[("fleet_queue_messages", "queued")] == 0  # live: counted again
    assert second[("fleet_queue_messages", "dead")] == 0  # finished: as first counted
    assert second[("fleet_queue_messages", "done")] == 1
    assert (second[("fleet_queue_oldest_age_seconds", "done")]
            >= first[("fleet_queue_oldest_age_seconds", "done")] + 0.2)

    collector.finished.due = 0.0  # as if its budget had passed
    third = await asyncio.to_thread(_gauges, collector)
    assert third[("fleet_queue_messages", "dead")] == await conn.fetchval(
        "SELECT count(*) FROM fleet.messages WHERE state = 'dead'") > 0


async def test_live_counts_do_not_read_the_finished_history(conn):
    """`fleet status` and every scrape count waiting and running messages through the partial
    indexes: with 3,000 finished messages and none waiting, a few buffers, not the table."""
    from fleet import queue
    from fleet.queue import Outcome

    await _enqueue(conn, 1, 3000)
    while claimed := await queue.claim(conn, "w", 50, 30):
        await queue.finish(conn, [Outcome(message_id=m.id, lease_token=m.lease_token,
                                          state="done", reply="ok") for m in claimed])
    await conn.execute("VACUUM ANALYZE fleet.messages")
    table_pages = await conn.fetchval(
        "SELECT pg_relation_size('fleet.messages') / current_setting('block_size')::int")
    plan = "\n".join(r[0] for r in await conn.fetch(
        "EXPLAIN (ANALYZE, BUFFERS) " + queue.SQL["live_state_counts"]))
    read = int(re.findall(r"Buffers: shared hit=(\d+)", plan)[0])  # the whole statement's
    assert table_pages > 20
    assert read < 10, plan
