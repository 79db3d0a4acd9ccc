"""The fleet core with real OS processes: workers, kill -9, SIGTERM, migrate, the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.processes import ROOT, fleet, fleet_json, start_fleet, stop, wait_until
from tests.session_order import assert_session_order


async def _counts(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT state, count(*) AS n FROM fleet.messages GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


async def _all_done(conn: asyncpg.Connection, total: int) -> bool:
    return (await _counts(conn)).get("done", 0) == total


async def test_three_workers_process_600_messages_once_each_in_session_order(
    conn, fleet_env, tmp_path: Path
):
    await conn.execute(
        """SELECT fleet.enqueue(session_id => 'session-' || (g % 40), body => 'message ' || g)
           FROM generate_series(1, 600) AS g""")
    workers = [
        start_fleet("worker", "--handler", "noop", "--work-delay", "0.05", "--concurrency", "10",
                    env=fleet_env, log=tmp_path / f"worker-{i}.log")
        for i in range(3)
    ]
    try:
        await wait_until(lambda: _all_done(conn, 600), timeout=120, message="600 messages done")
    finally:
        for w in workers:
            stop(w)
    rows = await conn.fetch(
        "SELECT id, session_id, state, reply, attempts, takeovers, claimed_at, finished_at"
        " FROM fleet.messages ORDER BY session_id, id")
    assert len(rows) == 600
    assert all(r["state"] == "done" and r["reply"] == "ok" for r in rows)
    assert all(r["attempts"] == 1 and r["takeovers"] == 0 for r in rows)  # processed once each
    assert assert_session_order(rows) == 40
    owners = await conn.fetchval("SELECT count(*) FROM fleet.workers")
    assert owners == 0  # all three unregistered on SIGTERM
    for i in range(3):
        assert "started" in (tmp_path / f"worker-{i}.log").read_text()


async def test_kill_9_worker_messages_are_taken_over_after_lease_expiry(
    conn, fleet_env, tmp_path: Path
):
    ids = [await conn.fetchval("SELECT fleet.enqueue(session_id => $1, body => 'slow')", f"k{i}")
           for i in range(5)]
    victim = start_fleet("worker", "--handler", "noop", "--work-delay", "60", "--concurrency", "5",
                         env=fleet_env, log=tmp_path / "victim.log")
    await wait_until(lambda: conn.fetchval(
        "SELECT count(*) = 5 FROM fleet.messages WHERE state = 'running'"), timeout=30,
        message="the victim to hold all five")
    owner = await conn.fetchval("SELECT DISTINCT lease_owner FROM fleet.messages")
    assert owner and str(victim.pid) in owner
    stop(victim, signal.SIGKILL)  # a real SIGKILL to a real PID: no goodbye, no release

    rescuer = start_fleet("worker", "--handler", "noop", "--work-delay", "0.05",
                          env=fleet_env, log=tmp_path / "rescuer.log")
    try:
        # FLEET_LEASE_SECONDS=3 in the test env: takeover after ~3 s (+ one poll interval).
        await wait_until(lambda: _all_done(conn, 5), timeout=30, message="takeover")
    finally:
        stop(rescuer)
    rows = await conn.fetch("SELECT * FROM fleet.messages WHERE id = ANY($1)", ids)
    for r in rows:
        assert r["state"] == "done" and r["reply"] == "ok"
        assert r["takeovers"] == 1
        assert r["attempts"] == 1  # the lost lease did not count as a failed attempt
        assert r["error"] is None


async def test_a_worker_stopped_past_its_leases_cannot_overwrite_the_new_owner(
    conn, fleet_env, tmp_path: Path
):
    """A real zombie: a worker process frozen (SIGSTOP) while it holds messages, for longer than
    their leases. Another worker takes them over and finishes them; when the frozen one
    resumes (SIGCONT), its handlers end and its heartbeat runs, and nothing it writes lands:
    the new owner's results stay as they were (fencing by lease token)."""
    ids = [await conn.fetchval("SELECT fleet.enqueue(session_id => $1, body => 'x')", f"z{i}")
           for i in range(3)]
    zombie = start_fleet("worker", "--handler", "noop", "--work-delay", "2", "--concurrency", "3",
                         env=fleet_env, log=tmp_path / "zombie.log")
    rescuer = None
    try:
        await wait_until(lambda: conn.fetchval(
            "SELECT count(*) = 3 FROM fleet.messages WHERE state = 'running'"), timeout=30,
            message="the zombie to hold all three")
        zombie.send_signal(signal.SIGSTOP)
        rescuer = start_fleet("worker", "--handler", "noop", "--work-delay", "0.05",
                              env=fleet_env, log=tmp_path / "rescuer.log")
        await wait_until(lambda: _all_done(conn, 3), timeout=30, message="the takeover")
        taken_over = "SELECT id, state, reply, attempts, takeovers, finished_at FROM fleet.messages"
        finished = [dict(r) for r in await conn.fetch(taken_over + " ORDER BY id")]
        assert [(r["id"], r["takeovers"], r["attempts"]) for r in finished] == [
            (i, 1, 1) for i in ids]
        zombie.send_signal(signal.SIGCONT)
        await wait_until(lambda: asyncio.to_thread(
            lambda: "taken over" in (tmp_path / "zombie.log").read_text()
            or "lease lost" in (tmp_path / "zombie.log").read_text()),
            timeout=30, message="the zombie to find its leases gone")
        await asyncio.sleep(1)  # anything it would still write
        assert [dict(r) for r in await conn.fetch(taken_over + " ORDER BY id")] == finished
    finally:
        if zombie.poll() is None:
            zombie.send_signal(signal.SIGCONT)
        assert stop(zombie) == 0
        if rescuer is not None:
            stop(rescuer)


@pytest.mark.parametrize(("work_delay", "expect"), [("1", "done"), ("30", "queued")])
async def test_sigterm_drains_or_releases_in_flight_messages(
    conn, fleet_env, tmp_path: Path, work_delay: str, expect: str
):
    env = dict(fleet_env, FLEET_SHUTDOWN_GRACE="4")
    await conn.execute("SELECT fleet.enqueue(session_id => 'term-' || g, body => 'x')"
                       " FROM generate_series(1, 8) g")
    worker = start_fleet("worker", "--handler", "noop", "--work-delay", work_delay,
                         "--concurrency", "8", env=env, log=tmp_path / "worker.log")
    await wait_until(lambda: conn.fetchval(
        "SELECT count(*) = 8 FROM fleet.messages WHERE state = 'running'"), timeout=30,
        message="eight running")
    assert stop(worker, signal.SIGTERM, timeout=30) == 0
    counts = await _counts(conn)
    assert counts.get("running", 0) == 0  # nothing stuck running
    assert counts == {expect: 8}
    if expect == "queued":
        # Released, not failed: the attempt is given back and another worker may start at once.
        assert await conn.fetchval("SELECT max(attempts) FROM fleet.messages") == 0
        assert "released 8 messages" in (tmp_path / "worker.log").read_text()


async def test_failing_messages_end_dead_with_the_error_shown_by_fleet_messages(
    conn, fleet_env, tmp_path: Path
):
    message_id = await conn.fetchval(
        "SELECT fleet.enqueue(session_id => 'bad', body => 'please #fail', max_attempts => 3)")
    worker = start_fleet("worker", "--handler", "noop", env=fleet_env,
                         log=tmp_path / "worker.log")
    try:
        await wait_until(lambda: conn.fetchval(
            "SELECT state = 'dead' FROM fleet.messages WHERE id = $1", message_id), timeout=30,
            message="dead")
    finally:
        stop(worker)
    [shown] = fleet_json("messages", "--state", "dead", env=fleet_env)
    assert shown["id"] == message_id and shown["attempts"] == 3
    assert "told to fail" in shown["error"]
    table = fleet("messages", "--session", "bad", env=fleet_env)
    assert "dead" in table.stdout and "told to fail" in table.stdout
    # the contract's columns: id, session, state, ...
    assert table.stdout.splitlines()[0].split()[:3] == ["id", "session", "state"]


async def test_four_concurrent_migrates_succeed_and_leave_one_schema(server_url, fleet_env):
    name = f"m_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = server_url.rsplit("/", 1)[0] + f"/{name}"
    env = dict(fleet_env, DATABASE_URL=url)
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "fleet", "migrate", "--json"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=ROOT) for _ in range(4)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1] for o in outputs]
        applied = [o[0] for o in outputs if '"0001"' in o[0]]
        assert len(applied) == 1  # exactly one process applied the migrations
        conn = await asyncpg.connect(url)
        try:
            versions = await conn.fetch("SELECT version FROM fleet.schema_migrations")
            assert len(versions) == len({v["version"] for v in versions})
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'fleet'") == 1
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["enqueue", "s1", ""], "body must not be empty"),
        (["enqueue", "s1", "x" * 16_385], "the limit is 16384"),
        (["enqueue", "bad session", "hi"], "session_id must be 1 to 128 characters"),
        (["messages", "--state", "bogus"], "unknown message state 'bogus'"),
    ],
)
async def test_cli_bad_input_gets_one_clear_line_and_writes_nothing(
    conn, fleet_env, args: list[str], expected: str
):
    done = fleet(*args, env=fleet_env)
    assert done.returncode != 0
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 0


async def test_enqueue_wait_prints_the_reply(conn, fleet_env, tmp_path: Path):
    worker = start_fleet("worker", "--handler", "noop", env=fleet_env,
                         log=tmp_path / "worker.log")
    try:
        done = await asyncio.to_thread(
            fleet, "enqueue", "s-wait", "hello", "--wait", "--timeout", "30", env=fleet_env)
    finally:
        stop(worker)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    status = fleet_json("status", env=fleet_env)
    assert status["counts"]["done"] == 1


@pytest.mark.slow
async def test_listen_reconnects_after_the_database_restarts(db_url, fleet_env, fleet_home,
                                                             tmp_path: Path):
    if os.environ.get("DATABASE_URL"):
        pytest.skip("restarts the embedded test server")
    from fleet.embedded import EmbeddedServer
    from fleet.settings import Settings

    env = dict(fleet_env, FLEET_POLL_INTERVAL="60")  # only NOTIFY can wake it quickly
    worker = start_fleet("worker", "--handler", "noop", env=env, log=tmp_path / "worker.log")

    async def listening() -> bool:
        try:
            conn = await asyncpg.connect(db_url)
        except OSError:
            return False
        try:
            return await conn.fetchval("SELECT count(*) FROM pg_stat_activity"
                                       " WHERE application_name = 'fleet-listener'") == 1
        finally:
            await conn.close()

    try:
        await wait_until(listening, timeout=30, message="the LISTEN connection")
        server = EmbeddedServer(Settings(fleet_home=fleet_home, database_url=None))
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.ensure_running)
        await wait_until(listening, timeout=30, message="LISTEN to reconnect")
        await asyncio.sleep(0.5)
        conn = await asyncpg.connect(db_url)
        try:
            message_id = await conn.fetchval("SELECT fleet.enqueue(session_id => 'r', body => 'x')")
            await wait_until(lambda: conn.fetchval(
                "SELECT state = 'done' FROM fleet.messages WHERE id = $1", message_id),
                timeout=10, message="the message enqueued after the restart")
        finally:
            await conn.close()
    finally:
        stop(worker)
    assert "LISTEN connection lost" in (tmp_path / "worker.log").read_text()
