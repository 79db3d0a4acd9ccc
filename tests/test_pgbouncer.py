"""The fleet through PgBouncer in transaction pooling mode (Debian's ``pgbouncer``).

Behind a transaction pooler a client connection is lent a server connection for one transaction
at a time, so nothing may outlive a transaction: no named prepared statements
(``FLEET_STATEMENT_CACHE_SIZE=0``), no LISTEN (``--poll-only``), no session advisory locks. These
tests point the real processes at the pooler only, and use a pool smaller than the fleet's client
connections so the pooler must really share server connections between them.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from tests.pgbouncer import SKIP_REASON, pgbouncer_binary, running_pgbouncer
from tests.processes import start_fleet, stop, wait_until
from tests.session_order import assert_session_order

pytestmark = pytest.mark.skipif(pgbouncer_binary() is None, reason=SKIP_REASON)

SERVER_POOL = 3  # server connections PgBouncer may open to the test database


async def _server_connections(conn: asyncpg.Connection) -> list[str]:
    """Client backends on this database other than the test's own connection.

    Only client backends: an autovacuum worker also shows this database's name in
    pg_stat_activity (300 updated messages can wake one mid-test), and it is not the pooler's.
    """
    rows = await conn.fetch(
        "SELECT application_name, state FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend'")
    return [f"{r['application_name'] or '-'} ({r['state']})" for r in rows]


async def test_poll_only_workers_through_pgbouncer_keep_session_order(
    conn, db_url, fleet_env, tmp_path: Path
):
    total, sessions = 300, 30
    await conn.execute(
        """SELECT fleet.enqueue(session_id => 'pool-' || (g % $2), body => 'message ' || g)
           FROM generate_series(1, $1) AS g""", total, sessions)
    with running_pgbouncer(db_url, pool_size=SERVER_POOL) as pooled_url:
        env = dict(fleet_env, DATABASE_URL=pooled_url, FLEET_STATEMENT_CACHE_SIZE="0")
        workers = [
            start_fleet("worker", "--poll-only", "--handler", "noop", "--work-delay", "0.02",
                        "--concurrency", "8", env=env, log=tmp_path / f"worker-{i}.log")
            for i in range(2)
        ]
        peak: list[str] = []

        async def all_done() -> bool:
            nonlocal peak
            backends = await _server_connections(conn)
            if len(backends) > len(peak):
                peak = backends
            return await conn.fetchval(
                "SELECT count(*) FROM fleet.messages WHERE state = 'done'") == total

        try:
            await wait_until(all_done, timeout=120, interval=0.05,
                             message=f"{total} messages done through PgBouncer")
        finally:
            for w in workers:
                stop(w)
    logs = [(tmp_path / f"worker-{i}.log").read_text() for i in range(2)]
    for text in logs:
        assert "started" in text and "poll_only=True" in text
        assert "prepared statement" not in text  # the classic transaction-pooling failure
        assert "Traceback" not in text
    # Two workers hold up to 2 x (pool 4) client connections; PgBouncer lent them at most
    # SERVER_POOL server connections: the pooler, not the fleet, bounded the database's load.
    assert 1 <= len(peak) <= SERVER_POOL, peak
    rows = await conn.fetch(
        "SELECT id, session_id, state, reply, attempts, claimed_at, finished_at"
        " FROM fleet.messages ORDER BY session_id, id")
    assert len(rows) == total
    assert all(r["state"] == "done" and r["reply"] == "ok" and r["attempts"] == 1 for r in rows)
    assert_session_order(rows)
