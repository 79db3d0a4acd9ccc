"""``fleet bench turns``: what an agent turn costs a worker process (method in BENCHMARKS.md).

Everything real except the model: a scratch database, migrated and seeded; ``fleet mcp serve``
over streamable HTTP; ``fleet worker --handler agent`` processes; the offline support policy.
Every turn is the same shape: a complaint in a fresh session ("I haven't received my refund
from order #N ..."), which takes 3 model calls (load_skill, then lookup_order and
find_similar_resolved_tickets in parallel, then the reply), 2 MCP tool calls, the session read
and write and the audit rows.

Phases, each with a fresh worker process:

1. ``sequential``: one turn at a time; latency claim -> reply is the turn's overhead without a
   model (the query embedding in the MCP server included).
2. ``throughput``: all turns queued, ``--concurrency`` in flight; turns/s, and the CPU (user +
   system from ``/proc``) per turn of the worker process, of the MCP server and of PostgreSQL
   (the server processes whose title names the scratch database: the worker's and the MCP
   server's connections, the bench's own enqueue and progress queries, autovacuum there).
3. ``slow model``: each model call takes ``--model-latency`` seconds; how many turns one process
   holds in flight, their latency against the model's own time (3 x latency), and the worker's
   resident memory per in-flight turn. All turns are queued at once: a burst, the worst case
   for latency (every turn reaches its tool calls in the same second).
4. ``slow model, steady``: the same model, turns arriving one by one at ``--steady-rate`` per
   second (open loop), so that about rate x turn time are in flight at any moment: the load
   "a process carries N turns in flight" describes, without the burst.
"""

from __future__ import annotations

import asyncio
import os
import resource
import secrets
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
import psutil
from pydantic import BaseModel

from fleet import queue
from fleet.bench.queue import _CpuMeter, _find_postmaster, _Process, scratch_database
from fleet.database import connect
from fleet.settings import Settings

COMPLAINT = "I haven't received my refund from order #{order}, it's been two weeks."
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class TurnBenchConfig(BaseModel):
    sequential: int = 30
    turns: int = 300
    concurrency: int = 32
    slow_turns: int = 300
    slow_concurrency: int = 200
    model_latency: float = 1.0
    steady_rate: float = 30.0
    """Arrivals per second of the steady slow-model phase (0 skips it)."""
    repeat: int = 1
    """Runs of every phase, one after another; the report gives each figure's median."""


class Phase(BaseModel):
    name: str
    turns: int
    concurrency: int
    model_latency_s: float
    wall_s: float
    turns_per_s: float
    worker_cpu_ms_per_turn: float
    mcp_cpu_ms_per_turn: float
    postgres_cpu_ms_per_turn: float | None = None
    """None when the server is not on this machine (its processes cannot be read)."""
    p50_ms: float
    p90_ms: float
    max_in_flight: int
    rss_idle_mib: float
    rss_peak_mib: float
    mib_per_in_flight_turn: float | None
    all_done: bool


class TurnBenchReport(BaseModel):
    environment: dict[str, Any]
    phases: list[Phase]
    """Each phase's figures, the median over the runs (one run: that run's)."""
    runs: list[list[Phase]]
    """Every run's phases, in order: the spread behind the medians."""


def median_phase(runs: list[Phase]) -> Phase:
    """One phase's runs as one: every figure the median of its runs (so the figures of the
    result may come from different runs), ``all_done`` only when every run finished."""
    first = runs[0]
    figures: dict[str, Any] = {}
    for field, value in first.model_dump().items():
        values = [getattr(run, field) for run in runs]
        if isinstance(value, bool) or field == "name":
            continue
        if isinstance(value, int | float) and None not in values:
            middle = statistics.median(values)
            figures[field] = round(middle) if isinstance(value, int) else round(middle, 3)
    return first.model_copy(update={**figures, "all_done": all(r.all_done for r in runs)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _until(predicate: Callable[[], Any], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"benchmark: timed out waiting for {what}")
        await asyncio.sleep(0.05)


class TurnBench:
    def __init__(self, settings: Settings, url: str, progress: Callable[[str], None]) -> None:
        self.settings = settings
        self.url = url
        self.progress = progress
        self.port = _free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        self.env.update(
            DATABASE_URL=url,
            FLEET_HOME=str(settings.fleet_home),
            FLEET_LOG_LEVEL="WARNING",
            FLEET_MODEL="offline",
            # the bench's own setting, so that `FLEET_GC_YOUNG_THRESHOLD=0 fleet bench turns`
            # measures the worker and the server with Python's default collector
            FLEET_GC_YOUNG_THRESHOLD=str(settings.fleet_gc_young_threshold),
            CUSTOMER_DATA_URL=f"http://127.0.0.1:{self.port}/mcp",
            CUSTOMER_DATA_TOKEN=secrets.token_urlsafe(24),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        self.env.pop("OPENAI_API_KEY", None)
        self.mcp: _Process | None = None
        self.order = 0
        self.database = urlparse(url).path.lstrip("/")
        self.postmaster: psutil.Process | None = None

    async def setup(self, conn: asyncpg.Connection) -> None:
        self.postmaster = _find_postmaster(
            await conn.fetchval("SELECT pg_backend_pid()"), self.database
        )
        self.progress("seeding the scratch database ...")
        seed = _Process(["fleet", "seed"], self.env)
        if await seed.wait(600) != 0:
            raise RuntimeError(f"fleet seed failed: {seed.tail()}")
        seed.finish()
        self.mcp = _Process(["fleet", "mcp", "serve", "--port", str(self.port)], self.env)

        async def listening() -> bool:
            if self.mcp.popen.poll() is not None:
                raise RuntimeError(f"fleet mcp serve exited: {self.mcp.tail()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        await _until(listening, "fleet mcp serve", 180)

    async def close(self) -> None:
        if self.mcp is not None:
            self.mcp.terminate()
            await self.mcp.wait(30)
            self.mcp.finish()

    async def phase(
        self,
        conn: asyncpg.Connection,
        name: str,
        turns: int,
        concurrency: int,
        latency: float,
        rate: float | None = None,
    ) -> Phase:
        """Run ``turns`` turns through a fresh worker: all queued at once, or (``rate``) one
        every 1/rate seconds while the phase runs."""
        self.progress(f"{name}: {turns} turns, concurrency {concurrency}, model {latency}s ...")
        await conn.execute("TRUNCATE fleet.workers")
        env = {**self.env, "FLEET_OFFLINE_LATENCY_SECONDS": str(latency)}
        worker = _Process(
            ["fleet", "worker", "--handler", "agent", "--concurrency", str(concurrency)], env
        )
        arrivals: asyncio.Task[None] | None = None
        try:
            async def registered() -> bool:
                if worker.popen.poll() is not None:
                    raise RuntimeError(f"worker exited: {worker.tail()}")
                return bool(await conn.fetchval("SELECT count(*) FROM fleet.workers"))

            await _until(registered, "the worker to start", 120)
            await asyncio.sleep(1.0)  # let start-up settle before the CPU baseline
            pid, mcp_pid = worker.popen.pid, self.mcp.popen.pid
            rss_idle = _rss_mib(pid)
            cpu0, mcp0 = _cpu_seconds(pid), _cpu_seconds(mcp_pid)
            async with _CpuMeter(self.postmaster, self.database) as postgres:
                first_id = await conn.fetchval("SELECT coalesce(max(id), 0) FROM fleet.messages")
                if rate:
                    arrivals = asyncio.create_task(self._arrive(name, turns, rate))
                else:
                    async with conn.transaction():
                        for _ in range(turns):
                            await self._enqueue(conn, name)
                max_in_flight, rss_peak = 0, rss_idle
                deadline = time.monotonic() + 600 + turns * (3 * latency + 1)
                while True:
                    row = await conn.fetchrow(
                        "SELECT count(*) FILTER (WHERE state = 'running') AS running, "
                        "count(*) FILTER (WHERE state IN ('done', 'dead')) AS finished "
                        "FROM fleet.messages WHERE id > $1", first_id)
                    max_in_flight = max(max_in_flight, row["running"])
                    rss_peak = max(rss_peak, _rss_mib(pid))
                    if row["finished"] >= turns or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                if arrivals is not None:
                    await arrivals
                cpu = _cpu_seconds(pid) - cpu0
                mcp_cpu = _cpu_seconds(mcp_pid) - mcp0
            rows = await conn.fetch(
                "SELECT state, claimed_at, finished_at FROM fleet.messages WHERE id > $1",
                first_id)
        finally:
            if arrivals is not None and not arrivals.done():
                arrivals.cancel()
            worker.terminate()
            await worker.wait(60)
            worker.finish()
        done = [r for r in rows if r["state"] == "done"]
        if rate:
            name = f"{name} ({rate:g}/s)"
        latencies = [(r["finished_at"] - r["claimed_at"]).total_seconds() * 1000 for r in done]
        wall = (
            (max(r["finished_at"] for r in done) - min(r["claimed_at"] for r in done))
            .total_seconds() if done else 0.0
        )
        grown = rss_peak - rss_idle
        return Phase(
            name=name,
            turns=turns,
            concurrency=concurrency,
            model_latency_s=latency,
            wall_s=round(wall, 2),
            turns_per_s=round(len(done) / wall, 1) if wall else 0.0,
            worker_cpu_ms_per_turn=round(cpu / max(len(done), 1) * 1000, 1),
            mcp_cpu_ms_per_turn=round(mcp_cpu / max(len(done), 1) * 1000, 1),
            postgres_cpu_ms_per_turn=(
                round(postgres.postgres / max(len(done), 1) * 1000, 1)
                if self.postmaster is not None else None
            ),
            p50_ms=round(statistics.median(latencies), 1) if latencies else 0.0,
            p90_ms=round(_percentile(latencies, 0.9), 1),
            max_in_flight=max_in_flight,
            rss_idle_mib=round(rss_idle, 1),
            rss_peak_mib=round(rss_peak, 1),
            mib_per_in_flight_turn=round(grown / max_in_flight, 3) if max_in_flight else None,
            all_done=len(done) == turns,
        )

    async def _enqueue(self, conn: asyncpg.Connection, phase: str) -> None:
        self.order += 1
        await queue.enqueue(
            conn, f"bench-{phase.replace(' ', '-').replace(',', '')}-{self.order}",
            COMPLAINT.format(order=4400 + self.order % 50),
        )

    async def _arrive(self, phase: str, turns: int, rate: float) -> None:
        """Open loop: turn i is enqueued at i / rate seconds, on its own connection, whatever
        the worker is doing."""
        conn = await connect(self.settings, "fleet-bench-arrivals", url=self.url)
        try:
            start = time.monotonic()
            for i in range(turns):
                await asyncio.sleep(max(start + i / rate - time.monotonic(), 0.0))
                await self._enqueue(conn, phase)
        finally:
            await conn.close()


async def run_turn_bench(
    settings: Settings, config: TurnBenchConfig, progress: Callable[[str], None]
) -> TurnBenchReport:
    async with scratch_database(settings) as url:
        bench = TurnBench(settings, url, progress)
        conn = await connect(settings.model_copy(update={"database_url": url}), "fleet-bench",
                             url=url)
        try:
            await bench.setup(conn)
            runs: list[list[Phase]] = []
            for run in range(config.repeat):
                if config.repeat > 1:
                    progress(f"run {run + 1} of {config.repeat}")
                phases = [
                    await bench.phase(conn, "sequential", config.sequential, 1, 0.0),
                    await bench.phase(conn, "throughput", config.turns, config.concurrency,
                                      0.0),
                    await bench.phase(conn, "slow model", config.slow_turns,
                                      config.slow_concurrency, config.model_latency),
                ]
                if config.steady_rate:
                    phases.append(await bench.phase(
                        conn, "slow model, steady", config.slow_turns,
                        config.slow_concurrency, config.model_latency, rate=config.steady_rate,
                    ))
                runs.append(phases)
            environment = {
                "server_version": await conn.fetchval("SHOW server_version"),
                "cpus": os.cpu_count(),
                "load": round(os.getloadavg()[0], 2),
            }
        finally:
            await conn.close()
            await bench.close()
    phases = [median_phase(list(same)) for same in zip(*runs, strict=True)]
    return TurnBenchReport(environment=environment, phases=phases, runs=runs)


# -- why skills are loaded by a function tool, not the SDK's sandbox capability ------------------


async def sandbox_skills_comparison(runs: int = 20) -> list[dict[str, Any]]:
    """CPU per run: a SandboxAgent with the lazy ``Skills`` capability (load_skill, then reading
    SKILL.md through the shell capability) against ``fleet.skills``' function tool. A scripted
    model, no network, the same skill folder."""
    from agents import Agent, RunConfig, Runner, set_tracing_disabled
    from agents.sandbox import SandboxAgent, SandboxRunConfig
    from agents.sandbox.capabilities import Capabilities, Skills
    from agents.sandbox.capabilities.skills import LocalDirLazySkillSource
    from agents.sandbox.entries import LocalDir
    from agents.sandbox.sandboxes.unix_local import UnixLocalSandboxClient
    from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call

    from fleet.settings import PROJECT_ROOT
    from fleet.skills import SkillLibrary

    set_tracing_disabled(True)
    os.chdir(PROJECT_ROOT)  # LocalDir sources must resolve under the working directory
    library = SkillLibrary()

    async def sandbox(i: int) -> None:
        model = ScriptedModel([
            ModelStep(output=[function_call(
                "load_skill", {"skill_name": "summarize-ticket"}, call_id=f"a{i}")]),
            ModelStep(output=[function_call(
                "exec_command", {"cmd": "cat .agents/summarize-ticket/SKILL.md"},
                call_id=f"b{i}")]),
            ModelStep(output=[assistant_message("done")]),
        ])
        agent = SandboxAgent(
            name="w", instructions="x", model=model,
            capabilities=[*Capabilities.default(),
                          Skills(lazy_from=LocalDirLazySkillSource(source=LocalDir(src="skills")))],
        )
        await Runner.run(agent, "handoff note for #4471", run_config=RunConfig(
            sandbox=SandboxRunConfig(client=UnixLocalSandboxClient())))

    async def function_tool(i: int) -> None:
        model = ScriptedModel([
            ModelStep(output=[function_call(
                "load_skill", {"name": "summarize-ticket", "reference": None}, call_id=f"a{i}")]),
            ModelStep(output=[assistant_message("done")]),
        ])
        agent = Agent(name="w", instructions="x", model=model, tools=[library.tool()])
        await Runner.run(agent, "handoff note for #4471")

    def cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    results = []
    loaders = (("sandbox Skills capability", sandbox), ("fleet load_skill tool", function_tool))
    for name, fn in loaders:
        await fn(-1)
        for concurrency in (1, 10):
            started, cpu0 = time.perf_counter(), cpu()
            for k in range(0, runs, concurrency):
                await asyncio.gather(*(fn(k + j) for j in range(concurrency)))
            results.append({
                "loader": name,
                "concurrency": concurrency,
                "wall_ms_per_run": round((time.perf_counter() - started) / runs * 1000, 1),
                "cpu_ms_per_run": round((cpu() - cpu0) / runs * 1000, 1),
            })
    return results
