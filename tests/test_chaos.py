"""The chaos suite: real processes under load, killed and restarted, then every invariant checked.

While a load generator enqueues messages over many sessions, a chaos task ``kill -9``s a random
worker every couple of seconds (a replacement starts at once, as a supervisor would), restarts
PostgreSQL once (the embedded test server keeps its port) and, with the agent handler, restarts
the customer-data MCP server once. Afterwards:

* every message is ``done`` with exactly one reply, or ``dead`` with its error, and no error is
  a lost-lease error (a takeover is not the message's fault);
* per-session order held: each message started after the one before it in its session finished;
* no refund was issued twice, and every refund belongs to an approved approval;
* every done turn has its audit rows (agent handler: message_received and message_sent);
* no ``run_states`` row is stuck (awaiting, approved or rejected but never resumed).

The tally is printed (``pytest -s`` shows it). The suite is ``slow``; it runs in CI.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from mcp.shared.exceptions import MCPError
from starlette.requests import ClientDisconnect

from fleet.mcp_client import CustomerDataUnavailable
from fleet.mcp_wire import HTTPStatusError, _Stale
from tests.logged_tracebacks import Tolerated, untolerated
from tests.processes import start_fleet, stop, wait_until
from tests.session_order import assert_session_order, sessions_with_two_heads

pytestmark = pytest.mark.slow


@dataclass
class Tally:
    kills: int = 0
    db_restarts: int = 0
    mcp_restarts: int = 0
    enqueue_retries: int = 0
    approvals_decided: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)


async def _connect(url: str, timeout: float = 60.0) -> asyncpg.Connection:
    """A connection, waiting while the database restarts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncpg.connect(url)
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.PostgresConnectionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """One query on a fresh connection, retried across a database restart."""
    for _ in range(100):
        try:
            conn = await _connect(url)
            try:
                return await conn.fetch(sql, *args)
            finally:
                await conn.close()
        # InternalClientError: a connection made while the server restarts can be left in a
        # state asyncpg refuses to use ("cannot switch to state 11; another operation (2) is
        # in progress", seen by the agent chaos suite's watcher).
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError,
                asyncpg.InternalClientError):
            await asyncio.sleep(0.2)
    raise AssertionError("the database did not come back")


class Fleet:
    """The processes under test, started and killed for real."""

    def __init__(self, env: dict[str, str], logs: Path, *, workers: int, handler: str,
                 worker_args: list[str]) -> None:
        self.env, self.logs, self.handler, self.worker_args = env, logs, handler, worker_args
        self.generation = itertools.count()
        self.workers: list[subprocess.Popen[str]] = []
        self.killed: list[subprocess.Popen[str]] = []
        self.mcp: subprocess.Popen[str] | None = None
        for _ in range(workers):
            self.workers.append(self._worker())

    def _worker(self) -> subprocess.Popen[str]:
        n = next(self.generation)
        return start_fleet("worker", "--handler", self.handler, *self.worker_args,
                           env=self.env, log=self.logs / f"worker-{n}.log")

    def kill_random_worker(self) -> None:
        victim = random.choice(self.workers)
        stop(victim, signal.SIGKILL)
        self.killed.append(victim)
        self.workers[self.workers.index(victim)] = self._worker()

    def stop_all(self) -> list[int]:
        codes = [stop(w, signal.SIGTERM, timeout=30) for w in self.workers]
        if self.mcp is not None:
            stop(self.mcp)
        return codes

    def worker_logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.logs.glob("worker-*.log")))


async def _enqueue_load(url: str, total: int, sessions: int, seconds: float, tally: Tally,
                        body_for: Any) -> None:
    """``total`` messages over ``sessions`` sessions, spread over ``seconds``. Each enqueue has
    a dedupe key, so one retried after an ambiguous failure (the database went away around the
    commit) cannot enqueue the message twice."""
    pause = seconds / total
    conn: asyncpg.Connection | None = None
    for i in range(total):
        session = f"chaos-{i % sessions}"
        while True:
            try:
                if conn is None or conn.is_closed():
                    if conn is not None:
                        tally.enqueue_retries += 1  # the database went away under us
                    conn = await _connect(url)
                await conn.fetchval(
                    "SELECT fleet.enqueue(session_id => $1, body => $2, dedupe_key => $3,"
                    " customer_id => $4)", session, body_for(i), f"chaos-{i}", "c-chaos")
                break
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError,
                    asyncpg.InternalClientError):  # see _query
                tally.enqueue_retries += 1
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(0.2)
        await asyncio.sleep(pause)
    if conn is not None:
        await conn.close()


async def _chaos(fleet: Fleet, fleet_home: Path, tally: Tally, until: asyncio.Event, *,
                 restart_db_at: float, restart_mcp_at: float | None,
                 restart_mcp: Any = None, pause: tuple[float, float] = (1.0, 2.5)) -> None:
    from fleet.embedded import EmbeddedServer
    from fleet.settings import Settings

    start = time.monotonic()
    db_done = False
    mcp_done = restart_mcp_at is None
    while not until.is_set():
        await asyncio.sleep(random.uniform(*pause))
        fleet.kill_random_worker()
        tally.kills += 1
        elapsed = time.monotonic() - start
        if not db_done and elapsed >= restart_db_at:
            server = EmbeddedServer(Settings(fleet_home=fleet_home, database_url=None))
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.ensure_running)
            tally.db_restarts += 1
            db_done = True
        if not mcp_done and elapsed >= (restart_mcp_at or 0):
            await restart_mcp()
            tally.mcp_restarts += 1
            mcp_done = True


#: The tracebacks a worker may log during the chaos without having crashed (see
#: tests/logged_tracebacks.py for why each is matched by its record and its classes).
WORKER_TOLERATED = [
    # asyncpg's pool reconnecting while PostgreSQL restarts: what connecting to a database
    # that is down, shutting down or starting up raises.
    Tolerated("asyncpg.pool", "Failed to restore the pool connection floor; retrying", (
        OSError, EOFError, asyncio.CancelledError, asyncpg.PostgresConnectionError,
        asyncpg.exceptions.OperatorInterventionError, asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    )),
    # The Agents SDK logging a tool call our MCP client gave up on while the MCP server was
    # killed (it logs the traceback only with OPENAI_AGENTS_DONT_LOG_TOOL_DATA=0): the pool's
    # CustomerDataUnavailable and the transport failures it is chained from, nothing else.
    Tolerated("openai.agents", "Error invoking MCP tool", (
        CustomerDataUnavailable, OSError, EOFError, asyncio.CancelledError, HTTPStatusError,
        _Stale, MCPError,
    )),
]

#: A worker killed mid-request disconnects: the MCP server logs starlette's ClientDisconnect
#: with its traceback (the mcp SDK's "Error handling POST request", or uvicorn's own line).
MCP_SERVER_TOLERATED = [Tolerated(None, "", (ClientDisconnect,))]


def _assert_no_crash(logs: str) -> None:
    """No worker exited on an error ("error: ..." from the CLI), no task died unseen, and every
    traceback is one of the handled failures in ``WORKER_TOLERATED``."""
    assert "\nerror:" not in "\n" + logs, logs[-3000:]
    assert "Task exception was never retrieved" not in logs, logs[-3000:]
    crashes = untolerated(logs, WORKER_TOLERATED)
    assert crashes == [], crashes


async def _all_registered(url: str, fleet: Fleet) -> bool:
    """Every running worker has its row: it is past start-up and handles SIGTERM (a worker
    still importing when SIGTERM arrives dies of it, which says nothing about draining)."""
    rows = await _query(url, "SELECT pid FROM fleet.workers")
    return {w.pid for w in fleet.workers} <= {r["pid"] for r in rows}


async def _settled(url: str, total: int) -> bool:
    rows = await _query(url, "SELECT count(*) AS n FROM fleet.messages"
                             " WHERE state IN ('done', 'dead', 'cancelled')")
    return rows[0]["n"] == total


async def _check_queue_invariants(url: str, total: int, sessions: int) -> dict[str, Any]:
    rows = await _query(url, "SELECT id, session_id, state, reply, error, attempts, takeovers,"
                             " claimed_at, finished_at FROM fleet.messages ORDER BY session_id, id")
    assert len(rows) == total  # the dedupe keys kept retried enqueues from doubling
    states = Counter(r["state"] for r in rows)
    for r in rows:
        if r["state"] == "done":
            assert r["reply"], r
        else:
            assert r["state"] == "dead" and r["error"], r
            assert "lease" not in r["error"].lower(), r  # losing a worker is not a failure
    assert assert_session_order(rows) == sessions
    return {
        "states": dict(states),
        "takeovers": sum(r["takeovers"] for r in rows),
        "messages_taken_over": sum(1 for r in rows if r["takeovers"]),
        "max_attempts": max(r["attempts"] for r in rows),
    }


async def test_chaos_noop_fleet_loses_nothing_and_keeps_session_order(
    db_url, fleet_env, fleet_home, tmp_path: Path
):
    """Queue-level chaos: kill -9 workers repeatedly and restart PostgreSQL under load."""
    if os.environ.get("DATABASE_URL"):
        pytest.skip("restarts the embedded test server")
    total, sessions, seconds = 900, 60, 25.0
    tally = Tally()
    env = dict(fleet_env, FLEET_LOG_LEVEL="WARNING")
    fleet = Fleet(env, tmp_path, workers=3, handler="noop",
                  worker_args=["--work-delay", "0.1", "--concurrency", "8"])
    stop_chaos = asyncio.Event()
    stop_watch = asyncio.Event()
    two_heads = asyncio.create_task(sessions_with_two_heads(db_url, stop_watch, every=0.05))
    try:
        load = asyncio.create_task(_enqueue_load(db_url, total, sessions, seconds, tally,
                                                 lambda i: f"message {i}"))
        chaos = asyncio.create_task(_chaos(fleet, fleet_home, tally, stop_chaos,
                                           restart_db_at=8.0, restart_mcp_at=None))
        await load
        await asyncio.sleep(3.0)  # a few more kills after the last enqueue
        stop_chaos.set()
        await chaos
        await wait_until(lambda: _settled(db_url, total), timeout=120, interval=0.5,
                         message=f"all {total} messages settled after the chaos")
        await wait_until(lambda: _all_registered(db_url, fleet), timeout=60, interval=0.2,
                         message="the last replacements to register")
    finally:
        stop_chaos.set()
        stop_watch.set()
        codes = fleet.stop_all()
    assert await two_heads == set()  # sampled all along, server restart included
    summary = await _check_queue_invariants(db_url, total, sessions)
    assert summary["states"] == {"done": total}  # the noop handler never fails
    assert codes == [0] * len(codes)  # the survivors drained and exited cleanly
    assert tally.kills >= 8 and tally.db_restarts == 1
    _assert_no_crash(fleet.worker_logs())
    print(f"\nchaos tally (noop): {total} messages over {sessions} sessions in "
          f"{time.monotonic() - tally.started:.0f}s; kill -9 x{tally.kills}, "
          f"PostgreSQL restarts x{tally.db_restarts}, enqueue retries x{tally.enqueue_retries}; "
          f"{summary}")
