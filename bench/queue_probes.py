"""Probes behind the 2026-12-02 figures of BENCHMARKS.md (`fleet bench queue`'s own
phases report the rest). Each runs in a scratch database on the fleet's server, like the bench:

    python bench/queue_probes.py enqueue-cost [--batch 9] [--messages 20000] [--rounds 2]
    python bench/queue_probes.py session-id-check
    python bench/queue_probes.py first-call
    python bench/queue_probes.py after-vacuum
    python bench/queue_probes.py heartbeat
    python bench/queue_probes.py analyze-cost
    python bench/queue_probes.py cycle-cost [--messages 20000] [--batch 10] [--rounds 2]
    python bench/queue_probes.py cycle-split [--rounds 2]
    python bench/queue_probes.py cycle-ceiling [--rounds 2] [--connections 1 2 3]
    python bench/queue_probes.py repair-heads
    python bench/queue_probes.py stale-stats [--history 30000] [--waiting 30000] [--sessions 500]
    python bench/queue_probes.py soak [--messages 600000] [--chunk 30000] [--no-autovacuum]
    python bench/queue_probes.py sustained-trace [--rate 3000] [--seconds 10] [--runs 3]
                                                 [--no-autovacuum] [--analyze-after S]
                                                 [--vacuum-after S] [--vacuum-cost-delay MS]
                                                 [--vacuum-command SQL]
                                                 [--watch-fsync] [--cycle-log]
                                                 [--pause-worker AT SECONDS]
    python bench/queue_probes.py history-reads [--finished 1000000 3000000]
                                               [--approvals 100000 300000]
    python bench/queue_probes.py transport [--rounds 4] [--messages 20000]
    python bench/queue_probes.py recheck-lock
    python bench/queue_probes.py drain-waits [--processes 1 2] [--rounds 2] [--messages 60000]
                                             [--sessions N] [--work-delay 0]
                                             [--concurrency 20]

Backend CPU is read from /proc for the connection's own backend, so the server must be local.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import datetime
import itertools
import json
import os
import pathlib
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import psutil

import fleet.bench.queue as bench
import fleet.queue as fleet_queue
from fleet.settings import Settings
from fleet.sql import queries

QUERIES = queries("queries.sql")
METRICS = queries("metrics.sql")
PER_MESSAGE = (
    "SELECT count(fleet.enqueue(session_id => s, body => 'bench')) FROM unnest($1::text[]) AS s"
)
MANY = (
    "SELECT cardinality(fleet.enqueue_many((SELECT jsonb_agg(jsonb_build_object("
    "'session_id', s, 'body', 'bench')) FROM unnest($1::text[]) AS s)))"
)
#: The least a batch of new-session messages can cost: two set-based INSERTs, no rules.
FLOOR = """
WITH new AS (INSERT INTO fleet.sessions (session_id) SELECT unnest($1::text[])
             ON CONFLICT DO NOTHING RETURNING session_id)
INSERT INTO fleet.messages (session_id, body, is_head)
SELECT s, 'bench', s IN (SELECT session_id FROM new) FROM unnest($1::text[]) AS s
"""
#: Columns no query of ours filters, joins or groups on (analyze-cost).
UNFILTERED = ["body", "reply", "error", "metadata", "variables", "lease_owner", "customer_id",
              "dedupe_key", "enqueued_at", "claimed_at", "finished_at", "lease_expires_at",
              "lease_token", "agent", "attempts", "max_attempts", "takeovers"]


def backend_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def scratch():
    async with bench.scratch_database(Settings()) as url:
        conn = await asyncpg.connect(url)
        try:
            yield url, conn
        finally:
            await conn.close()


async def enqueue_cost(args: argparse.Namespace) -> None:
    """Backend CPU per new-session message, commit included, ``--batch`` per transaction."""
    for rnd in range(args.rounds):
        for name, sql in (("fleet.enqueue per message", PER_MESSAGE),
                          ("fleet.enqueue_many", MANY), ("bare INSERTs (floor)", FLOOR)):
            async with scratch() as (_, conn):
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                await conn.execute(sql, [f"warm{i}" for i in range(200)])
                before = backend_cpu(pid)
                for first in range(0, args.messages, args.batch):
                    last = min(args.messages, first + args.batch)
                    await conn.execute(sql, [f"r{rnd}-{i}" for i in range(first, last)])
                used = backend_cpu(pid) - before
            print(f"round {rnd + 1}, batch {args.batch}: {name}: "
                  f"{used / args.messages * 1e6:.0f} us per message")


async def session_id_check(_: argparse.Namespace) -> None:
    """The old counted regex against the length test and one-character class (migration 0013)."""
    values = "FROM generate_series(1, 200000) AS g"
    async with scratch() as (_, conn):
        for label, where in (
            ("nothing (generate_series alone)", "('live' || g) IS NOT NULL"),
            ("'^[^[:cntrl:][:space:]]{1,128}$'",
             "('live' || g) ~ '^[^[:cntrl:][:space:]]{1,128}$'"),
            ("length + '[[:cntrl:][:space:]]'",
             "length('live' || g) BETWEEN 1 AND 128 AND ('live' || g) !~ '[[:cntrl:][:space:]]'"),
        ):
            started = time.perf_counter()
            await conn.fetchval(f"SELECT count(*) {values} WHERE {where}")
            print(f"200,000 values, {label}: {time.perf_counter() - started:.3f} s")


async def _backlog(conn: asyncpg.Connection, messages: int, finished: int) -> None:
    await conn.execute("SELECT fleet.enqueue('s' || g, 'bench') FROM generate_series(1, $1) g",
                       messages)
    await conn.execute("UPDATE fleet.messages SET state = 'done', reply = 'ok', is_head = false,"
                       " claimed_at = clock_timestamp(), finished_at = clock_timestamp()"
                       " WHERE id <= $1", finished)
    await conn.execute("VACUUM ANALYZE")


CLAIM_NOTHING_FINISHED = (
    "SELECT * FROM fleet.finish_and_claim($1, 10, 30, NULL, NULL, '{}', '{}', '{}', '{}', '{}')"
)


async def first_call(_: argparse.Namespace) -> None:
    """A fresh backend's first worker cycle against its next ones."""
    async with scratch() as (url, conn):
        await _backlog(conn, 2000, 0)
        for backend in range(4):
            fresh = await asyncpg.connect(url)
            times = []
            for _call in range(3):
                started = time.perf_counter()
                await fresh.fetch(CLAIM_NOTHING_FINISHED, "probe")
                times.append((time.perf_counter() - started) * 1000)
            await fresh.close()
            print(f"backend {backend + 1}: finish_and_claim of 10, "
                  + ", ".join(f"{t:.2f}" for t in times) + " ms")


async def after_vacuum(_: argparse.Namespace) -> None:
    """A warm backend's worker cycle before and after a VACUUM or ANALYZE of fleet.messages
    from another connection: either changes the table's pg_class row, which invalidates the
    plans every backend has cached for statements on the table, so each plans them again."""
    async with scratch() as (url, conn):
        await _backlog(conn, 20_000, 10_000)
        worker = await asyncpg.connect(url)
        for command in ("VACUUM fleet.messages", "ANALYZE fleet.messages",
                        "VACUUM fleet.sessions", "SELECT 1"):
            times = []
            for call in range(6):
                if call == 3:
                    await conn.execute(command)
                started = time.perf_counter()
                await worker.fetch(CLAIM_NOTHING_FINISHED, "probe")
                times.append((time.perf_counter() - started) * 1000)
            print(f"{command}: finish_and_claim of 10, three calls before, three after: "
                  + ", ".join(f"{t:.2f}" for t in times) + " ms")
        await worker.close()


async def heartbeat(_: argparse.Namespace) -> None:
    """The worker's heartbeat over 20 leases, 50,000 messages in the table."""
    async with scratch() as (_, conn):
        await _backlog(conn, 50_000, 30_000)
        rows = await conn.fetch(CLAIM_NOTHING_FINISHED.replace("10,", "20,"), "probe")
        ids, tokens = [r["id"] for r in rows], [r["lease_token"] for r in rows]
        plan = await conn.fetch("EXPLAIN (ANALYZE) " + QUERIES["heartbeat"], ids, tokens, 30.0)
        print("\n".join(r[0] for r in plan))


async def analyze_cost(_: argparse.Namespace) -> None:
    """ANALYZE of 50,000 messages: as migrated (every column's statistics target 10, migration
    0015), with the default targets as before 0015, and the try before that (defaults, and
    statistics off on the columns no query filters on). Then of their 50,000 sessions, as
    migrated (0019) and at the default targets."""
    async with scratch() as (_, conn):
        await _backlog(conn, 50_000, 50_000)
        columns = [r["attname"] for r in await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'fleet.messages'::regclass"
            " AND attnum > 0 AND NOT attisdropped")]
        variants = {
            "statistics target 10 (migration 0015)": {},
            "default targets (before 0015)": dict.fromkeys(columns, -1),
            f"default targets, 0 on {len(UNFILTERED)} columns": dict.fromkeys(UNFILTERED, 0),
        }
        for label, targets in variants.items():
            for column, target in targets.items():
                await conn.execute(
                    f"ALTER TABLE fleet.messages ALTER COLUMN {column} SET STATISTICS {target}")
            await _print_analyze_times(conn, "fleet.messages", label)
        # Its 50,000 sessions (one per message): as migrated (0019) and at the default targets.
        await _print_analyze_times(conn, "fleet.sessions", "statistics target 10 (migration 0019)")
        await conn.execute("ALTER TABLE fleet.sessions ALTER COLUMN session_id SET STATISTICS -1,"
                           " ALTER COLUMN metadata SET STATISTICS -1,"
                           " ALTER COLUMN created_at SET STATISTICS -1")
        await _print_analyze_times(conn, "fleet.sessions", "default targets (before 0019)")


async def _print_analyze_times(conn: asyncpg.Connection, table: str, label: str) -> None:
    times = []
    for _run in range(5):
        started = time.perf_counter()
        await conn.execute(f"ANALYZE {table}")
        times.append((time.perf_counter() - started) * 1000)
    print(f"{table}, {label}: " + ", ".join(f"{t:.0f}" for t in times) + " ms")


#: The index sets before migrations 0016 and 0014 (cycle-cost's comparisons).
BEFORE_0016 = """
CREATE INDEX messages_session_live ON fleet.messages (session_id, id)
    WHERE state IN ('queued', 'running', 'awaiting_approval');
CREATE INDEX messages_leases ON fleet.messages (lease_expires_at) WHERE state = 'running';
DROP INDEX fleet.messages_session_waiting;
DROP INDEX fleet.messages_running;
"""
BEFORE_0014 = BEFORE_0016 + """
CREATE INDEX messages_session ON fleet.messages (session_id, id);
DROP INDEX fleet.messages_session_finished;
"""
INDEX_SETS = {"now": "", "before 0016": BEFORE_0016, "before 0014": BEFORE_0014}
CYCLE = ("SELECT * FROM fleet.finish_and_claim($1, $2, 30, NULL, NULL, $3::bigint[],"
         " $4::bigint[], $5::text[], $6::text[], $7::text[])")


async def drain_by_cycles(conn: asyncpg.Connection, worker: str, batch: int,
                          round_trips: list[float] | None = None) -> None:
    """Drain the queue as the worker's cycle does, with nothing else: each call of
    fleet.finish_and_claim finishes the batch the previous one claimed and claims the next,
    until a call has nothing to finish and claims nothing. Each call's round trip is appended
    to ``round_trips`` when given."""
    held: list[asyncpg.Record] = []
    while True:
        ids = [r["id"] for r in held]
        started = time.perf_counter()
        rows = await conn.fetch(
            CYCLE, worker, batch, ids, [r["lease_token"] for r in held],
            ["done"] * len(ids), ["ok"] * len(ids), [None] * len(ids))
        if round_trips is not None:
            round_trips.append(time.perf_counter() - started)
        held = [r for r in rows if r["lease_token"] is not None]
        if not held and not ids:
            return


async def cycle_cost(args: argparse.Namespace) -> None:
    """The worker's cycle alone: one connection drains a backlog with fleet.finish_and_claim,
    finishing the last batch and claiming the next in each call, as the worker does. Backend CPU
    and WAL per message, one per session and 100 per session (interleaved), with today's indexes
    and with those before migrations 0016 and 0014, in turn."""
    for rnd in range(args.rounds):
        for per_session in (1, 100):
            for indexes, change in INDEX_SETS.items():
                async with scratch() as (_, conn):
                    if change:
                        await conn.execute(change)
                    await conn.execute(
                        "SELECT count(fleet.enqueue('s' || (g % $2), 'bench'))"
                        " FROM generate_series(1, $1) g", args.messages,
                        args.messages // per_session)
                    await conn.execute("VACUUM ANALYZE")
                    await conn.execute("CHECKPOINT")
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    wal_start = await conn.fetchval("SELECT pg_current_wal_lsn()")
                    before = backend_cpu(pid)
                    await drain_by_cycles(conn, "probe", args.batch)
                    used = backend_cpu(pid) - before
                    wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn",
                                              wal_start)
                    done = await conn.fetchval(
                        "SELECT count(*) FROM fleet.messages WHERE state = 'done'")
                assert done == args.messages, f"{done} of {args.messages} done"
                print(f"round {rnd + 1}, {per_session} per session, indexes {indexes}: "
                      f"{used / done * 1e6:.0f} us backend CPU, {float(wal) / done:,.0f} B WAL"
                      " per message", flush=True)


async def cycle_split(args: argparse.Namespace) -> None:
    """Where a drain cycle's time goes: the bench's in-process drains (both layouts, in turn)
    with the server timing its functions (track_functions), and the worker timing each
    ``finish_and_claim`` call from its side. Per call: the finish (fleet.finish_messages), the
    claim (the rest of fleet.finish_and_claim), and the worker's wait, which adds the commit,
    the round trip and the time the call's answer waited for the worker's event loop."""
    waits: list[float] = []
    timed_call = fleet_queue.finish_and_claim

    async def timed(*call_args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await timed_call(*call_args, **kwargs)
        finally:
            waits.append(time.perf_counter() - started)

    qb = bench.QueueBench(Settings(), bench.QueueBenchConfig(skip_pgqueuer=True))
    async with qb.opened():
        await qb.conn.execute(f'ALTER DATABASE "{qb.database}" SET track_functions = \'all\'')
        fleet_queue.finish_and_claim = timed  # the worker looks it up at each call
        try:
            for rnd in range(args.rounds):
                for layout in ("one-per-session", "many-per-session"):
                    waits.clear()
                    await qb.conn.execute("SELECT pg_stat_reset()")
                    run = await qb._fleet_drain_once(layout, None)
                    await asyncio.sleep(1.0)  # backends report their function times when idle
                    spent = {r["funcname"]: r["total_time"] / max(r["calls"], 1)
                             for r in await qb.conn.fetch(
                                 "SELECT funcname, calls, total_time FROM pg_stat_user_functions")}
                    cycle, finish = spent["finish_and_claim"], spent["finish_messages"]
                    ordered = sorted(waits)
                    print(f"round {rnd + 1}, {layout}: {run.rate:,.0f}/s, steal "
                          f"{run.steal_percent:.1f}%; per call (10 messages): finish "
                          f"{finish:.2f} ms, claim {cycle - finish:.2f} ms, worker's wait "
                          f"p50 {1e3 * ordered[len(ordered) // 2]:.2f} ms "
                          f"p90 {1e3 * ordered[int(0.9 * len(ordered))]:.2f} ms", flush=True)
        finally:
            fleet_queue.finish_and_claim = timed_call


async def cycle_ceiling(args: argparse.Namespace) -> None:
    """What PostgreSQL alone gives the worker's cycle, against what the worker gets: the bench's
    in-process drain (one per session, batch 10, concurrency 20), then the same backlog drained
    by K connections each calling fleet.finish_and_claim in a loop (finish the last batch, claim
    the next, as the worker does) with no handler, no models and no event loop work between
    calls. msg/s from the first claim to the last finish, and each call's round trip."""

    async def loop(url: str, lat: list[float], worker: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await drain_by_cycles(conn, worker, 10, lat)
        finally:
            await conn.close()

    qb = bench.QueueBench(Settings(), bench.QueueBenchConfig(skip_pgqueuer=True))
    async with qb.opened():
        for rnd in range(args.rounds):
            run = await qb._fleet_drain_once("one-per-session", None)
            print(f"round {rnd + 1}: the worker, in-process: {run.rate:,.0f}/s, steal "
                  f"{run.steal_percent:.1f}%", flush=True)
            for connections in args.connections:
                await qb._fleet_fill(qb.config.messages, qb.config.messages)
                lat: list[float] = []
                await asyncio.gather(*(loop(qb.url, lat, f"probe-{k}")
                                       for k in range(connections)))
                rate, _, ok = await qb._fleet_drain_stats(qb.config.messages)
                assert ok, "not every message ended done"
                lat.sort()
                print(f"round {rnd + 1}: the SQL alone on {connections} connection(s): "
                      f"{rate:,.0f}/s, call p50 {1e3 * lat[len(lat) // 2]:.2f} ms "
                      f"p90 {1e3 * lat[int(0.9 * len(lat))]:.2f} ms", flush=True)


#: repair_heads as a first version of migration 0016 had it: the live-head probe in a SQL
#: function, which PostgreSQL does not inline (its body has subqueries), called per message.
PER_ROW_REPAIR = """
CREATE FUNCTION fleet.has_live_head(session_id text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM fleet.messages m
                   WHERE m.session_id = has_live_head.session_id AND m.state = 'running')
        OR EXISTS (SELECT 1 FROM fleet.messages m
                   WHERE m.session_id = has_live_head.session_id
                     AND m.state IN ('queued', 'awaiting_approval') AND m.is_head)
$$;
CREATE OR REPLACE FUNCTION fleet.repair_heads(max_sessions integer DEFAULT 100) RETURNS integer
LANGUAGE plpgsql AS $f$
DECLARE
    orphans text[];
BEGIN
    SELECT array_agg(DISTINCT m.session_id) INTO orphans
    FROM (SELECT q.session_id FROM fleet.messages q
          WHERE q.state = 'queued' AND NOT q.is_head AND NOT fleet.has_live_head(q.session_id)
          LIMIT max_sessions) m;
    IF orphans IS NULL THEN
        RETURN 0;
    END IF;
    RETURN fleet.promote_heads(orphans);
END
$f$;
"""


async def repair_heads(_: argparse.Namespace) -> None:
    """fleet.repair_heads on a backlog of 5,000 and 20,000 queued messages (50 and 200
    sessions, every one with its head): time and buffers of a warm call, as it is and with the
    per-row function of a first version of migration 0016."""
    for messages, sessions in ((5_000, 50), (20_000, 200)):
        for variant in ("now", "per-row function"):
            async with scratch() as (_, conn):
                if variant != "now":
                    await conn.execute(PER_ROW_REPAIR)
                await conn.execute(
                    "SELECT count(fleet.enqueue('s' || (g % $2), 'x'))"
                    " FROM generate_series(1, $1) g", messages, sessions)
                await conn.execute("VACUUM ANALYZE fleet.messages")
                await conn.fetchval("SELECT fleet.repair_heads(100)")  # plans, catalogs
                plan = [r[0] for r in await conn.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS) SELECT fleet.repair_heads(100)")]
            buffers = next(line.split("=")[1] for line in plan if "Buffers: shared hit=" in line)
            took = next(line for line in plan if line.startswith("Execution Time"))
            print(f"{messages} queued in {sessions} sessions, {variant}: {took},"
                  f" {buffers} buffers")


@contextlib.asynccontextmanager
async def noop_worker(url: str):
    """One ``fleet worker --handler noop`` process on ``url`` (20 in flight, claims of 10),
    started and its pool open; stopped on exit."""
    env = dict(os.environ, DATABASE_URL=url, FLEET_LOG_LEVEL="WARNING")
    worker = bench._Process(["fleet", "worker", "--handler", "noop", "--concurrency", "20",
                             "--claim-batch", "10"], env)
    try:
        await asyncio.sleep(3.0)
        yield worker
    finally:
        worker.finish()


async def drained(conn: asyncpg.Connection, worker: bench._Process) -> None:
    """Return once nothing is queued or running; raise if the worker exited first."""
    while await fleet_queue.has_unfinished_work(conn):
        if worker.popen.poll() is not None:
            raise RuntimeError(f"the worker exited: {worker.tail()}")
        await asyncio.sleep(0.1)


#: repair_heads' scan before 2026-12-07: its live-head probes as NOT EXISTS anti joins.
ANTI_JOIN_SCAN = """
SELECT array_agg(DISTINCT m.session_id)
FROM (SELECT q.session_id FROM fleet.messages q
      WHERE q.state = 'queued' AND NOT q.is_head
        AND NOT EXISTS (SELECT 1 FROM fleet.messages r
                        WHERE r.session_id = q.session_id AND r.state = 'running')
        AND NOT EXISTS (SELECT 1 FROM fleet.messages h
                        WHERE h.session_id = q.session_id AND h.is_head
                          AND h.state IN ('queued', 'awaiting_approval'))
      LIMIT 100) m
"""


async def stale_stats(args: argparse.Namespace) -> None:
    """The live-head probes planned on the statistics of an empty queue. A noop worker drains
    ``--history`` messages (``--sessions`` sessions), the table is analyzed empty (what
    autovacuum does between bursts), then ``--waiting`` messages are enqueued in the same
    sessions; then again after an ANALYZE of the backlog. Each time: the scan as written
    before 2026-12-07 (NOT EXISTS anti joins), fleet.repair_heads and fleet.promote_heads
    (every session; rolled back), time and buffers of a warm call. The old scan's cost grows
    with the square of the backlog: minutes at the default sizes."""
    enqueue = "SELECT count(fleet.enqueue('s' || (g % $2), 'x')) FROM generate_series(1, $1) g"
    async with scratch() as (url, conn):
        async with noop_worker(url) as worker:
            await conn.execute(enqueue, args.history, args.sessions)
            await drained(conn, worker)
        await conn.execute("VACUUM ANALYZE fleet.messages")
        await conn.execute(enqueue, args.waiting, args.sessions)
        sessions = f"ARRAY(SELECT 's' || g FROM generate_series(0, {args.sessions - 1}) g)"
        for statistics in ("of the empty queue", "of the backlog"):
            for label, statement in (
                    ("the scan with anti joins (before)", ANTI_JOIN_SCAN),
                    ("fleet.repair_heads(100)", "SELECT fleet.repair_heads(100)"),
                    ("fleet.promote_heads(every session)",
                     f"SELECT fleet.promote_heads({sessions})")):
                tx = conn.transaction()
                await tx.start()
                try:
                    if label.startswith("fleet."):
                        await conn.fetch(statement)  # a first call plans, reads the catalogs
                    plan = [r[0] for r in await conn.fetch(
                        "EXPLAIN (ANALYZE, BUFFERS) " + statement)]
                finally:
                    await tx.rollback()
                buffers = next(line.split("=")[1] for line in plan
                               if "Buffers: shared hit=" in line)
                took = next(line for line in plan if line.startswith("Execution Time"))
                print(f"{args.waiting:,} waiting in {args.sessions} sessions after"
                      f" {args.history:,} done, statistics {statistics}: {label}:"
                      f" {took}, {buffers} buffers", flush=True)
            await conn.execute("ANALYZE fleet.messages")


class FsyncWatch(threading.Thread):
    """Writes and fdatasyncs 8 kB of a file under FLEET_HOME (the embedded server's disk) every
    2 ms, and keeps every flush: (wall-clock start, ms). A stall of the device shows here
    whatever the database does, and so does a device slower for a whole run."""

    def __init__(self, home: pathlib.Path) -> None:
        super().__init__(daemon=True)
        self.path = home / "fsync-watch.probe"
        self.flushes: list[tuple[float, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while not self.stopping.is_set():
                os.pwrite(fd, b"x" * 8192, 0)
                started = time.perf_counter()
                os.fdatasync(fd)
                took = time.perf_counter() - started
                self.flushes.append((time.time() - took, took * 1000))
                time.sleep(0.002)
        finally:
            os.close(fd)
            self.path.unlink(missing_ok=True)


#: sustained-trace's server sample: autovacuum's work, the WAL position, the queue's waits.
SERVER_SAMPLE = """
SELECT (pg_current_wal_insert_lsn() - '0/0')::float8 AS wal,
       coalesce(array_agg(query) FILTER (WHERE backend_type = 'autovacuum worker'), '{}')
           AS vacuuming,
       coalesce(array_agg(application_name || ' '
                          || coalesce(wait_event_type || ':' || wait_event, 'CPU'))
                FILTER (WHERE state = 'active'
                          AND application_name IN ('fleet-worker', 'fleet-bench')), '{}')
           AS waits
FROM pg_stat_activity WHERE datname = current_database()
"""


async def sustained_trace(args: argparse.Namespace) -> None:
    """The queue bench's sustained phase (pgfleet), with each message's latency kept: where the
    messages over the p99 fall in the run, when backends started, when autovacuum ran and how
    much CPU the host stole. ``--cycle-log``: the worker's every call, from bench/cycle_log.
    ``--pause-worker AT SECONDS``: the worker process stopped (SIGSTOP) for a while, as a
    stall of the host would, and how long it then takes to catch up."""
    captured: dict[str, Any] = {}
    add = bench.QueueBench._add_sustained
    produce = bench._produce

    def keep(self: bench.QueueBench, system, rate, achieved, commits, times, *rest,
             **named) -> None:
        captured["times"] = times
        captured["commits"] = commits
        add(self, system, rate, achieved, commits, times, *rest, **named)

    async def produce_with_worker(rate: float, seconds: float, send: Any) -> Any:
        # Each run produces twice: the unmeasured warm-up, then the measured load.
        captured["produced"] += 1
        if captured["produced"] < 2:
            return await produce(rate, seconds, send)
        worker = next(p for p in psutil.Process().children(recursive=True)
                      if "worker" in p.cmdline())
        captured["worker_pid"] = worker.pid
        pausing = None
        if args.pause_worker is not None:
            pausing = asyncio.create_task(_pause(worker, *args.pause_worker))
        try:
            return await produce(rate, seconds, send)
        finally:
            if pausing is not None:
                captured["paused"] = await pausing

    bench.QueueBench._add_sustained = keep  # type: ignore[method-assign]
    bench._produce = produce_with_worker
    if args.cycle_log:
        captured["cycle_log"] = pathlib.Path(tempfile.mkdtemp(prefix="fleet-cycle-log-"))
        os.environ["CYCLE_LOG_DIR"] = str(captured["cycle_log"])
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(pathlib.Path(__file__).parent / "cycle_log"),
             *filter(None, [os.environ.get("PYTHONPATH")])])
    for run in range(args.runs):
        captured["produced"] = 0
        await _traced_run(args, run + 1, captured)


async def _pause(worker: psutil.Process, at: float, seconds: float) -> tuple[float, float]:
    """Stop ``worker`` ``at`` s from now for ``seconds`` s; (stopped, continued), wall clock."""
    await asyncio.sleep(at)
    worker.suspend()
    stopped = time.time()
    try:
        await asyncio.sleep(seconds)
    finally:
        worker.resume()
    return stopped, time.time()


async def _traced_run(args: argparse.Namespace, run: int, captured: dict[str, Any]) -> None:
    config = bench.QueueBenchConfig(sustain_seconds=args.seconds, sustain_rate=args.rate,
                                    skip_pgqueuer=True, explain_backlog=0)
    qb = bench.QueueBench(Settings(), config)
    started: dict[int, tuple[str, float]] = {}
    steal: list[tuple[float, float]] = []
    autovacuuming: dict[str, list[float]] = {}
    wal: list[tuple[float, float]] = []
    waits: list[tuple[float, list[str]]] = []
    by_hand_runs: list[tuple[str, float, float, float]] = []
    async with qb.opened():
        url = qb.url
        watcher = await asyncpg.connect(url, server_settings={"application_name": "probe"})
        sampler = await asyncpg.connect(url, server_settings={"application_name": "probe"})
        if args.no_autovacuum:
            await qb.conn.execute(
                "ALTER TABLE fleet.messages SET (autovacuum_enabled = false);"
                " ALTER TABLE fleet.sessions SET (autovacuum_enabled = false)")

        async def watch() -> None:
            last = bench.host_cpu_ticks()
            while True:
                for r in await watcher.fetch(
                        "SELECT pid, application_name,"
                        " extract(epoch FROM backend_start)::float8 AS at"
                        " FROM pg_stat_activity WHERE datname = current_database()"):
                    started.setdefault(r["pid"], (r["application_name"] or "(no name: autovacuum)",
                                                  r["at"]))
                now = bench.host_cpu_ticks()
                steal.append((time.time(), (now[0] - last[0]) / max(now[1] - last[1], 1)))
                last = now
                await asyncio.sleep(0.1)

        async def by_hand(after: float, command: str, cost_delay: float) -> None:
            # A maintenance command at a chosen moment, throttled as given (autovacuum's cost
            # limit, 200; a delay of 0 is a manual command's default, 2 ms autovacuum's).
            await asyncio.sleep(after)
            conn = await asyncpg.connect(url, server_settings={
                "application_name": "probe", "vacuum_cost_limit": "200",
                "vacuum_cost_delay": str(cost_delay)})
            began = time.time()
            await conn.execute(command)
            by_hand_runs.append((command, cost_delay, began, time.time()))
            await conn.close()

        async def sample_server() -> None:
            # Every ~25 ms, in one query: what autovacuum workers do in this database
            # (`last_autovacuum` says when one ended, not when it started, nor that one was
            # still running), the WAL position (how much WAL each moment wrote) and what the
            # queue's own backends wait on.
            while True:
                r = await sampler.fetchrow(SERVER_SAMPLE)
                now = time.time()
                for query in r["vacuuming"]:
                    autovacuuming.setdefault(query, [now, now])[1] = now
                wal.append((now, r["wal"]))
                waits.append((now, r["waits"]))
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(watch()), asyncio.create_task(sample_server())]
        if args.analyze_after is not None:
            tasks.append(asyncio.create_task(
                by_hand(args.analyze_after, "ANALYZE fleet.messages", 0)))
        if args.vacuum_after is not None:
            tasks.append(asyncio.create_task(
                by_hand(args.vacuum_after, args.vacuum_command, args.vacuum_cost_delay)))
        fsyncs = FsyncWatch(qb.settings.fleet_home) if args.watch_fsync else None
        if fsyncs is not None:
            fsyncs.start()
        try:
            await qb._fleet_sustained()
            vacuums = await qb.conn.fetch(
                "SELECT relname, extract(epoch FROM last_autovacuum)::float8 AS vacuum,"
                " extract(epoch FROM last_autoanalyze)::float8 AS analyze"
                " FROM pg_stat_user_tables WHERE schemaname = 'fleet'"
                " AND (last_autovacuum IS NOT NULL OR last_autoanalyze IS NOT NULL)")
        finally:
            if fsyncs is not None:
                fsyncs.stopping.set()
                fsyncs.join()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await watcher.close()
            await sampler.close()
    times = captured["times"]
    t0 = times[0]["enqueued"]
    latencies = sorted((t["claimed"] - t["enqueued"]) * 1000 for t in times)
    p99 = latencies[int(0.99 * len(latencies))]
    late = collections.Counter(round(t["enqueued"] - t0, 1) for t in times
                               if (t["claimed"] - t["enqueued"]) * 1000 >= p99)
    result = qb.report.sustained[-1]
    print(f"run {run}: {result.achieved_rate:,.0f}/s, p50 {result.p50_ms} ms,"
          f" p90 {result.p90_ms} ms, p99 {result.p99_ms} ms, max {result.max_ms} ms;"
          f" CPU per message: worker {result.worker_cpu_us:.0f} us,"
          f" PostgreSQL {result.postgres_cpu_us:.0f} us")
    print("  messages at or over the p99, by enqueue time (s after the first):",
          sorted(late.items()))
    # Where the late ones lost their time: waiting for their enqueue's commit (the producer's
    # transaction, WAL flush included) or, once committed, for a claim.
    committed_at = bench.commit_times(captured["commits"])
    split: dict[float, list[tuple[float, float]]] = collections.defaultdict(list)
    for t, at in zip(times, committed_at, strict=False):
        if (t["claimed"] - t["enqueued"]) * 1000 >= p99:
            split[round(t["enqueued"] - t0, 1)].append(
                ((at - t["enqueued"]) * 1000, (t["claimed"] - at) * 1000))
    print("  their worst commit / pickup ms, by enqueue time:", ", ".join(
        f"{at}: {max(c for c, _ in parts):.0f} / {max(p for _, p in parts):.0f}"
        for at, parts in sorted(split.items()) if len(parts) >= 10))
    for name, at in sorted(started.values(), key=lambda v: v[1]):
        if at >= t0 - 5:
            print(f"  backend {name} started at {at - t0:+.2f} s")
    for r in vacuums:
        for kind in ("vacuum", "analyze"):
            if r[kind] is not None and r[kind] >= t0 - 5:
                print(f"  auto{kind} of fleet.{r['relname']} at {r[kind] - t0:+.2f} s")
    for query, (first, last) in sorted(autovacuuming.items(), key=lambda v: v[1][0]):
        print(f"  {query}: seen from {first - t0:+.2f} to {last - t0:+.2f} s")
    for command, cost_delay, began, ended in by_hand_runs:
        print(f"  {command} (by hand, cost delay {cost_delay:g} ms)"
              f" from {began - t0:+.2f} to {ended - t0:+.2f} s")
        _print_waits(waits, t0, args.seconds, "during it",
                     lambda at, b=began, e=ended: b <= at <= e)
    # What the queue's backends waited on while the late messages waited (from 0.1 s before
    # the tenth of a second they were enqueued in to 0.2 s after), against the rest of the run.
    late_at = [t0 + at for at, parts in split.items() if len(parts) >= 10]
    if late_at:
        _print_waits(waits, t0, args.seconds, "around the late messages",
                     lambda at: any(w - 0.1 <= at <= w + 0.2 for w in late_at))
    _print_wal_spikes(wal, t0, args.seconds)
    if fsyncs is not None:
        during = [(at - t0, ms) for at, ms in fsyncs.flushes if 0 <= at - t0 <= args.seconds + 0.1]
        took = sorted(ms / 1000 for _, ms in during)
        print(f"  fdatasync of a probe file beside the data: {len(during)} flushes, p50"
              f" {bench._ms(took, 0.5)} ms, p90 {bench._ms(took, 0.9)} ms;"
              f" over 4 ms {sum(ms > 4 for _, ms in during)} times:",
              ", ".join(f"{at:+.2f} s {ms:.0f} ms" for at, ms in during if ms > 4))
    during = [share for at, share in steal if t0 <= at <= t0 + args.seconds]
    if during:
        print(f"  steal: mean {100 * sum(during) / len(during):.1f}%,"
              f" worst 0.1 s {100 * max(during):.1f}% of the CPUs")
    catching_up = None
    if "paused" in captured:
        catching_up = _print_catch_up(times, t0, *captured.pop("paused"))
    if "cycle_log" in captured:
        _print_calls(captured["cycle_log"] / f"cycles-{captured['worker_pid']}.txt", t0,
                     args.seconds, late_at, catching_up)


def _print_catch_up(
    times: list[Any], t0: float, stopped: float, continued: float
) -> tuple[float, float]:
    """When the worker, stopped for a while, had worked off what piled up meanwhile: the first
    message enqueued after it went on that was claimed within 10 ms (claims take the oldest
    first, so by then the backlog was gone). Returns (went on, caught up)."""
    prompt = [t["enqueued"] for t in times
              if t["enqueued"] >= continued and (t["claimed"] - t["enqueued"]) * 1000 <= 10]
    paused = f"  worker stopped from {stopped - t0:+.2f} to {continued - t0:+.2f} s;"
    if not prompt:
        last = times[-1]["enqueued"]
        print(f"{paused} not caught up by the run's last message ({last - t0:+.2f} s)")
        return continued, last
    caught_up = min(prompt)
    print(f"{paused} caught up at {caught_up - t0:+.2f} s, {caught_up - continued:.2f} s after"
          " it went on (the first message enqueued after that was claimed within 10 ms)")
    return continued, caught_up


def _print_calls(
    path: pathlib.Path,
    t0: float,
    seconds: float,
    late_at: list[float],
    catching_up: tuple[float, float] | None,
) -> None:
    """The worker's calls (bench/cycle_log) per 0.1 s: how many, how many messages they
    claimed and how many came back full (a backlog), and how long they took; for the whole
    run, while it caught up after a pause (its rate with a backlog, the producer still
    sending), and each tenth of a second from 0.3 s before the late messages to 0.3 s after.
    For the first two also how busy its pipeline was: calls in flight on average, and the
    time from one call's end to the next call's start (the worker's turnaround)."""
    calls = [tuple(map(float, line.split())) for line in path.read_text().splitlines()]
    calls = [c for c in calls if t0 <= c[0] <= t0 + seconds]
    tenths: dict[int, list[tuple[float, ...]]] = collections.defaultdict(list)
    for call in calls:
        tenths[int((call[0] - t0) * 10)].append(call)

    def describe(group: list[tuple[float, ...]]) -> str:
        took = sorted(c[1] / 1000 for c in group)
        return (f"{len(group)} calls, {sum(c[4] for c in group):,.0f} claimed,"
                f" {sum(c[4] == c[3] for c in group)} full, call p50 {bench._ms(took, 0.5)}"
                f" ms, max {bench._ms(took, 1.0)} ms")

    def pipeline(group: list[tuple[float, ...]], span: float) -> str:
        starts = sorted(c[0] for c in group)
        gaps = sorted(starts[i] - end for end in (c[0] + c[1] / 1000 for c in group)
                      if (i := bisect.bisect_left(starts, end)) < len(starts))
        return (f"{sum(c[1] for c in group) / 1000 / span:.2f} calls in flight on average,"
                f" a call's end to the next call's start p50 {bench._ms(gaps, 0.5)} ms,"
                f" p90 {bench._ms(gaps, 0.9)} ms")

    if calls:
        print(f"  the worker's calls over the run, per 0.1 s: {len(calls) / seconds / 10:.0f}"
              f" calls, {sum(c[4] for c in calls) / seconds / 10:.0f} claimed; in all:"
              f" {describe(calls)}; {pipeline(calls, seconds)}")
    if catching_up is not None and catching_up[1] - catching_up[0] >= 0.2:
        went_on, caught_up = catching_up
        backlog = [c for c in calls if went_on <= c[0] <= caught_up]
        print(f"  while it worked off the backlog, {caught_up - went_on:.2f} s:"
              f" {describe(backlog)}; {sum(c[4] for c in backlog) / (caught_up - went_on):,.0f}"
              f" claimed a second; {pipeline(backlog, caught_up - went_on)}")
    shown = sorted({t + d for t in (int((at - t0) * 10) for at in late_at) for d in range(-3, 4)})
    for tenth in shown:
        if tenths.get(tenth):
            print(f"    +{tenth / 10:.1f} s: {describe(tenths[tenth])}")


def _print_waits(waits: list[tuple[float, list[str]]], t0: float, seconds: float, label: str,
                 inside: Callable[[float], bool]) -> None:
    """The queue backends' wait events per sample, in the samples ``inside`` picks and in the
    rest of the run."""
    for name, wanted in ((label, True), ("the rest of the run", False)):
        samples = [seen for at, seen in waits if t0 <= at <= t0 + seconds and inside(at) == wanted]
        counted = collections.Counter(w for seen in samples for w in seen)
        print(f"  active queue backends per sample, {name} ({len(samples)} samples):",
              ", ".join(f"{w} {n / max(len(samples), 1):.2f}" for w, n in counted.most_common(6)))


async def soak(args: argparse.Namespace) -> None:
    """One ``fleet worker --handler noop`` process takes ``--messages`` messages in chunks (each
    enqueued at once, in 500 sessions, then drained before the next), and nothing finished is
    ever deleted: per chunk, how long its drain took, the worker's resident memory, and what
    one claim costs on the emptied queue (EXPLAIN ANALYZE, rolled back: buffers and time) with
    the size of the claimable-heads index. The questions: does a worker's memory grow with the
    messages it has handled, and does the queue slow down as it goes (finished rows piling up;
    the dead index entries each claim leaves until a VACUUM removes them, BENCHMARKS.md
    2026-12-07). ``--no-autovacuum`` turns autovacuum off for fleet.messages, to see the
    second without it."""
    async with scratch() as (url, conn):
        if args.no_autovacuum:
            await conn.execute("ALTER TABLE fleet.messages SET (autovacuum_enabled = false)")
        async with noop_worker(url) as worker:
            process = psutil.Process(worker.popen.pid)
            print(f"worker pid {worker.popen.pid}, resident at start"
                  f" {process.memory_info().rss / 2**20:.1f} MiB", flush=True)
            handled = 0
            for chunk in range(args.messages // args.chunk):
                await conn.execute(
                    "SELECT count(fleet.enqueue('soak-' || $2::int || '-' || (g % 500), 'soak'))"
                    " FROM generate_series(1, $1) g", args.chunk, chunk)
                started = time.perf_counter()
                await drained(conn, worker)
                took = time.perf_counter() - started
                handled += args.chunk
                buffers, ms, pages = await _claim_on_empty_queue(conn)
                print(f"{handled:9,} handled: this chunk drained in {took:5.2f} s"
                      f" ({args.chunk / took:,.0f}/s), worker resident"
                      f" {process.memory_info().rss / 2**20:.1f} MiB; a claim now reads"
                      f" {buffers} buffers in {ms:.2f} ms, messages_claimable {pages} pages",
                      flush=True)


async def _claim_on_empty_queue(conn: asyncpg.Connection) -> tuple[int, float, int]:
    """The claim statement's shared buffers and execution time (rolled back), and the size of
    the index it reads, in pages."""
    tx = conn.transaction()
    await tx.start()
    try:
        explained = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + QUERIES["claim"],
            "soak", 10, 30.0, None, None)
        (plan,) = json.loads(explained)
    finally:
        await tx.rollback()
    top = plan["Plan"]
    buffers = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
    pages = await conn.fetchval(
        "SELECT pg_relation_size('fleet.messages_claimable') / current_setting('block_size')::int")
    return buffers, plan["Execution Time"], pages


def _print_wal_spikes(wal: list[tuple[float, float]], t0: float, seconds: float) -> None:
    """WAL written per tenth of a second of the run: the median, and the tenths over twice it."""
    per_tenth: dict[float, float] = collections.defaultdict(float)
    for (_, before), (at, after) in itertools.pairwise(wal):
        if 0 <= at - t0 <= seconds:
            per_tenth[round(at - t0, 1)] += after - before
    if not per_tenth:
        return
    median = sorted(per_tenth.values())[len(per_tenth) // 2]
    spikes = [(at, kb) for at, kb in sorted(per_tenth.items()) if kb > 2 * median]
    print(f"  WAL per 0.1 s: median {median / 1024:.0f} kB; over twice that:",
          ", ".join(f"{at}: {kb / 1024:.0f} kB" for at, kb in spikes) or "none")


async def history_reads(args: argparse.Namespace) -> None:
    """What the reads of `fleet status`, the metrics scrape and `fleet messages` cost beside a
    long history: finished messages (inserted directly, done but for a few dead and cancelled
    ones among them), 1,000 waiting, and decided approvals, in growing steps. Each read is run
    twice under EXPLAIN (ANALYZE, BUFFERS), the second run reported (time and shared buffers;
    a parallel plan's time is wall time, on as many cores as it used). Last, how long `fleet
    prune` takes to delete the whole history."""
    from fleet.metrics_server import APPROVAL_BUCKETS

    def step_sql(table_rows: str) -> str:
        return f"INSERT INTO {table_rows} FROM generate_series($1::bigint, $2::bigint) g"

    finished_rows = step_sql(
        "fleet.messages (session_id, body, state, reply, error, finished_at)"
        " SELECT 's' || (g % 500), 'history', CASE WHEN g % 100000 = 1 THEN 'dead'"
        " WHEN g % 100000 = 2 THEN 'cancelled' ELSE 'done' END,"
        " CASE WHEN g % 100000 NOT IN (1, 2) THEN 'ok' END,"
        " CASE WHEN g % 100000 = 1 THEN 'boom' END, now()")
    approval_rows = step_sql(
        "run_states (conversation_id, tool, arguments, call_id, state, status, decision,"
        " decided_by, requested_at, decided_at, expires_at)"
        " SELECT 'history', 'issue_refund', '{}', 'c' || g, '{}', 'approved', 'approved',"
        " 'ana', now() - (g % 7200) * interval '1 second', now(), now() + interval '1 day'")
    reads = {
        "live_state_counts": (QUERIES["live_state_counts"], ()),
        "finished_state_counts": (QUERIES["finished_state_counts"], ()),
        "fleet messages --state dead": (QUERIES["list_messages"], ("dead", 100)),
        "fleet messages --state done": (QUERIES["list_messages"], ("done", 100)),
        "approvals_pending": (METRICS["approvals_pending"], ()),
        "approvals_decided": (METRICS["approvals_decided"], (list(APPROVAL_BUCKETS),)),
    }
    async with scratch() as (_, conn):
        await conn.execute("INSERT INTO fleet.sessions (session_id)"
                           " SELECT 's' || g FROM generate_series(0, 499) g")
        await conn.execute("INSERT INTO conversations (session_id, user_id)"
                           " VALUES ('history', 'probe')")
        await conn.execute("SELECT count(fleet.enqueue('s' || (g % 500), 'waiting'))"
                           " FROM generate_series(1, 1000) g")
        finished = approvals = 0
        for to_finished, to_approvals in itertools.zip_longest(
                args.finished, args.approvals, fillvalue=None):
            if to_finished is not None and to_finished > finished:
                await conn.execute(finished_rows, finished + 1, to_finished)
                finished = to_finished
            if to_approvals is not None and to_approvals > approvals:
                await conn.execute(approval_rows, approvals + 1, to_approvals)
                approvals = to_approvals
            await conn.execute("VACUUM ANALYZE fleet.messages, run_states")
            print(f"{finished:,} finished messages, 1,000 waiting, {approvals:,} decided"
                  " approvals:", flush=True)
            for label, (sql, params) in reads.items():
                print(f"  {label}: {await _explained(conn, sql, params)}", flush=True)
            before_0024 = conn.transaction()  # the index dropped, then rolled back
            await before_0024.start()
            try:
                await conn.execute("DROP INDEX fleet.messages_failed")
                listed = await _explained(conn, QUERIES["list_messages"], ("dead", 100))
                print(f"  fleet messages --state dead without messages_failed: {listed}",
                      flush=True)
            finally:
                await before_0024.rollback()
        # Then the history goes: fleet prune's batches (10,000 a transaction), timed.
        started = time.perf_counter()
        pruned = await fleet_queue.prune_finished(conn, datetime.timedelta(0))
        took = time.perf_counter() - started
        print(f"fleet prune of every finished message: {pruned:,} in {took:.1f} s"
              f" ({took / max(pruned, 1) * 1e6:.1f} us each)", flush=True)


async def _explained(conn: asyncpg.Connection, sql: str, params: tuple[Any, ...]) -> str:
    """The second of two EXPLAIN (ANALYZE, BUFFERS) runs: its execution time and buffers."""
    for _ in range(2):
        plan = [r[0] for r in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *params)]
    took = next(line for line in plan if line.startswith("Execution Time"))
    buffers = next((line.strip() for line in plan if line.strip().startswith("Buffers:")),
                   "Buffers: none")
    return f"{took.split(': ')[1]}, {buffers}"


async def transport(args: argparse.Namespace) -> None:
    """The bench's in-process drains (ours one and 100 per session, PgQueuer's), each in a fresh
    scratch database, through the embedded server's loopback TCP and through its Unix socket,
    rounds alternating which goes first; medians of each. Runs on uvloop, as `fleet bench
    queue` does (main)."""
    from fleet.embedded import EmbeddedServer

    if Settings().database_url:
        raise SystemExit("transport compares the embedded server's listeners: unset DATABASE_URL")
    server = EmbeddedServer(Settings())
    server.ensure_running()
    status = server.status()
    assert status.port is not None and status.url is not None
    urls = {"tcp": server.url(status.port), "socket": status.url}
    if urls["tcp"] == urls["socket"]:
        raise SystemExit("the embedded server has no Unix socket (FLEET_HOME too deep?)")
    runs: dict[tuple[str, str], list[bench._DrainRun]] = collections.defaultdict(list)
    for rnd in range(args.rounds):
        for kind in ("tcp", "socket") if rnd % 2 == 0 else ("socket", "tcp"):
            qb = bench.QueueBench(Settings(database_url=urls[kind]),
                                  bench.QueueBenchConfig(messages=args.messages))
            async with qb.opened():
                for layout in ("one-per-session", "many-per-session"):
                    runs[kind, layout].append(await qb._fleet_drain_once(layout, None))
                qb.pgq_conn = await asyncpg.connect(qb.url)
                try:
                    await qb._pgq_install()
                    runs[kind, "pgqueuer"].append(await qb._pgq_drain_once())
                finally:
                    await qb.pgq_conn.close()
            for what in ("one-per-session", "many-per-session", "pgqueuer"):
                print(f"round {rnd + 1}, {kind}, {what}: {runs[kind, what][-1].describe()}",
                      flush=True)
    for (kind, what), done in sorted(runs.items()):
        print(f"{kind} {what}: median {statistics.median(r.rate for r in done):,.0f}/s;"
              f" worker {', '.join(f'{r.worker_cpu * 1e6:.0f}' for r in done)} us,"
              f" PostgreSQL {', '.join(f'{r.postgres_cpu * 1e6:.0f}' for r in done)} us"
              " per message")


#: The rows of fleet.messages that backends wait to lock, as they are now (their state).
ROW_LOCK_WAITS = """
SELECT m.state
FROM pg_locks l
JOIN pg_stat_activity w USING (pid)
LEFT JOIN fleet.messages m ON m.ctid = format('(%s,%s)', l.page, l.tuple)::tid
WHERE w.datname = current_database() AND w.wait_event_type = 'Lock'
  AND l.locktype = 'tuple' AND l.granted AND l.relation = 'fleet.messages'::regclass
"""


def _machine_ticks() -> tuple[int, int]:
    """All CPU ticks of the machine and its idle ones (idle + iowait), from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


async def drain_waits(args: argparse.Namespace) -> None:
    """What `fleet worker --drain` processes and their backends wait on: P no-op worker
    processes (as the bench's scaling drains: concurrency 20, claims of 10; handlers that take
    --work-delay) drain a backlog while `pg_stat_activity` is sampled every 10 ms for two
    seconds mid-drain. Reports the rate, how many of the machine's cores were busy (the
    sampling's own cost included), the backends per sample in each state and wait event, and
    the state of the fleet.messages rows that backends waited to lock (recheck-lock shows
    why running ones are waited for)."""
    cores = os.cpu_count() or 1
    async with scratch() as (url, conn):
        me = conn.get_server_pid()
        for rnd in range(args.rounds):
            for processes in args.processes:
                sessions = args.sessions or args.messages
                await bench.fill(conn, args.messages, sessions)
                env = dict(os.environ, DATABASE_URL=url, FLEET_LOG_LEVEL="WARNING")
                command = ["fleet", "worker", "--handler", "noop", "--drain", "--concurrency",
                           str(args.concurrency), "--claim-batch", "10",
                           "--work-delay", str(args.work_delay)]
                workers = [bench._Process(command, env) for _ in range(processes)]
                waits: collections.Counter[str] = collections.Counter()
                locked_rows: collections.Counter[str] = collections.Counter()
                samples = 0
                try:
                    await asyncio.sleep(1.0)
                    ticks, idle = _machine_ticks()
                    end = time.monotonic() + 2.0
                    while time.monotonic() < end:
                        rows = await conn.fetch(
                            "SELECT state, wait_event_type, wait_event FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> $1"
                            " AND backend_type = 'client backend'", me)
                        samples += 1
                        for row in rows:
                            waits[f"{row['state']} {row['wait_event_type'] or 'CPU'}"
                                  f":{row['wait_event'] or '-'}"] += 1
                        if any(row["wait_event_type"] == "Lock" for row in rows):
                            for lock in await conn.fetch(ROW_LOCK_WAITS):
                                locked_rows[f"{lock['state']} row" if lock["state"]
                                            else "row version no longer live"] += 1
                        await asyncio.sleep(0.01)
                    ticks_after, idle_after = _machine_ticks()
                    if not await conn.fetchval(
                            "SELECT EXISTS (SELECT 1 FROM fleet.messages WHERE state = 'queued')"):
                        print("  (the drain ended before the sampling did: give more --messages)")
                    for worker in workers:
                        if await worker.wait(bench.PHASE_TIMEOUT) != 0:
                            raise RuntimeError(f"fleet worker failed: {worker.tail()}")
                finally:
                    for worker in workers:
                        worker.finish()
                rate, _, ok = await bench.drain_stats(conn, args.messages)
                assert ok, "not every message ended done"
                busy = cores * (1 - (idle_after - idle) / max(ticks_after - ticks, 1))
                print(f"round {rnd + 1}, {processes} process(es), {args.messages // sessions}"
                      f" per session, handlers of {args.work_delay * 1000:g} ms: {rate:,.0f}/s,"
                      f" {busy:.2f} of {cores} cores busy; backends per sample ({samples}"
                      " samples):", flush=True)
                for what, n in waits.most_common():
                    if n / samples >= 0.005:
                        print(f"    {n / samples:.2f} {what}")
                for what, n in locked_rows.most_common():
                    print(f"    waiting on a {what}: {n} of the samples' waiters")


async def recheck_lock(_: argparse.Namespace) -> None:
    """The row lock behind drain-waits' waits, step by step: claim B looks for a head while
    claim A holds message 1 uncommitted; A commits; B's recheck of message 1 (now running)
    rejects it and B takes message 2. Does B still hold a lock on message 1? A finish of
    message 1 is then tried with a 500 ms lock_timeout. B waits here (no SKIP LOCKED) only to
    order the steps; with SKIP LOCKED, a claim whose snapshot is older than A's commit locks
    the row the same way."""
    async with scratch() as (url, conn):
        await conn.execute("SELECT fleet.enqueue('s1', 'one'), fleet.enqueue('s2', 'two')")
        a, b = await asyncpg.connect(url), await asyncpg.connect(url)
        try:
            first, second = a.transaction(), b.transaction()
            await first.start()
            await a.execute(
                "UPDATE fleet.messages SET state = 'running', lease_token = 1,"
                " lease_expires_at = now() + interval '1 minute' WHERE id = 1")
            await second.start()
            claim = asyncio.ensure_future(b.fetch(
                "SELECT id FROM fleet.messages WHERE state = 'queued' AND is_head"
                " ORDER BY run_after, id LIMIT 1 FOR UPDATE"))
            await asyncio.sleep(0.3)
            await first.commit()
            print(f"claim B took message {(await claim)[0]['id']} (message 1 failed its recheck)")
            try:
                await conn.execute(
                    "SET lock_timeout = '500ms'; UPDATE fleet.messages SET state = 'done',"
                    " reply = 'ok', is_head = false WHERE id = 1; RESET lock_timeout")
                print("the finish of message 1 went through: B kept no lock on it")
            except asyncpg.LockNotAvailableError:
                print("the finish of message 1 waited 500 ms and gave up: B still holds a lock"
                      " on the row it rejected, until B commits")
            await second.rollback()
        finally:
            await a.close()
            await b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("enqueue-cost")
    cost.add_argument("--batch", type=int, default=9)
    cost.add_argument("--messages", type=int, default=20_000)
    cost.add_argument("--rounds", type=int, default=2)
    cycle = commands.add_parser("cycle-cost")
    cycle.add_argument("--messages", type=int, default=20_000)
    cycle.add_argument("--batch", type=int, default=10)
    cycle.add_argument("--rounds", type=int, default=2)
    split = commands.add_parser("cycle-split")
    split.add_argument("--rounds", type=int, default=2)
    ceiling = commands.add_parser("cycle-ceiling")
    ceiling.add_argument("--rounds", type=int, default=2)
    ceiling.add_argument("--connections", type=int, nargs="+", default=[1, 2, 3])
    for name in ("session-id-check", "first-call", "after-vacuum", "heartbeat", "analyze-cost",
                 "repair-heads"):
        commands.add_parser(name)
    stale = commands.add_parser("stale-stats")
    stale.add_argument("--history", type=int, default=30_000)
    stale.add_argument("--waiting", type=int, default=30_000)
    stale.add_argument("--sessions", type=int, default=500)
    soaked = commands.add_parser("soak")
    soaked.add_argument("--messages", type=int, default=600_000)
    soaked.add_argument("--chunk", type=int, default=30_000)
    soaked.add_argument("--no-autovacuum", action="store_true")
    history = commands.add_parser("history-reads")
    history.add_argument("--finished", type=int, nargs="+", default=[1_000_000, 3_000_000])
    history.add_argument("--approvals", type=int, nargs="+", default=[100_000, 300_000])
    wire = commands.add_parser("transport")
    wire.add_argument("--rounds", type=int, default=4)
    wire.add_argument("--messages", type=int, default=20_000)
    trace = commands.add_parser("sustained-trace")
    trace.add_argument("--rate", type=float, default=3000.0)
    trace.add_argument("--seconds", type=float, default=10.0)
    trace.add_argument("--runs", type=int, default=3)
    trace.add_argument("--no-autovacuum", action="store_true")
    trace.add_argument("--watch-fsync", action="store_true",
                       help="flush a probe file under FLEET_HOME every 2 ms; report its flush"
                            " times and the slow flushes")
    trace.add_argument("--cycle-log", action="store_true",
                       help="log the worker's every call (bench/cycle_log) and show them"
                            " around the late messages")
    trace.add_argument("--pause-worker", type=float, nargs=2, metavar=("AT", "SECONDS"),
                       help="stop the worker process AT s into the measured load for SECONDS s"
                            " and report when it has caught up")
    trace.add_argument("--analyze-after", type=float, default=None,
                       help="ANALYZE fleet.messages by hand this many seconds after setup starts")
    trace.add_argument("--vacuum-after", type=float, default=None,
                       help="VACUUM ANALYZE the queue tables by hand this many seconds after"
                            " setup starts")
    trace.add_argument("--vacuum-command",
                       default="VACUUM ANALYZE fleet.sessions, fleet.messages",
                       help="what --vacuum-after runs (default: what autovacuum does to the"
                            " queue tables)")
    trace.add_argument("--vacuum-cost-delay", type=float, default=2.0,
                       help="that VACUUM's cost delay in ms (autovacuum's default: 2)")
    commands.add_parser("recheck-lock")
    waited = commands.add_parser("drain-waits")
    waited.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    waited.add_argument("--rounds", type=int, default=2)
    waited.add_argument("--messages", type=int, default=60_000)
    waited.add_argument("--sessions", type=int, default=None,
                        help="sessions the messages are spread over (default: one each)")
    waited.add_argument("--work-delay", type=float, default=0.0,
                        help="each handler's time in seconds (fleet worker --work-delay)")
    waited.add_argument("--concurrency", type=int, default=20,
                        help="each worker's messages in flight (fleet worker --concurrency)")
    args = parser.parse_args()
    probe = {"enqueue-cost": enqueue_cost, "session-id-check": session_id_check,
             "first-call": first_call, "after-vacuum": after_vacuum, "heartbeat": heartbeat,
             "analyze-cost": analyze_cost,
             "sustained-trace": sustained_trace, "cycle-cost": cycle_cost,
             "cycle-split": cycle_split, "cycle-ceiling": cycle_ceiling,
             "repair-heads": repair_heads, "stale-stats": stale_stats, "soak": soak,
             "history-reads": history_reads, "transport": transport,
             "drain-waits": drain_waits, "recheck-lock": recheck_lock}[args.command]
    if args.command == "transport":  # its drains are the bench's, so is its event loop
        from fleet.cli.app import run

        run(lambda: probe(args))
    else:
        asyncio.run(probe(args))


if __name__ == "__main__":
    main()
