"""`fleet up`: real child processes, restarted when they die, drained on SIGTERM."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil

from tests.processes import start_fleet, stop, wait_until


def _worker_children(supervisor_pid: int) -> list[psutil.Process]:
    """The supervisor's live worker children (a killed one is a zombie until it is reaped)."""
    workers = []
    for child in psutil.Process(supervisor_pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "worker" in child.cmdline():
                workers.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return workers


async def test_up_restarts_a_killed_worker_and_drains_on_sigterm(conn, fleet_env, tmp_path: Path):
    up = start_fleet("up", "--workers", "2", "--handler", "noop", "--work-delay", "0.02",
                     env=fleet_env, log=tmp_path / "up.log")
    try:
        async def two_workers() -> bool:
            return await conn.fetchval("SELECT count(*) FROM fleet.workers") == 2

        await wait_until(two_workers, timeout=60, message="two registered workers")
        [first, second] = _worker_children(up.pid)
        os.kill(first.pid, signal.SIGKILL)

        async def replaced() -> bool:
            pids = {c.pid for c in _worker_children(up.pid)}
            return len(pids) == 2 and first.pid not in pids and second.pid in pids

        await wait_until(replaced, timeout=30, message="the killed worker to be replaced")

        await conn.execute("SELECT fleet.enqueue(session_id => 'up-' || (g % 7), body => 'x')"
                           " FROM generate_series(1, 100) g")
        await wait_until(lambda: conn.fetchval(
            "SELECT count(*) = 100 FROM fleet.messages WHERE state = 'done'"), timeout=60,
            message="100 done")
    finally:
        assert stop(up, signal.SIGTERM, timeout=60) == 0
    assert not _alive_children(up.pid)
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages WHERE state = 'running'") == 0
    log = (tmp_path / "up.log").read_text()
    assert "restarting" in log and "all children stopped" in log


def _alive_children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
