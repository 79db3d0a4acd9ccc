"""The connection budget: a database that refuses connections slows the fleet, loses nothing.

PostgreSQL's ``max_connections`` is server-wide and shared with everything else on the server;
a role's ``CONNECTION LIMIT`` is the same refusal ("too many connections") aimed at the fleet
alone, so the test can starve the fleet without starving the test's own connection. Every
worker wants 1 LISTEN connection + up to 4 pool connections (RELIABILITY.md, "Connection
budget"); here three workers share a limit smaller than what one of them wants.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.mcp_process import _admin
from tests.processes import start_fleet, stop, wait_until
from tests.session_order import assert_session_order
from tests.urls import as_login

LIMIT = 3




async def test_workers_over_a_connection_limit_slow_down_but_finish_every_message(
    conn, db_url, server_url, fleet_env, tmp_path: Path
):
    role = f"fleet_budget_{uuid.uuid4().hex[:8]}"
    _admin(server_url, f"CREATE ROLE {role} LOGIN CONNECTION LIMIT {LIMIT} IN ROLE fleet_worker")
    url = as_login(db_url, role)
    total, sessions = 200, 20
    await conn.execute(
        """SELECT fleet.enqueue(session_id => 'budget-' || (g % $2), body => 'm' || g)
           FROM generate_series(1, $1) AS g""", total, sessions)
    env = dict(fleet_env, DATABASE_URL=url)
    workers = [
        start_fleet("worker", "--handler", "noop", "--work-delay", "0.02", "--concurrency", "5",
                    env=env, log=tmp_path / f"worker-{i}.log")
        for i in range(3)
    ]
    peak = 0

    async def all_done() -> bool:
        nonlocal peak
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role)
        peak = max(peak, held)
        return await conn.fetchval(
            "SELECT count(*) FROM fleet.messages WHERE state = 'done'") == total

    codes: list[int | None] = []
    try:
        await wait_until(all_done, timeout=180, interval=0.05,
                         message=f"{total} messages done within {LIMIT} connections")
        # Nobody gave up: a worker refused at start waits for a slot instead of exiting.
        assert [w.poll() for w in workers] == [None] * len(workers)
    finally:
        codes = [stop(w) for w in workers]
        _admin(server_url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                           f" WHERE usename = '{role}'")
        _admin(server_url, f"DROP ROLE IF EXISTS {role}")
    logs = "\n".join((tmp_path / f"worker-{i}.log").read_text() for i in range(3))
    assert peak <= LIMIT
    assert codes == [0, 0, 0]
    assert "error:" not in logs and "Traceback" not in logs
    assert "too many connections" in logs  # the limit really bit
    rows = await conn.fetch("SELECT id, session_id, state, reply, error, claimed_at, finished_at"
                            " FROM fleet.messages ORDER BY session_id, id")
    assert [r["state"] for r in rows] == ["done"] * total
    assert all(r["reply"] == "ok" for r in rows)
    assert_session_order(rows)
