"""``fleet bench queue``: how fast the queue drains a backlog and how soon it picks up new work.

Everything runs against one PostgreSQL server (the embedded one, or ``DATABASE_URL``), in a
scratch database this harness creates, migrates and drops, so a benchmark never touches the
fleet's own data. The phases:

* **drain**: ``N`` no-op messages are enqueued (one per session, then ``N/S`` per session over
  ``S`` sessions), then real :class:`fleet.worker.Worker` objects with :class:`NoopHandler` drain
  them: in this process, and as ``fleet worker --handler noop --drain`` subprocesses. The rate is
  taken from the database (first claim to last completion), so process start-up is not counted;
  the "steady" rate counts the middle 80% of completions only.
* **PgQueuer**: PgQueuer 1.6's ``QueueManager`` drains ``N`` no-op jobs the same way (its own
  schema installed in the same scratch database, its default ``durable`` tables, the same claim
  batch size), timed from its log table the same way.
* **scaling**: the drain with 1 and with ``P`` worker processes.
* **sustained**: an open-loop producer enqueues at half the measured single-process peak
  while one worker process runs (each transaction carries the messages that fell due since the
  last one, in one ``fleet.enqueue_many``: one at a time at low rates, more when commits are
  slow), each message in a new session and then spread over ``S`` sessions in turn (a message
  then waits behind its session's previous one), at half that layout's peak; the enqueue-to-claim
  latency (``claimed_at - enqueued_at``) percentiles come from ``fleet.messages``. PgQueuer
  gets the same treatment at half its own peak (``picked`` minus ``queued`` in its log).
  ``--repeat`` repeats these runs too; the summary's p99 is over every message of every run.
* **claim plans**: ``EXPLAIN (ANALYZE, BUFFERS)`` of the claim statement on large backlogs, to
  check that its cost follows the batch size, not the backlog.

The SQL the harness itself runs (bulk enqueue, statistics) is kept in the constants below; the
queue's own statements come from ``queue_sql/`` untouched.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse, urlunparse

import asyncpg
import psutil
from pydantic import BaseModel, Field

from fleet import queue
from fleet.database import connect, create_pool, resolve_url
from fleet.handlers import NoopHandler
from fleet.migrate import migrate
from fleet.settings import PROJECT_ROOT, Settings
from fleet.sql import queries
from fleet.worker import Worker

log = logging.getLogger("fleet.bench.queue")

BODY = "bench"
PGQ_ENTRYPOINT = "noop"
ENQUEUE_CHUNK = 5_000
#: Seconds a phase may take before the harness gives up on it (a stuck worker, say).
PHASE_TIMEOUT = 600.0
#: Load at the sustained rate before each sustained run, not measured: a worker's pool
#: connections are opened at its start but each plans the queue's statements at its first
#: call (7-11 ms against 1.2-1.5 ms afterwards, ``bench/queue_probes.py first-call``), which
#: showed in a measured second as a backlog. Both systems get it.
SUSTAIN_WARMUP_SECONDS = 1.0

#: Length of one peak-load run (after its warm-up), and its closed-loop producer's limits: it
#: keeps about twice the worker's in-flight cap waiting (so a claim never finds less than a
#: full batch), in transactions of at most PEAK_LOAD_PER_COMMIT messages (our sustained
#: producer committed 7-21 a transaction at 6,300-7,700/s in 2026-12-08's runs; how many the
#: closed-loop one commits at a time is not reported).
PEAK_LOAD_SECONDS = 4.0
PEAK_LOAD_PER_COMMIT = 16

Layout = Literal["one-per-session", "many-per-session", "no sessions"]
Peak = Literal["load", "drain"]

# -- the harness's own SQL ---------------------------------------------------------------------

#: Messages $1..$2 of a backlog, message g in session (g - 1) % $3, through fleet.enqueue.
FLEET_BULK_ENQUEUE = """
SELECT count(fleet.enqueue(session_id => 's' || ((g - 1) % $3)::text, body => 'bench'))
FROM generate_series($1::int, $2::int) AS g
"""

#: History without the wait: every message finished as a worker would have left it.
FLEET_FINISH_ALL = """
UPDATE fleet.messages SET state = 'done', reply = 'ok', is_head = false,
       claimed_at = clock_timestamp(), finished_at = clock_timestamp()
"""

FLEET_RESET = "TRUNCATE fleet.messages, fleet.sessions, fleet.workers RESTART IDENTITY CASCADE"

#: Drain figures of fleet.messages: the window from first claim to last completion, and the
#: window of the middle 80% of completions (start-up and tail left out).
FLEET_DRAIN_STATS = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE state = 'done' AND reply = 'ok') AS done,
       extract(epoch FROM max(finished_at) - min(claimed_at))::float8 AS window_seconds,
       extract(epoch FROM percentile_disc(0.9) WITHIN GROUP (ORDER BY finished_at)
                        - percentile_disc(0.1) WITHIN GROUP (ORDER BY finished_at))::float8
           AS steady_seconds
FROM fleet.messages
"""

FLEET_LATENCY = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE state = 'done' AND reply = 'ok') AS done,
       percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (
           ORDER BY extract(epoch FROM claimed_at - enqueued_at)::float8) AS quantiles,
       max(extract(epoch FROM claimed_at - enqueued_at))::float8 AS max_seconds
FROM fleet.messages
WHERE id > $1
"""

#: Per message of a sustained run, in enqueue order: when enqueued and when claimed (epoch s).
FLEET_TIMES = """
SELECT extract(epoch FROM enqueued_at)::float8 AS enqueued,
       extract(epoch FROM claimed_at)::float8 AS claimed
FROM fleet.messages WHERE id > $1 ORDER BY id
"""

FLEET_UNFINISHED = "SELECT count(*) FROM fleet.messages WHERE state NOT IN ('done', 'dead')"
FLEET_WAITING = "SELECT count(*) FROM fleet.messages WHERE state = 'queued'"
FLEET_CLAIMED_BETWEEN = (
    "SELECT count(*) FROM fleet.messages WHERE claimed_at >= $1 AND claimed_at < $2"
)

PGQ_RESET = "TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics RESTART IDENTITY"

PGQ_DRAIN_STATS = """
SELECT (SELECT count(*) FROM pgqueuer) AS left_in_queue,
       count(*) FILTER (WHERE status = 'successful') AS done,
       extract(epoch FROM max(created) FILTER (WHERE status = 'successful')
                        - min(created) FILTER (WHERE status = 'picked'))::float8 AS window_seconds,
       extract(epoch FROM
           percentile_disc(0.9) WITHIN GROUP (ORDER BY created)
               FILTER (WHERE status = 'successful')
         - percentile_disc(0.1) WITHIN GROUP (ORDER BY created)
               FILTER (WHERE status = 'successful'))::float8 AS steady_seconds
FROM pgqueuer_log
"""

PGQ_LATENCY = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM pgqueuer_log d
                                      WHERE d.job_id = q.job_id AND d.status = 'successful'))
           AS done,
       percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (
           ORDER BY extract(epoch FROM p.created - q.created)::float8) AS quantiles,
       max(extract(epoch FROM p.created - q.created))::float8 AS max_seconds
FROM pgqueuer_log q
JOIN pgqueuer_log p ON p.job_id = q.job_id AND p.status = 'picked'
WHERE q.status = 'queued' AND q.job_id > $1
"""

PGQ_TIMES = """
SELECT extract(epoch FROM q.created)::float8 AS enqueued,
       extract(epoch FROM p.created)::float8 AS claimed
FROM pgqueuer_log q
JOIN pgqueuer_log p ON p.job_id = q.job_id AND p.status = 'picked'
WHERE q.status = 'queued' AND q.job_id > $1
ORDER BY q.job_id
"""

PGQ_UNFINISHED = "SELECT count(*) FROM pgqueuer"
PGQ_WAITING = "SELECT count(*) FROM pgqueuer WHERE status = 'queued'"
PGQ_CLAIMED_BETWEEN = """
SELECT count(*) FROM pgqueuer_log WHERE status = 'picked' AND created >= $1 AND created < $2
"""


# -- configuration and report ------------------------------------------------------------------


class QueueBenchConfig(BaseModel):
    """What ``fleet bench queue`` runs."""

    messages: int = Field(20_000, ge=1)
    """Messages per drain."""
    sessions: int = Field(200, ge=1)
    """Sessions of the many-per-session drain (the one-per-session drain uses ``messages``)."""
    batch: int = Field(10, ge=1)
    """Claim batch size: our worker's ``--claim-batch`` and PgQueuer's ``batch_size``."""
    concurrency: int | None = Field(None, ge=1)
    """Our worker's ``--concurrency`` (messages in flight at most); default twice ``batch``,
    the least PgQueuer accepts for its own cap (``max_concurrent_tasks >= 2 * batch_size``),
    so the next claim runs while the last batch's handlers do. PgQueuer runs uncapped."""
    processes: int = Field(2, ge=2)
    """Worker processes of the scaling phase (compared with one)."""
    scaling_work_delay: float = Field(0.05, ge=0)
    """The scaling phase again with handlers that take this long (seconds; 0 skips it; 50 ms is
    the fleet-core acceptance test's ``--work-delay``): the fleet's real case, where handlers
    (agent turns) and not the queue's CPU bound a process."""
    sustain_seconds: float = Field(10.0, gt=0)
    """Length of each sustained-load run."""
    sustain_rate: float | None = Field(None, ge=0.1)
    """Messages/s of the sustained runs (both systems; rounded to 0.1/s); default half of each
    one's own peak (``sustain_peak``)."""
    sustain_peak: Peak = "load"
    """Which peak the sustained rate is half of. ``load``: the peak load, the highest rate at
    which a producer on the same machine enqueues and one worker process claims (measured by a
    closed-loop run, ``peak_loads``). ``drain``: a drain's steady rate with no producer (the
    method until 2026-12-08), near what the machine carries once the producer's own work is
    added (BENCHMARKS.md)."""
    repeat: int = Field(1, ge=1)
    """Runs of each drain (the report keeps every rate and uses the median) and of each
    sustained run (the summary's p99 is over all their messages)."""
    explain_backlog: int = Field(50_000, ge=0)
    """Backlog for the EXPLAIN ANALYZE of the claim; 0 skips that phase."""
    skip_pgqueuer: bool = False


class DrainResult(BaseModel):
    system: Literal["pgfleet", "pgqueuer"]
    runner: str
    """``in-process`` or ``N process(es)``."""
    layout: Layout
    messages: int
    sessions: int | None
    batch: int
    concurrency: int | None
    """Our worker's in-flight cap (PgQueuer: None, uncapped)."""
    processes: int
    messages_per_second: float
    """Median over the runs of messages / (last completion - first claim)."""
    steady_messages_per_second: float
    """Median over the runs of the middle 80% of completions / the time they took."""
    wall_seconds: float
    """Median wall-clock time of a run, worker start-up included."""
    rates: list[float]
    """messages_per_second of every run."""
    worker_cpu_us: float
    """Median CPU time per message of the worker process(es) (in-process: this process;
    subprocesses: less what an idle ``fleet worker --drain`` costs to start and stop)."""
    postgres_cpu_us: float | None
    """Median CPU time per message of the PostgreSQL backends serving the scratch database
    (None when the server is not on this machine). With the line above: the cost of a message,
    which on a machine shared with other work is steadier than the rate."""
    all_done: bool
    """Every message of every run ended done with reply ``ok`` (PgQueuer: logged successful)."""
    load_before: float
    """1-minute load average before the first run (2 cores: 2.0 means both busy)."""
    steal_percent: list[float]
    """Per run, the machine's CPU time the hypervisor stole, in % (a slow run on a shared
    host is usually a run with steal)."""


class SustainedResult(BaseModel):
    system: Literal["pgfleet", "pgqueuer"]
    layout: Layout
    """pgfleet: each message in a new session, or spread over ``sessions`` sessions in turn
    (a message then waits for its session's previous one to finish); PgQueuer: no sessions."""
    target_rate: float
    achieved_rate: float
    messages_per_commit: float
    """Mean messages per producer transaction (1.0: one message per transaction throughout)."""
    seconds: float
    messages: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    commit_p50_ms: float
    """Enqueue to the producer seeing its transaction committed (the message's own commit)."""
    commit_p99_ms: float
    pickup_p50_ms: float
    """Commit seen by the producer to claimed (wake-up and claim; can be slightly negative when
    the worker claims before the producer reads its commit's reply)."""
    pickup_p99_ms: float
    all_done: bool
    load_before: float
    steal_percent: float
    """The machine's CPU time the hypervisor stole during the measured run, in %."""
    worker_cpu_us: float
    """The worker process's CPU per message during the measured run (and until it was idle)."""
    postgres_cpu_us: float
    """The scratch database's PostgreSQL processes' CPU per message over the same time: the
    producer's backend, the worker's, an autovacuum that ran a second or more. Beside the
    rate's target it says whether a slow run was one where the same work cost more CPU (the
    host slower) or not."""


class PeakLoadResult(BaseModel):
    system: Literal["pgfleet", "pgqueuer"]
    layout: Layout
    messages_per_second: float
    """Median over the runs: messages the worker claimed a second while a closed-loop producer
    on the same machine kept about ``waiting`` messages waiting for it."""
    rates: list[float]
    waiting: int
    load_before: float
    steal_percent: list[float]


class ClaimPlan(BaseModel):
    case: str
    backlog: int
    claimable: int
    """Claimable heads in the backlog (the partial index's size)."""
    batch: int
    claimed: int
    execution_ms: float
    """Median of three EXPLAIN ANALYZE runs (each rolled back)."""
    shared_buffers: int
    """Shared buffers hit or read by the statement."""
    index_rows: int
    """Index entries the plan read (summed over index scan nodes)."""
    indexes: list[str]


class QueueBenchReport(BaseModel):
    config: QueueBenchConfig
    environment: dict[str, Any]
    drains: list[DrainResult] = Field(default_factory=list)
    peak_loads: list[PeakLoadResult] = Field(default_factory=list)
    sustained: list[SustainedResult] = Field(default_factory=list)
    claim_plans: list[ClaimPlan] = Field(default_factory=list)
    summary: dict[str, Any] = Field(default_factory=dict)
    all_done: bool = True


# -- helpers -----------------------------------------------------------------------------------


def _with_database(url: str, database: str) -> str:
    return urlunparse(urlparse(url)._replace(path=f"/{database}"))


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def host_cpu_ticks() -> tuple[int, int]:
    """(stolen, all) CPU ticks of the whole machine since boot, from ``/proc/stat``; (0, 0)
    without it. On a shared virtual machine the hypervisor's steal, more than anything of ours,
    decides whether a run is slow, so every run reports its share (BENCHMARKS.md)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0, 0
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    ticks = [int(field) for field in first[1:9]]
    return ticks[7], sum(ticks)


def steal_percent_since(before: tuple[int, int]) -> float:
    """The share of the machine's CPU time stolen since ``before`` (``host_cpu_ticks()``)."""
    stolen, total = host_cpu_ticks()
    return round(100 * (stolen - before[0]) / max(total - before[1], 1), 1)


def _ms(ordered: list[float], q: float) -> float:
    """Quantile ``q`` of sorted seconds, in milliseconds."""
    if not ordered:
        return 0.0
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000, 2)


def _runner(processes: int, work_delay: float) -> str:
    """How a drain ran: worker processes, and how long each handler took if not no-op."""
    runner = f"{processes} process(es)"
    return f"{runner}, {work_delay * 1000:g} ms handlers" if work_delay else runner


def commit_times(commits: list[tuple[int, float]]) -> list[float]:
    """When the producer saw each message's transaction commit, message by message in enqueue
    order, from its ``(messages sent so far, commit time)`` pairs."""
    committed_at: list[float] = []
    for end, at in commits:
        committed_at.extend([at] * (end - len(committed_at)))
    return committed_at


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


async def fill(conn: asyncpg.Connection, messages: int, sessions: int) -> None:
    """An empty queue, then ``messages`` no-op messages over ``sessions`` sessions
    (interleaved), analyzed and checkpointed: the backlog every pgfleet drain starts from."""
    await conn.execute(FLEET_RESET)
    for first in range(1, messages + 1, ENQUEUE_CHUNK):
        last = min(first + ENQUEUE_CHUNK - 1, messages)
        await conn.fetchval(FLEET_BULK_ENQUEUE, first, last, sessions)
    await conn.execute("ANALYZE fleet.messages")
    await _checkpoint(conn)


async def drain_stats(conn: asyncpg.Connection, messages: int) -> tuple[float, float, bool]:
    """A drain of ``messages`` fleet messages, from the table: its rate (first claim to last
    finish), its steady rate (the middle 80% of completions) and whether all ended done."""
    row = await conn.fetchrow(FLEET_DRAIN_STATS)
    ok = row["total"] == messages and row["done"] == messages
    window = max(row["window_seconds"] or 0.0, 1e-6)
    steady = max(row["steady_seconds"] or 0.0, 1e-6)
    return messages / window, 0.8 * messages / steady, ok


async def _checkpoint(conn: asyncpg.Connection) -> None:
    """Start each timed phase without a pending checkpoint from the previous one's writes."""
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


@contextlib.asynccontextmanager
async def scratch_database(settings: Settings) -> AsyncIterator[str]:
    """A freshly created and migrated database on the fleet's server, dropped afterwards."""
    base = await resolve_url(settings)
    name = f"fleet_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(base, server_settings={"application_name": "fleet-bench"})
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = _with_database(base, name)
        try:
            conn = await connect(_bench_settings(settings, url), "fleet-bench", url=url)
            try:
                await migrate(conn, _bench_settings(settings, url))
            finally:
                await conn.close()
            yield url
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _bench_settings(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"database_url": url})


@dataclass(frozen=True)
class _LoadRun:
    """A worker process of one system under a producer's load (the peak-load and sustained
    runs): its producer's two senders (warm-up and measured messages, numbered from 0) and
    how to tell the worker has nothing left."""

    system: Literal["pgfleet", "pgqueuer"]
    conn: asyncpg.Connection
    proc: _Process
    warm_send: Callable[[int, int], Awaitable[Any]]
    live_send: Callable[[int, int], Awaitable[Any]]
    unfinished_sql: str

    async def idle(self) -> bool:
        if self.proc.popen.poll() is not None:
            raise RuntimeError(f"the {self.system} worker exited: {self.proc.tail()}")
        return await self.conn.fetchval(self.unfinished_sql) == 0

    async def started(self) -> None:
        """The worker has finished the probe message, and its LISTEN connection is up."""
        await _wait_for(self.idle, f"the {self.system} worker to start", 60)
        await asyncio.sleep(1.0)  # its LISTEN connection is up well within this


@dataclass(frozen=True)
class _DrainRun:
    rate: float
    steady: float
    wall: float
    ok: bool
    worker_cpu: float
    """CPU seconds per message, worker side."""
    postgres_cpu: float
    """CPU seconds per message, PostgreSQL backends of the scratch database."""
    steal_percent: float
    """The machine's CPU time stolen by the hypervisor during the run, in %."""

    def describe(self) -> str:
        return (
            f"{self.rate:,.0f}/s (steady {self.steady:,.0f}/s), CPU per message: worker "
            f"{self.worker_cpu * 1e6:.0f} us, postgres {self.postgres_cpu * 1e6:.0f} us, "
            f"host steal {self.steal_percent:.1f}%"
        )


def _find_postmaster(backend_pid: int, database: str) -> psutil.Process | None:
    """The local postmaster whose backend ``backend_pid`` serves ``database``; None when the
    server runs elsewhere (the pid then names no such process here)."""
    try:
        backend = psutil.Process(backend_pid)
        if database not in " ".join(backend.cmdline()):
            return None
        return backend.parent()
    except psutil.Error:
        return None


class _CpuMeter:
    """CPU seconds a phase cost: this process, worker subprocesses it reaped, and the PostgreSQL
    processes whose title names the scratch database (its backends and autovacuum workers).

    Backends come and go with the workers' pools, so they are sampled every ``interval``
    seconds (50 ms); one started during the phase counts from zero, one that existed before
    counts from its first sample. The sampler runs in this process's event loop, beside the
    sustained phase's producer, which it would delay: there it samples once a second (its
    backends live through the run; an autovacuum shorter than that is missed).
    """

    def __init__(
        self, postmaster: psutil.Process | None, database: str, interval: float = 0.05
    ) -> None:
        self.postmaster = postmaster
        self.database = database
        self.interval = interval
        self.workers = 0.0
        self.postgres = 0.0
        self.steal_percent = 0.0
        self._host_before = (0, 0)
        self._seen: dict[int, tuple[float, float]] = {}
        self._others: set[int] = set()
        self._procs: dict[int, psutil.Process] = {}
        self._started = 0.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _own() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime

    def _children(self) -> list[int]:
        assert self.postmaster is not None
        pid = self.postmaster.pid
        try:  # Linux lists a process's children cheaply; psutil would scan every process
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return [p.pid for p in self.postmaster.children()]

    def _sample(self) -> None:
        if self.postmaster is None:
            return
        try:
            children = self._children()
        except psutil.Error:
            return
        for pid in children:
            if pid in self._others:
                continue
            try:
                proc = self._procs.get(pid)
                if proc is None:
                    proc = psutil.Process(pid)
                    if self.database not in " ".join(proc.cmdline()):
                        self._others.add(pid)
                        continue
                    self._procs[pid] = proc
                times = proc.cpu_times()
                used = times.user + times.system
                if pid not in self._seen:
                    first = 0.0 if proc.create_time() >= self._started else used
                    self._seen[pid] = (first, used)
                else:
                    self._seen[pid] = (self._seen[pid][0], used)
            except psutil.Error:
                continue

    async def _sampler(self) -> None:
        while not self._stop.is_set():
            self._sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    async def __aenter__(self) -> _CpuMeter:
        self._started = time.time()
        self._own_before = self._own()
        self._host_before = host_cpu_ticks()
        self._sample()
        self._task = asyncio.create_task(self._sampler())
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        self._sample()
        self.workers = self._own() - self._own_before
        self.postgres = sum(last - first for first, last in self._seen.values())
        self.steal_percent = steal_percent_since(self._host_before)


class _Process:
    """A worker subprocess with its output kept in a file (shown if it fails)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.output = tempfile.NamedTemporaryFile(
            prefix="fleet-bench-", suffix=".log", delete=False
        )
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, "-m", *args],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(self) -> str:
        self.output.flush()
        text = Path(self.output.name).read_text(errors="replace").strip().splitlines()
        return " / ".join(text[-5:])

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{' '.join(self.args)} did not finish in {timeout:.0f}s")
            await asyncio.sleep(0.02)
        return self.popen.returncode

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def finish(self) -> None:
        self.kill()
        self.output.close()
        Path(self.output.name).unlink(missing_ok=True)


async def _wait_for(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = PHASE_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"benchmark: timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a timed phase run in this process (collected
    first, on again after). This process holds every earlier phase's results, so a collection
    of its oldest generation takes 83-123 ms here (`bench/gc_timing` logs every process's
    collections; one of 123 ms landed among the in-process drains of a run, ours and
    PgQueuer's run in this process, 8% of a drain's 1.5 s), and it stopped the sustained
    phase's producer. A fleet worker process does not collect while it works
    (`fleet.gc_policy`; none did in a whole bench run), nor did PgQueuer's worker processes.
    Reference counting still frees what a phase allocates."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _produce(
    rate: float, seconds: float, send: Callable[[int, int], Awaitable[Any]]
) -> tuple[float, list[tuple[int, float]]]:
    """Open-loop producer: message i is due at ``i / rate`` s. One sender sends every message
    due so far in one transaction (``send(first, end)``), then looks again: at low rates that
    is one message per transaction, and when a commit is slow the next transaction carries
    what fell due meanwhile (group commit), so the schedule is kept. Returns the achieved rate
    and, per transaction, (messages sent so far, wall-clock time its commit was seen).

    It sends with the garbage collector paused (:func:`collector_paused`): a collection that
    stopped it for 110 ms made it send the 800 messages that had fallen due meanwhile in one
    transaction, and the run measured the queue draining a burst the load it was asked for
    never has."""
    total = max(int(rate * seconds), 1)
    loop = asyncio.get_running_loop()
    sent = 0
    commits: list[tuple[int, float]] = []
    with collector_paused():
        start = loop.time()
        while sent < total:
            due = min(total, int((loop.time() - start) * rate) + 1)
            if due > sent:
                await send(sent, due)
                commits.append((due, time.time()))
                sent = due
            else:
                await asyncio.sleep(max(start + sent / rate - loop.time(), 0.0))
    return total / (loop.time() - start), commits


async def _produce_closed(
    seconds: float,
    send: Callable[[int, int], Awaitable[Any]],
    waiting: Callable[[], Awaitable[int]],
    keep_waiting: int,
    first: int = 0,
) -> int:
    """Closed-loop producer, for the peak load: for ``seconds``, whenever fewer than
    ``keep_waiting`` messages wait for the worker (``waiting()``), it sends the difference, in
    transactions of at most PEAK_LOAD_PER_COMMIT messages. The worker then never waits for
    work and the producer never runs ahead of it: the rate both sustain together on this
    machine. Messages are numbered from ``first``; returns the number after the last sent."""
    loop = asyncio.get_running_loop()
    sent = first
    with collector_paused():
        end = loop.time() + seconds
        while loop.time() < end:
            room = keep_waiting - await waiting()
            if room <= 0:
                await asyncio.sleep(0.001)
            while room > 0 and loop.time() < end:
                batch = min(room, PEAK_LOAD_PER_COMMIT)
                await send(sent, sent + batch)
                sent += batch
                room -= batch
    return sent


def _walk(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_walk(child))
    return nodes


# -- the harness -------------------------------------------------------------------------------


class QueueBench:
    """Runs the phases against one scratch database; :meth:`run` returns the report."""

    def __init__(
        self,
        settings: Settings,
        config: QueueBenchConfig,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.progress = progress or (lambda _line: None)
        self.url = ""
        self.conn: asyncpg.Connection | None = None
        #: PgQueuer's own connection: plain asyncpg, without the fleet's json codecs.
        self.pgq_conn: asyncpg.Connection | None = None
        self.database = ""
        self._startup_cpu: float | None = None
        self.postmaster: psutil.Process | None = None
        self.report = QueueBenchReport(config=config, environment={})
        #: Enqueue-to-claim seconds of every message of every sustained run, per system and
        #: layout.
        self._latencies: dict[tuple[str, Layout], list[float]] = collections.defaultdict(list)

    # -- top level --

    async def run(self) -> QueueBenchReport:
        async with self.opened():
            try:
                await self._environment()
                if not self.config.skip_pgqueuer:
                    self.pgq_conn = await asyncpg.connect(
                        self.url, server_settings={"application_name": "fleet-bench"}
                    )
                    await self._pgq_install()
                await self._drains()
                await self._scaling()
                await self._sustained()
                if self.config.explain_backlog:
                    await self._claim_plans()
            finally:
                if self.pgq_conn is not None:
                    await self.pgq_conn.close()
        self.report.environment["load_after"] = _load()
        self._summarise()
        return self.report

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """The bench's own scratch database, created, migrated and connected (``self.url``,
        ``self.conn``, the server's postmaster for the CPU meter), dropped on exit. :meth:`run`
        runs every phase in it; bench/queue_probes.py runs single phases the same way."""
        async with scratch_database(self.settings) as url:
            self.url = url
            self.database = urlparse(url).path.lstrip("/")
            self.conn = await connect(self._settings(), "fleet-bench", url=url)
            try:
                self.postmaster = _find_postmaster(
                    await self.conn.fetchval("SELECT pg_backend_pid()"), self.database
                )
                yield
            finally:
                await self.conn.close()

    @property
    def _concurrency(self) -> int:
        return self.config.concurrency or 2 * self.config.batch

    @property
    def _scaling_delays(self) -> list[float]:
        """The scaling phase's handler times: no-op, then ``scaling_work_delay`` if set."""
        return [0.0, self.config.scaling_work_delay] if self.config.scaling_work_delay else [0.0]

    @property
    def _worker_limits(self) -> list[str]:
        return ["--concurrency", str(self._concurrency), "--claim-batch", str(self.config.batch)]

    def _settings(self) -> Settings:
        return _bench_settings(self.settings, self.url)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.url,
            FLEET_HOME=str(self.settings.fleet_home),
            FLEET_LOG_LEVEL="WARNING",
        )
        return env

    async def _environment(self) -> None:
        assert self.conn is not None
        row = await self.conn.fetchrow(
            """SELECT current_setting('server_version') AS server_version,
                      current_setting('synchronous_commit') AS synchronous_commit,
                      current_setting('fsync') AS fsync,
                      current_setting('shared_buffers') AS shared_buffers"""
        )
        pgq_version = None
        if not self.config.skip_pgqueuer:
            import pgqueuer

            pgq_version = pgqueuer.__version__
        self.report.environment = {
            "cpus": os.cpu_count(),
            "load_before": _load(),
            "database": "DATABASE_URL" if self.settings.database_url else "embedded",
            **dict(row),
            "pgqueuer": pgq_version,
            "python": sys.version.split()[0],
        }

    # -- pgfleet drains --

    async def _fleet_fill(self, messages: int, sessions: int) -> None:
        assert self.conn is not None
        await fill(self.conn, messages, sessions)

    async def _fleet_drain_stats(self, messages: int) -> tuple[float, float, bool]:
        assert self.conn is not None
        return await drain_stats(self.conn, messages)

    async def _fleet_drain_once(
        self,
        layout: Layout,
        processes: int | None,
        work_delay: float = 0.0,
        messages: int | None = None,
    ) -> _DrainRun:
        messages = messages or self.config.messages
        sessions = messages if layout == "one-per-session" else self.config.sessions
        await self._fleet_fill(messages, sessions)
        with collector_paused():
            async with self._cpu_meter() as cpu:
                started = time.perf_counter()
                if processes is None:
                    worker = Worker(
                        self._settings(),
                        NoopHandler(),
                        concurrency=self._concurrency,
                        claim_batch=self.config.batch,
                        drain=True,
                    )
                    await asyncio.wait_for(worker.run(), PHASE_TIMEOUT)
                else:
                    await self._run_worker_processes(processes, work_delay)
                wall = time.perf_counter() - started
        rate, steady, ok = await self._fleet_drain_stats(messages)
        worker_cpu = cpu.workers
        if processes is not None:
            worker_cpu = max(worker_cpu - processes * await self._worker_startup_cpu(), 0.0)
        return _DrainRun(
            rate, steady, wall, ok, worker_cpu / messages, cpu.postgres / messages,
            cpu.steal_percent,
        )

    async def _run_worker_processes(self, processes: int, work_delay: float = 0.0) -> None:
        args = ["fleet", "worker", "--handler", "noop", "--drain", *self._worker_limits]
        args += ["--work-delay", str(work_delay)]
        procs = [_Process(args, self._env()) for _ in range(processes)]
        try:
            for proc in procs:
                if await proc.wait(PHASE_TIMEOUT) != 0:
                    raise RuntimeError(f"fleet worker failed: {proc.tail()}")
        finally:
            for proc in procs:
                proc.finish()

    async def _worker_startup_cpu(self) -> float:
        """CPU seconds a ``fleet worker --drain`` process costs with nothing to do (interpreter,
        imports, pool, registration): subtracted from the subprocess drains' worker CPU."""
        if self._startup_cpu is None:
            assert self.conn is not None
            await self.conn.execute(FLEET_RESET)
            costs = []
            for _ in range(2):
                before = _CpuMeter._own()
                await self._run_worker_processes(1)
                costs.append(_CpuMeter._own() - before)
            self._startup_cpu = min(costs)
            self.report.environment["worker_startup_cpu_seconds"] = round(self._startup_cpu, 3)
        return self._startup_cpu

    def _cpu_meter(self, interval: float = 0.05) -> _CpuMeter:
        return _CpuMeter(self.postmaster, self.database, interval)

    async def _drains(self) -> None:
        """The in-process drains, repeated round-robin so load drift hits every system alike."""
        kinds: list[tuple[str, Layout]] = [
            ("pgfleet", "one-per-session"),
            ("pgfleet", "many-per-session"),
        ]
        if not self.config.skip_pgqueuer:
            kinds.append(("pgqueuer", "no sessions"))
        runs: dict[tuple[str, Layout], list[_DrainRun]] = {kind: [] for kind in kinds}
        loads = {kind: _load() for kind in kinds}
        for repeat in range(self.config.repeat):
            for system, layout in kinds:
                self.progress(
                    f"{system} drain {repeat + 1}/{self.config.repeat}: "
                    f"{self.config.messages} messages, {layout}, in-process"
                )
                if system == "pgfleet":
                    run = await self._fleet_drain_once(layout, None)
                else:
                    run = await self._pgq_drain_once()
                runs[(system, layout)].append(run)
                self.progress(f"  {run.describe()}")
        for system, layout in kinds:
            self._add_drain(
                system, "in-process", layout, 1, runs[(system, layout)], loads[(system, layout)]
            )

    async def _scaling(self) -> None:
        for delay in self._scaling_delays:
            # With slow handlers a process is bound by concurrency / delay (400/s at 20 and
            # 50 ms): fewer messages do, ten seconds' worth for one process.
            if delay:
                messages = min(self.config.messages, int(10 * self._concurrency / delay))
            else:
                messages = self.config.messages
            for processes in (1, self.config.processes):
                runner = _runner(processes, delay)
                load = _load()
                runs = []
                for repeat in range(self.config.repeat):
                    self.progress(
                        f"pgfleet drain {repeat + 1}/{self.config.repeat}: "
                        f"{messages} messages, one-per-session, {runner}"
                    )
                    runs.append(
                        await self._fleet_drain_once("one-per-session", processes, delay, messages)
                    )
                    self.progress(f"  {runs[-1].describe()}")
                self._add_drain(
                    "pgfleet", runner, "one-per-session", processes, runs, load, messages
                )

    def _add_drain(
        self,
        system: str,
        runner: str,
        layout: Layout,
        processes: int,
        runs: list[_DrainRun],
        load: float,
        messages: int | None = None,
    ) -> DrainResult:
        sessions: int | None = None
        if layout == "one-per-session":
            sessions = self.config.messages
        elif layout == "many-per-session":
            sessions = self.config.sessions
        worker_cpu = [r.worker_cpu for r in runs]
        postgres_cpu = [r.postgres_cpu for r in runs]
        result = DrainResult(
            system=system,  # type: ignore[arg-type]
            runner=runner,
            layout=layout,
            messages=messages or self.config.messages,
            sessions=sessions,
            batch=self.config.batch,
            concurrency=self._concurrency if system == "pgfleet" else None,
            processes=processes,
            messages_per_second=round(_median([r.rate for r in runs]), 1),
            steady_messages_per_second=round(_median([r.steady for r in runs]), 1),
            wall_seconds=round(_median([r.wall for r in runs]), 3),
            rates=[round(r.rate, 1) for r in runs],
            worker_cpu_us=round(_median(worker_cpu) * 1e6, 1),
            postgres_cpu_us=(
                round(_median(postgres_cpu) * 1e6, 1) if self.postmaster is not None else None
            ),
            all_done=all(r.ok for r in runs),
            load_before=load,
            steal_percent=[r.steal_percent for r in runs],
        )
        self.report.drains.append(result)
        return result

    # -- PgQueuer --

    async def _pgq_install(self) -> None:
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        assert self.pgq_conn is not None
        await Queries(AsyncpgDriver(self.pgq_conn)).install()

    async def _pgq_fill(self, messages: int) -> None:
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        assert self.pgq_conn is not None
        await self.pgq_conn.execute(PGQ_RESET)
        queries = Queries(AsyncpgDriver(self.pgq_conn))
        for first in range(0, messages, ENQUEUE_CHUNK):
            n = min(ENQUEUE_CHUNK, messages - first)
            await queries.enqueue([PGQ_ENTRYPOINT] * n, [BODY.encode()] * n, [0] * n)
        await self.pgq_conn.execute("ANALYZE pgqueuer")
        await _checkpoint(self.pgq_conn)

    async def _pgq_drain_once(self) -> _DrainRun:
        assert self.conn is not None
        messages = self.config.messages
        await self._pgq_fill(messages)
        with collector_paused():
            async with self._cpu_meter() as cpu:
                started = time.perf_counter()
                await asyncio.wait_for(
                    run_pgqueuer(self.url, self.config.batch, drain=True), PHASE_TIMEOUT
                )
                wall = time.perf_counter() - started
        row = await self.conn.fetchrow(PGQ_DRAIN_STATS)
        ok = row["left_in_queue"] == 0 and row["done"] == messages
        rate = messages / max(row["window_seconds"] or 0.0, 1e-6)
        steady = 0.8 * messages / max(row["steady_seconds"] or 0.0, 1e-6)
        return _DrainRun(
            rate, steady, wall, ok, cpu.workers / messages, cpu.postgres / messages,
            cpu.steal_percent,
        )

    # -- sustained load --

    def _sustain_rate(self, system: str, layout: Layout = "one-per-session") -> float:
        """``--sustain-rate``, or half the system's single-process peak in that layout, to 0.1
        message a second either way: the rate the report gives (``target_rate``, to 0.1) is
        then the one the producer used, and ``int(target_rate * seconds)`` what it sent (a
        report said 1,815.0/s of a one-second run that had sent 1,814 messages)."""
        return round(self.config.sustain_rate or self._peak(system, layout) / 2, 1)

    def _peak(self, system: str, layout: Layout = "one-per-session") -> float:
        """The single-process peak the sustained rate is half of: the peak load measured in
        that layout (``sustain_peak = "load"``), or the drain's (``"drain"``)."""
        if self.config.sustain_peak == "load":
            layout = "no sessions" if system == "pgqueuer" else layout
            [peak] = [p for p in self.report.peak_loads if (p.system, p.layout) == (system, layout)]
            return peak.messages_per_second
        return self._drain_peak(system, layout)

    def _drain_peak(self, system: str, layout: Layout = "one-per-session") -> float:
        """A single-process drain's steady rate (its best run's). Many per session: the
        in-process drain of that layout (the worker processes drain one per session only);
        one message costs more there (the election at its enqueue's commit, the promotion)."""
        if layout == "many-per-session":
            picks = [d for d in self.report.drains
                     if (d.system, d.runner, d.layout) == (system, "in-process", layout)]
            return max(d.steady_messages_per_second for d in picks)
        if system == "pgfleet":
            picks = [d for d in self.report.drains if d.system == system and d.processes == 1]
            picks = [d for d in picks if d.runner == _runner(1, 0.0)] or picks  # no-op, own process
        else:
            picks = [d for d in self.report.drains if d.system == system]
        return max(d.steady_messages_per_second for d in picks)

    async def _sustained(self) -> None:
        """The sustained runs, ``repeat`` of each system, round-robin. One run's p99 is decided
        by whether a background burst (an autovacuum, the host) lands in its few seconds, so
        the summary's p99 is over every message of every run. Their rates are half of the
        peak loads, measured first (``repeat`` runs each, round-robin, median), unless a rate
        was given or the drains' peaks were asked for."""
        if self.config.sustain_rate is None and self.config.sustain_peak == "load":
            rates: dict[tuple[str, Layout], list[float]] = collections.defaultdict(list)
            steal: dict[tuple[str, Layout], list[float]] = collections.defaultdict(list)
            load = _load()
            for repeat in range(self.config.repeat):
                self.progress(f"peak load {repeat + 1}/{self.config.repeat}")
                measured = [(("pgfleet", layout), await self._fleet_peak_load(layout))
                            for layout in ("one-per-session", "many-per-session")]
                if not self.config.skip_pgqueuer:
                    measured.append((("pgqueuer", "no sessions"), await self._pgq_peak_load()))
                for key, (rate, stolen) in measured:
                    rates[key].append(rate)
                    steal[key].append(stolen)
            for (system, layout), runs in rates.items():
                self.report.peak_loads.append(PeakLoadResult(
                    system=system,  # type: ignore[arg-type]
                    layout=layout,
                    messages_per_second=round(statistics.median(runs), 1),
                    rates=[round(r, 1) for r in runs],
                    waiting=self._keep_waiting,
                    load_before=load,
                    steal_percent=steal[system, layout],
                ))
        for repeat in range(self.config.repeat):
            self.progress(f"sustained {repeat + 1}/{self.config.repeat}")
            await self._fleet_sustained("one-per-session")
            await self._fleet_sustained("many-per-session")
            if not self.config.skip_pgqueuer:
                await self._pgq_sustained()

    @property
    def _keep_waiting(self) -> int:
        """Messages the peak load's producer keeps waiting: twice the worker's in-flight cap."""
        return 2 * self._concurrency

    async def _fleet_history(self) -> None:
        """A warm queue, as after a while in production: ``messages`` finished messages of
        history, vacuumed and analyzed. Started from an empty table instead, the backends plan
        their statements for a tiny table and keep those plans while it grows (see
        BENCHMARKS.md), which is a cold start, not a sustained load."""
        assert self.conn is not None
        messages = self.config.messages
        await self._fleet_fill(messages, messages)
        await self.conn.execute(FLEET_FINISH_ALL)
        # The whole database, catalogs included: a scratch database's own creation and
        # migration left the catalogs due for an autovacuum, which then ran inside the run.
        await self.conn.execute("VACUUM ANALYZE")
        await _checkpoint(self.conn)

    @contextlib.asynccontextmanager
    async def _fleet_worker(self, layout: Layout) -> AsyncIterator[_LoadRun]:
        """A warm queue and one ``fleet worker --handler noop`` process (the bench's limits),
        with a producer whose messages go each in a new session, or (many-per-session) over
        ``sessions`` sessions in turn; a probe message is enqueued (the worker is up once it
        is done). The worker is stopped on exit."""
        assert self.conn is not None
        sessions = self.config.sessions if layout == "many-per-session" else None
        await self._fleet_history()
        args = ["fleet", "worker", "--handler", "noop", *self._worker_limits]
        proc = _Process(args, self._env())
        pool = await create_pool(
            self._settings(), "fleet-bench", url=self.url, min_size=1, max_size=1
        )

        def send(prefix: str) -> Callable[[int, int], Awaitable[Any]]:
            # The messages that fell due, in one statement (PgQueuer's producer enqueues its
            # lists in one statement too).
            def session(i: int) -> str:
                return f"{prefix}{i if sessions is None else i % sessions}"

            return lambda first, end: queue.enqueue_many(
                pool, [{"session_id": session(i), "body": BODY} for i in range(first, end)]
            )

        try:
            await queue.enqueue(self.conn, "probe", BODY)
            yield _LoadRun("pgfleet", self.conn, proc, send("warm"), send("live"),
                           FLEET_UNFINISHED)
        finally:
            await pool.close()
            proc.finish()

    @contextlib.asynccontextmanager
    async def _pgq_worker(self) -> AsyncIterator[_LoadRun]:
        """PgQueuer's side of :meth:`_fleet_worker`: its worker process and its producer."""
        from pgqueuer.db import AsyncpgPoolDriver
        from pgqueuer.queries import Queries

        assert self.conn is not None
        # Warm state, as after a while in production: the drains' log rows stay, analyzed.
        await self.conn.execute("VACUUM ANALYZE")  # the whole database, as for ours
        await _checkpoint(self.conn)
        args = ["fleet.bench.queue", "pgqueuer-worker", "--batch", str(self.config.batch)]
        proc = _Process(args, self._env())
        pool = await asyncpg.create_pool(
            self.url, min_size=2, max_size=2, server_settings={"application_name": "fleet-bench"}
        )
        queries = Queries(AsyncpgPoolDriver(pool))

        def send(first: int, end: int) -> Awaitable[Any]:
            return queries.enqueue(
                [PGQ_ENTRYPOINT] * (end - first),
                [BODY.encode()] * (end - first),
                [0] * (end - first),
            )

        try:
            await queries.enqueue(PGQ_ENTRYPOINT, BODY.encode())  # as for ours
            yield _LoadRun("pgqueuer", self.conn, proc, send, send, PGQ_UNFINISHED)
        finally:
            await pool.close()
            proc.finish()

    def _spread(self, layout: Layout) -> str:
        """How a run of ours spreads its messages, for the progress lines."""
        if layout == "many-per-session":
            return f", over {self.config.sessions} sessions"
        return ", one per session"

    async def _fleet_sustained(self, layout: Layout = "one-per-session") -> None:
        """One sustained run of ours, at half that layout's peak."""
        rate = self._sustain_rate("pgfleet", layout)
        spread = self._spread(layout)
        self.progress(f"pgfleet sustained: {rate:,.0f} msg/s for "
                      f"{self.config.sustain_seconds:g}s{spread}, 1 worker process")
        async with self._fleet_worker(layout) as run:
            await self._measure_sustained(run, layout, rate, "SELECT max(id) FROM fleet.messages",
                                          FLEET_LATENCY, FLEET_TIMES)

    async def _fleet_peak_load(self, layout: Layout) -> tuple[float, float]:
        """One peak-load run of ours in that layout: its rate and the host's steal."""
        spread = self._spread(layout)
        self.progress(f"pgfleet peak load{spread}, 1 worker process")
        async with self._fleet_worker(layout) as run:
            return await self._measure_peak_load(run, FLEET_WAITING, FLEET_CLAIMED_BETWEEN)

    async def _pgq_sustained(self) -> None:
        rate = self._sustain_rate("pgqueuer")
        self.progress(f"PgQueuer sustained: {rate:,.0f} jobs/s for "
                      f"{self.config.sustain_seconds:g}s, 1 worker process")
        async with self._pgq_worker() as run:
            await self._measure_sustained(run, "no sessions", rate,
                                          "SELECT max(job_id) FROM pgqueuer_log", PGQ_LATENCY,
                                          PGQ_TIMES)

    async def _pgq_peak_load(self) -> tuple[float, float]:
        self.progress("PgQueuer peak load, 1 worker process")
        async with self._pgq_worker() as run:
            return await self._measure_peak_load(run, PGQ_WAITING, PGQ_CLAIMED_BETWEEN)

    async def _measure_sustained(
        self,
        run: _LoadRun,
        layout: Layout,
        rate: float,
        last_id_sql: str,
        latency_sql: str,
        times_sql: str,
    ) -> None:
        """What both systems' sustained runs share, once their worker runs and a probe
        message is enqueued: wait for the worker to finish the probe, one unmeasured second of
        load (``SUSTAIN_WARMUP_SECONDS``), then the measured run; the latencies are those of
        the messages after the warm-up's last id."""
        conn, proc, system = run.conn, run.proc, run.system
        seconds = self.config.sustain_seconds
        await run.started()
        await _produce(rate, SUSTAIN_WARMUP_SECONDS, run.warm_send)
        await _wait_for(run.idle, f"the {system} warm-up messages to finish")
        measured_after = await conn.fetchval(last_id_sql)
        load = _load()
        worker = psutil.Process(proc.popen.pid)
        worker_before = sum(worker.cpu_times()[:2])
        async with self._cpu_meter(interval=1.0) as cpu:
            achieved, commits = await _produce(rate, seconds, run.live_send)
            await _wait_for(run.idle, f"the {system} sustained-load messages to finish")
            worker_cpu = sum(worker.cpu_times()[:2]) - worker_before
        proc.terminate()
        await proc.wait(60)
        row = await conn.fetchrow(latency_sql, measured_after)
        times = await conn.fetch(times_sql, measured_after)
        self._add_sustained(
            system, rate, achieved, commits, times, seconds, row, load, cpu, worker_cpu,
            layout=layout,
        )

    async def _measure_peak_load(
        self, run: _LoadRun, waiting_sql: str, claimed_sql: str
    ) -> tuple[float, float]:
        """A peak-load run, once the worker runs and a probe message is enqueued: the
        closed-loop producer (:func:`_produce_closed`) for the warm-up, then for
        PEAK_LOAD_SECONDS, measured: the messages the worker claimed in those seconds, by the
        database's clock, over their length. Returns that rate and the host's steal."""
        conn = run.conn

        async def waiting() -> int:
            return await conn.fetchval(waiting_sql)

        await run.started()
        sent = await _produce_closed(SUSTAIN_WARMUP_SECONDS, run.warm_send, waiting,
                                     self._keep_waiting)
        host_before = host_cpu_ticks()
        started = await conn.fetchval("SELECT clock_timestamp()")
        await _produce_closed(PEAK_LOAD_SECONDS, run.live_send, waiting, self._keep_waiting,
                              sent)
        ended = await conn.fetchval("SELECT clock_timestamp()")
        stolen = steal_percent_since(host_before)
        await _wait_for(run.idle, f"the {run.system} peak-load messages to finish")
        # Counted once everything has committed: a claim under way at the end counts too.
        claimed = await conn.fetchval(claimed_sql, started, ended)
        run.proc.terminate()
        await run.proc.wait(60)
        rate = claimed / (ended - started).total_seconds()
        self.progress(f"  {rate:,.0f}/s, host steal {stolen:.1f}%")
        return rate, stolen

    def _add_sustained(
        self,
        system: Literal["pgfleet", "pgqueuer"],
        rate: float,
        achieved: float,
        commits: list[tuple[int, float]],
        times: list[asyncpg.Record],
        seconds: float,
        row: asyncpg.Record,
        load: float,
        cpu: _CpuMeter,
        worker_cpu: float,
        *,
        layout: Layout,
    ) -> None:
        quantiles = row["quantiles"] or [0.0, 0.0, 0.0]
        self._latencies[system, layout].extend(t["claimed"] - t["enqueued"] for t in times)
        # Split each message's latency at the moment the producer saw its transaction commit.
        committed_at = commit_times(commits)
        pairs = list(zip(times, committed_at, strict=False))
        commit = sorted(at - t["enqueued"] for t, at in pairs)
        pickup = sorted(t["claimed"] - at for t, at in pairs)
        per_commit = len(committed_at) / max(len(commits), 1)
        messages = max(row["total"], 1)
        result = SustainedResult(
            system=system,
            layout=layout,
            target_rate=round(rate, 1),
            achieved_rate=round(achieved, 1),
            messages_per_commit=round(per_commit, 2),
            seconds=seconds,
            messages=row["total"],
            p50_ms=round(quantiles[0] * 1000, 2),
            p90_ms=round(quantiles[1] * 1000, 2),
            p99_ms=round(quantiles[2] * 1000, 2),
            max_ms=round((row["max_seconds"] or 0.0) * 1000, 2),
            commit_p50_ms=_ms(commit, 0.5),
            commit_p99_ms=_ms(commit, 0.99),
            pickup_p50_ms=_ms(pickup, 0.5),
            pickup_p99_ms=_ms(pickup, 0.99),
            all_done=row["total"] == row["done"] and row["total"] >= int(rate * seconds),
            load_before=load,
            steal_percent=cpu.steal_percent,
            worker_cpu_us=round(worker_cpu / messages * 1e6, 1),
            postgres_cpu_us=round(cpu.postgres / messages * 1e6, 1),
        )
        self.progress(
            f"  p50 {result.p50_ms} ms, p99 {result.p99_ms} ms, max {result.max_ms} ms "
            f"at {result.achieved_rate:,.0f}/s, CPU per message: worker "
            f"{result.worker_cpu_us:.0f} us, postgres {result.postgres_cpu_us:.0f} us, "
            f"host steal {cpu.steal_percent:.1f}%"
        )
        self.report.sustained.append(result)

    # -- claim plans --

    async def _explain_claim(self, case: str, backlog: int) -> ClaimPlan:
        assert self.conn is not None
        claim = queries("queries.sql")["claim"]
        claimable = await self.conn.fetchval(
            "SELECT count(*) FROM fleet.messages WHERE state = 'queued' AND is_head"
        )
        runs = []
        for _ in range(3):
            tx = self.conn.transaction()
            await tx.start()
            try:
                (plan,) = await self.conn.fetchval(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + claim,
                    "explain",
                    self.config.batch,
                    30.0,
                    None,  # tools: any agent (the no-op worker's claim)
                    None,  # skills
                )
            finally:
                await tx.rollback()
            runs.append(plan)
        plan = sorted(runs, key=lambda p: p["Execution Time"])[1]
        nodes = _walk(plan["Plan"])
        top = plan["Plan"]
        result = ClaimPlan(
            case=case,
            backlog=backlog,
            claimable=claimable,
            batch=self.config.batch,
            claimed=top.get("Actual Rows", 0),
            execution_ms=round(plan["Execution Time"], 3),
            shared_buffers=top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0),
            index_rows=sum(
                int(n.get("Actual Rows", 0) * n.get("Actual Loops", 1))
                for n in nodes
                if "Index Name" in n and n.get("Relation Name") == "messages"
            ),
            indexes=sorted({n["Index Name"] for n in nodes if "Index Name" in n}),
        )
        self.progress(
            f"  claim on {case}: {result.execution_ms} ms, {result.shared_buffers} buffers, "
            f"{result.index_rows} index rows, {result.indexes}"
        )
        self.report.claim_plans.append(result)
        return result

    async def _claim_plans(self) -> None:
        assert self.conn is not None
        backlog = self.config.explain_backlog
        self.progress(f"claim EXPLAIN ANALYZE on {backlog:,} queued messages")
        small = max(self.config.batch * 10, 100)
        await self._fleet_fill(small, small)
        await self._explain_claim(f"{small} queued, one per session", small)
        await self._fleet_fill(backlog, backlog)
        await self._explain_claim(f"{backlog} queued, one per session", backlog)
        # The same rows finished: a queue whose history piles up, with a small live backlog.
        await self.conn.execute(FLEET_FINISH_ALL)
        for first in range(backlog + 1, backlog + small + 1, ENQUEUE_CHUNK):
            last = min(first + ENQUEUE_CHUNK - 1, backlog + small)
            await self.conn.fetchval(FLEET_BULK_ENQUEUE, first, last, backlog + small)
        await self.conn.execute("VACUUM ANALYZE fleet.messages")
        await self._explain_claim(f"{backlog} done + {small} queued", backlog + small)
        sessions = max(backlog // 500, 1)
        await self._fleet_fill(backlog, sessions)
        await self._explain_claim(f"{backlog} queued in {sessions} sessions", backlog)
        await self.conn.execute(FLEET_RESET)

    # -- summary --

    @staticmethod
    def _cores(drain: DrainResult) -> float | None:
        """How many cores a drain kept busy, its worker and its backends: steady rate x CPU
        per message. None when the server's CPU is not measured here."""
        if drain.postgres_cpu_us is None:
            return None
        cpu_us = drain.worker_cpu_us + drain.postgres_cpu_us
        return round(drain.steady_messages_per_second * cpu_us / 1e6, 2)

    def _scaling_ceiling(self, one: DrainResult) -> tuple[float, float] | None:
        """How many cores one process's drain kept busy, and the scaling ratio the machine's
        cores leave room for (at most ``processes``). When one process already uses most of
        the cores, no number of processes can add up to much more: that is this machine's
        bound, not the queue's. None when the server's CPU is not measured here."""
        cores = self._cores(one)
        if not cores:
            return None
        machine = float(os.cpu_count() or 1)
        return cores, round(min(float(self.config.processes), machine / cores), 2)

    def _summarise(self) -> None:
        drains = self.report.drains
        summary: dict[str, Any] = {}

        def pick(system: str, runner: str, layout: str) -> DrainResult | None:
            for d in drains:
                if (d.system, d.runner, d.layout) == (system, runner, layout):
                    return d
            return None

        pgq = pick("pgqueuer", "in-process", "no sessions")
        if pgq is not None:
            # The rate ratio is about the cores each drain keeps busy times the CPU ratio:
            # PgQueuer's one connection alternates between its process and its backend.
            summary["cores_pgqueuer"] = self._cores(pgq)
            for layout in ("one-per-session", "many-per-session"):
                ours = pick("pgfleet", "in-process", layout)
                if ours is not None and pgq.messages_per_second:
                    key = layout.replace("-", "_")
                    ratio = ours.messages_per_second / pgq.messages_per_second
                    summary[f"ratio_vs_pgqueuer_{key}"] = round(ratio, 2)
                    summary[f"cores_{key}"] = self._cores(ours)
                    if ours.postgres_cpu_us and pgq.postgres_cpu_us is not None:
                        # CPU per message, PgQueuer's over ours: what the rate ratio would be on
                        # a machine the two saturate alone.
                        cost = (pgq.worker_cpu_us + pgq.postgres_cpu_us) / (
                            ours.worker_cpu_us + ours.postgres_cpu_us
                        )
                        summary[f"cpu_ratio_vs_pgqueuer_{key}"] = round(cost, 2)
        delay = self.config.scaling_work_delay
        for work_delay in self._scaling_delays:
            key = "_with_work" if work_delay else ""
            one = pick("pgfleet", _runner(1, work_delay), "one-per-session")
            many = pick("pgfleet", _runner(self.config.processes, work_delay), "one-per-session")
            if one and many and one.steady_messages_per_second:
                summary[f"scaling_steady{key}"] = round(
                    many.steady_messages_per_second / one.steady_messages_per_second, 2
                )
                summary[f"scaling_window{key}"] = round(
                    many.messages_per_second / one.messages_per_second, 2
                )
                ceiling = self._scaling_ceiling(one)
                if ceiling is not None:
                    summary[f"one_process_cores{key}"], summary[f"scaling_ceiling{key}"] = ceiling
        suffixes = {("pgfleet", "one-per-session"): "",
                    ("pgfleet", "many-per-session"): "_many_per_session",
                    ("pgqueuer", "no sessions"): "_pgqueuer"}
        for peak in self.report.peak_loads:
            suffix = suffixes[peak.system, peak.layout]
            summary[f"peak_load{suffix}"] = peak.messages_per_second
            drain_peak = self._drain_peak(peak.system, peak.layout)
            # What the drain's peak, the sustained rate's base until 2026-12-08, is of it.
            summary[f"drain_peak_over_peak_load{suffix}"] = round(
                drain_peak / max(peak.messages_per_second, 1e-6), 2)
        for (system, layout), latencies in self._latencies.items():
            if latencies:
                suffix = suffixes[system, layout]
                runs = [s.p99_ms for s in self.report.sustained
                        if (s.system, s.layout) == (system, layout)]
                summary[f"sustained_p99_ms{suffix}"] = _ms(sorted(latencies), 0.99)
                summary[f"sustained_p99_ms_per_run{suffix}"] = runs
        targets: dict[str, bool] = {}
        ratios = [v for k, v in summary.items() if k.startswith("ratio_vs_pgqueuer")]
        if ratios:
            targets["drain >= 2x PgQueuer"] = min(ratios) >= 2.0
        ours_p99 = [summary[k] for k in ("sustained_p99_ms", "sustained_p99_ms_many_per_session")
                    if k in summary]
        if ours_p99 and self.config.sustain_rate is None:
            half = "half peak load" if self.config.sustain_peak == "load" else "half drain peak"
            targets[f"p99 <= 10 ms at {half}"] = max(ours_p99) <= 10.0
        scaling = f"{self.config.processes} processes >= 1.8x one"
        if "scaling_steady" in summary:
            targets[f"{scaling} (no-op handlers)"] = summary["scaling_steady"] >= 1.8
        if "scaling_steady_with_work" in summary:
            targets[f"{scaling} ({delay * 1000:g} ms handlers)"] = (
                summary["scaling_steady_with_work"] >= 1.8
            )
        summary["targets_met"] = targets
        self.report.summary = summary
        self.report.all_done = all(d.all_done for d in drains) and all(
            s.all_done for s in self.report.sustained
        )


async def run_queue_bench(
    settings: Settings, config: QueueBenchConfig, progress: Callable[[str], None] | None = None
) -> QueueBenchReport:
    """Run ``fleet bench queue`` and return its report."""
    return await QueueBench(settings, config, progress).run()


# -- PgQueuer's worker, in this process or as ``python -m fleet.bench.queue pgqueuer-worker`` ---


async def run_pgqueuer(url: str, batch: int, *, drain: bool) -> None:
    """One PgQueuer ``QueueManager`` on one asyncpg connection (its documented default and its
    own benchmark's), a no-op entrypoint, claim batch ``batch``; returns when drained (or on
    SIGTERM in the subprocess)."""
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    conn = await asyncpg.connect(url, server_settings={"application_name": "pgqueuer-bench"})
    try:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint(PGQ_ENTRYPOINT)
        async def noop(job: Job) -> None:
            return None

        if not drain:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, qm.shutdown.set)
        mode = QueueExecutionMode.drain if drain else QueueExecutionMode.continuous
        # dequeue_timeout is its polling fallback; 1 s, like FLEET_POLL_INTERVAL's default.
        await qm.run(batch_size=batch, mode=mode, dequeue_timeout=timedelta(seconds=1))
    finally:
        await conn.close()


def _main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fleet.bench.queue")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("pgqueuer-worker", help="Run a PgQueuer no-op worker on DATABASE_URL.")
    worker.add_argument("--batch", type=int, default=10)
    worker.add_argument("--drain", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pgqueuer").setLevel(logging.WARNING)
    url = os.environ["DATABASE_URL"]
    try:
        import uvloop

        uvloop.run(run_pgqueuer(url, args.batch, drain=args.drain))
    except ImportError:  # pragma: no cover
        asyncio.run(run_pgqueuer(url, args.batch, drain=args.drain))


if __name__ == "__main__":
    _main(sys.argv[1:])
