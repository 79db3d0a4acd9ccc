"""Security in the database: least-privilege roles and an append-only audit_log.

Each role check runs the statement under ``SET ROLE`` inside a savepoint, so a test proves both
halves: what a role may do succeeds, what it may not do raises ``insufficient_privilege``. The
process tests create LOGIN roles that are members of the group roles and run the real fleet
processes as them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import asyncpg
import pytest

from tests.processes import fleet, start_fleet, stop, wait_until

GROUP_ROLES = ("fleet_worker", "fleet_mcp", "fleet_audit_writer", "fleet_approver")


async def _seed(conn: asyncpg.Connection) -> None:
    await conn.execute("""
        INSERT INTO customers (id, email, name) VALUES ('c1', 'c1@example.com', 'Ada');
        INSERT INTO orders (id, customer_id, amount_cents, status)
            VALUES ('4429', 'c1', 5000, 'paid');
        INSERT INTO conversations (session_id, user_id) VALUES ('s1', 'c1');
        INSERT INTO audit_log (conversation_id, actor, action, payload)
            VALUES ('s1', 'test', 'message_received', '{}');
    """)
    message_id = await conn.fetchval("SELECT fleet.enqueue(session_id => 's1', body => 'hi')")
    await conn.execute(
        """INSERT INTO run_states (conversation_id, message_id, tool, arguments, call_id, state,
                                   expires_at)
           VALUES ('s1', $1, 'issue_refund', '{}', 'call-1', '{}', now() + interval '1 hour')""",
        message_id)


async def _allowed(conn: asyncpg.Connection, role: str, sql: str) -> bool:
    """True when ``role`` may run ``sql``; False on insufficient_privilege. Nothing is kept."""
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(f"SET LOCAL ROLE {role}")
        await conn.execute(sql)
        return True
    except asyncpg.InsufficientPrivilegeError:
        return False
    finally:
        await tx.rollback()


MAY = {
    "fleet_audit_writer": [
        "INSERT INTO audit_log (actor, action, payload) VALUES ('a', 'message_sent', '{}')",
        "INSERT INTO capability_invocations (conversation_id, capability, arguments, status)"
        " VALUES ('s1', 'lookup_order', '{}', 'ok')",
    ],
    "fleet_worker": [
        "SELECT * FROM fleet.messages FOR UPDATE",
        "UPDATE fleet.messages SET run_after = now()",
        "SELECT nextval('fleet.lease_tokens')",
        "INSERT INTO fleet.workers (worker_id, hostname, pid, concurrency, handler)"
        " VALUES ('w', 'h', 1, 1, 'noop')",
        "DELETE FROM fleet.workers",
        "INSERT INTO conversations (session_id, user_id) VALUES ('s2', 'u')",
        "UPDATE conversations SET summary = 'x'",
        "UPDATE run_states SET status = 'rejected', decision = 'rejected',"
        " decided_by = 'fleet:expiry', decided_at = now()",
        "INSERT INTO audit_log (actor, action, payload) VALUES ('a', 'message_sent', '{}')",
    ],
    "fleet_mcp": [
        "SELECT * FROM customers, orders, tickets, refunds, documents, embeddings",
        "SELECT * FROM orders WHERE id = '4429' FOR UPDATE",
        "INSERT INTO refunds (order_id, amount_cents, reason, idempotency_key)"
        " VALUES ('4429', 100, 'late', 'k1')",
        "UPDATE orders SET status = 'partially_refunded', updated_at = now() WHERE id = '4429'",
        "INSERT INTO audit_log (actor, action, payload) VALUES ('a', 'refund_issued', '{}')",
    ],
    "fleet_approver": [
        "SELECT * FROM run_states",
        "UPDATE run_states SET status = 'approved', decision = 'approved', decided_by = 'ada',"
        " decided_at = now(), decision_note = 'ok'",
        "UPDATE fleet.messages SET state = 'queued', run_after = now()"
        " WHERE state = 'awaiting_approval'",
        "SELECT * FROM orders, customers, refunds",
        "INSERT INTO audit_log (actor, action, payload) VALUES ('a', 'approval_decided', '{}')",
    ],
}

MAY_NOT = {
    "fleet_audit_writer": [
        "SELECT * FROM audit_log",
        "UPDATE audit_log SET actor = 'x'",
        "DELETE FROM audit_log",
        "SELECT * FROM customers",
        "SELECT * FROM fleet.messages",
    ],
    "fleet_worker": [
        "SELECT * FROM customers",
        "SELECT * FROM orders",
        "INSERT INTO refunds (order_id, amount_cents, reason) VALUES ('4429', 100, 'x')",
        "UPDATE orders SET status = 'refunded'",
        "SELECT * FROM documents",
        "DELETE FROM fleet.messages",
        "SELECT fleet.enqueue(session_id => 'x', body => 'y')",
        "SELECT * FROM audit_log",
        "DELETE FROM audit_log",
        "SELECT fleet.prune_audit_log(interval '30 days')",
        "CREATE TABLE public.evil (id int)",
        "SELECT * FROM fleet.schema_migrations",
    ],
    "fleet_mcp": [
        "UPDATE orders SET amount_cents = 1",
        "DELETE FROM refunds",
        "UPDATE refunds SET amount_cents = 1",
        "SELECT * FROM fleet.messages",
        "SELECT * FROM run_states",
        "UPDATE customers SET email = 'x@y.z'",
        "SELECT * FROM audit_log",
        "SELECT * FROM agent_session_items",
    ],
    "fleet_approver": [
        "INSERT INTO run_states (conversation_id, tool, arguments, call_id, state, expires_at)"
        " VALUES ('s1', 't', '{}', 'c', '{}', now())",
        "UPDATE run_states SET state = 'forged'",
        "UPDATE fleet.messages SET reply = 'forged'",
        "UPDATE fleet.messages SET lease_token = 1",
        "INSERT INTO refunds (order_id, amount_cents, reason) VALUES ('4429', 100, 'x')",
        "UPDATE orders SET status = 'refunded'",
        "DELETE FROM run_states",
    ],
}


async def test_group_roles_exist_and_cannot_log_in(conn):
    rows = await conn.fetch("SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb"
                            " FROM pg_roles WHERE rolname = ANY($1)", list(GROUP_ROLES))
    assert sorted(r["rolname"] for r in rows) == sorted(GROUP_ROLES)
    for r in rows:
        assert not (r["rolcanlogin"] or r["rolsuper"] or r["rolcreaterole"] or r["rolcreatedb"])


@pytest.mark.parametrize("role", sorted(MAY))
async def test_each_role_may_do_what_it_needs(conn, role):
    await _seed(conn)
    refused = [sql for sql in MAY[role] if not await _allowed(conn, role, sql)]
    assert refused == []


@pytest.mark.parametrize("role", sorted(MAY_NOT))
async def test_each_role_is_refused_everything_else(conn, role):
    await _seed(conn)
    allowed = [sql for sql in MAY_NOT[role] if await _allowed(conn, role, sql)]
    assert allowed == []


# -- audit_log is append-only -----------------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "UPDATE audit_log SET actor = 'rewritten'",
    "DELETE FROM audit_log",
    "TRUNCATE audit_log",
])
async def test_audit_log_refuses_update_delete_truncate_even_for_its_owner(conn, statement):
    await _seed(conn)
    assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await conn.execute(statement)
    assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE actor = 'test'") == 1


async def test_the_maintenance_setting_alone_does_not_open_the_guard_for_updates(conn):
    await _seed(conn)
    async with conn.transaction():
        await conn.execute("SET LOCAL fleet.audit_maintenance = 'prune'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("UPDATE audit_log SET actor = 'rewritten'")
    # ...and an application role cannot use it to delete: it has no DELETE privilege at all.
    async with conn.transaction():
        await conn.execute("SET LOCAL ROLE fleet_worker")
        await conn.execute("SET LOCAL fleet.audit_maintenance = 'prune'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.execute("DELETE FROM audit_log")


async def test_prune_function_closes_the_guard_again_before_returning(conn):
    await _seed(conn)
    await conn.execute("INSERT INTO audit_log (actor, action, payload, created_at)"
                       " VALUES ('old', 'message_sent', '{}', now() - interval '40 days')")
    async with conn.transaction():
        assert await conn.fetchval("SELECT fleet.prune_audit_log(interval '30 days')") == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("DELETE FROM audit_log")
    with pytest.raises(asyncpg.InvalidParameterValueError, match="at least one day"):
        await conn.fetchval("SELECT fleet.prune_audit_log(interval '1 hour')")
    # The failed DELETE aborted that transaction, the prune with it: both rows are still there.
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 2
    assert await conn.fetchval("SELECT fleet.prune_audit_log(interval '30 days')") == 1
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1


async def test_fleet_audit_prune_deletes_only_old_rows(conn, fleet_env):
    await _seed(conn)  # one fresh row
    await conn.execute("""
        INSERT INTO audit_log (actor, action, payload, created_at)
        SELECT 'old', 'message_sent', '{}', now() - make_interval(days => 30 + g)
        FROM generate_series(1, 5) g""")
    done = fleet("audit", "prune", "--older-than", "30", "--json", env=fleet_env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"pruned": 5, "older_than_days": 30}
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1
    done = fleet("audit", "prune", "--older-than", "30", env=fleet_env)
    assert done.returncode == 0 and "pruned 0 audit rows" in done.stdout
    for bad in ("0", "-3", "many"):
        done = fleet("audit", "prune", "--older-than", bad, env=fleet_env)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr and done.stderr.strip()
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1


async def test_fleet_audit_prune_as_an_application_role_is_refused(conn, fleet_env, login_role):
    url = login_role("fleet_worker")
    done = fleet("audit", "prune", "--older-than", "30", env=dict(fleet_env, DATABASE_URL=url))
    assert done.returncode == 1
    assert "permission denied" in done.stderr and "Traceback" not in done.stderr


# -- the fleet runs as these roles ------------------------------------------------------------

def _as_user(url: str, user: str) -> str:
    parts = urlparse(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    return urlunparse(parts._replace(netloc=f"{user}@{host}"))


@pytest.fixture
def login_role(db_url: str, server_url: str) -> Iterator:
    """Create LOGIN roles that inherit a group role; returns a URL for this test's database."""
    created: list[str] = []

    def admin(sql: str) -> None:
        # Called from async tests too: run on a private loop in a thread of its own.
        async def go() -> None:
            c = await asyncpg.connect(server_url)
            try:
                await c.execute(sql)
            finally:
                await c.close()

        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, go()).result()

    def make(group: str) -> str:
        name = f"{group}_{uuid.uuid4().hex[:8]}"
        admin(f"CREATE ROLE {name} LOGIN IN ROLE {group}")
        created.append(name)
        return _as_user(db_url, name)

    yield make
    for name in created:
        admin(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'")
        admin(f"DROP ROLE IF EXISTS {name}")


async def test_noop_worker_runs_as_a_fleet_worker_login_role(conn, fleet_env, login_role,
                                                            tmp_path: Path):
    url = login_role("fleet_worker")
    user = urlparse(url).username
    await conn.execute("SELECT fleet.enqueue(session_id => 'r' || (g % 5), body => 'x')"
                       " FROM generate_series(1, 40) g")
    worker = start_fleet("worker", "--handler", "noop", "--concurrency", "5",
                         env=dict(fleet_env, DATABASE_URL=url), log=tmp_path / "worker.log")
    try:
        await wait_until(lambda: conn.fetchval(
            "SELECT count(*) = 40 FROM fleet.messages WHERE state = 'done'"), timeout=60,
            message="40 messages done by the fleet_worker role")
        connected_as = await conn.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'fleet-%'"
            " AND pid <> pg_backend_pid()")
        assert [r["usename"] for r in connected_as] == [user]
    finally:
        stop(worker)
    log = (tmp_path / "worker.log").read_text()
    assert "permission denied" not in log and "Traceback" not in log


async def test_approver_cli_runs_as_a_fleet_approver_login_role(conn, fleet_env, login_role):
    await _seed(conn)
    message_id = await conn.fetchval("SELECT message_id FROM run_states")
    await conn.execute("UPDATE fleet.messages SET state = 'awaiting_approval' WHERE id = $1",
                       message_id)
    approval_id = await conn.fetchval("SELECT id::text FROM run_states")
    env = dict(fleet_env, DATABASE_URL=login_role("fleet_approver"))
    listed = fleet("approvals", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert approval_id in listed.stdout
    shown = fleet("approvals", "show", approval_id, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    done = fleet("approve", approval_id, "--by", "ada", env=env)
    assert done.returncode == 0, done.stderr
    row = await conn.fetchrow("SELECT r.status, m.state FROM run_states r"
                              " JOIN fleet.messages m ON m.id = r.message_id")
    assert (row["status"], row["state"]) == ("approved", "queued")
    assert await conn.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'approval_decided'") == 1
