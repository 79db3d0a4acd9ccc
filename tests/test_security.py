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
from typing import Any
from urllib.parse import urlparse

import asyncpg
import pytest
from pydantic import SecretStr

from fleet.settings import Settings
from tests.processes import fleet, start_fleet, stop, wait_until
from tests.urls import as_login

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
        # 0010: a turn builds its agent from the rows, and delegation enqueues the child turn.
        "SELECT * FROM fleet.agents, fleet.agent_versions",
        "SELECT fleet.enqueue(session_id => 's1/child', body => 'y')",
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
        # 0018: a message's state, never what it says.
        "UPDATE fleet.messages SET body = 'forged'",
        "UPDATE fleet.messages SET session_id = 's2'",
        "UPDATE fleet.messages SET variables = '{}', metadata = '{}'",
        "UPDATE fleet.messages SET max_attempts = 99",
        "UPDATE fleet.agents SET instructions = 'obey the customer'",
        "INSERT INTO fleet.agent_versions (name, version, spec) VALUES ('x', 1, '{}')",
        "DELETE FROM fleet.agents",
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


#: Every column of fleet.messages, as the worker may write it (migration 0018) or not.
WORKER_WRITES = {"state", "is_head", "attempts", "takeovers", "run_after", "claimed_at",
                 "finished_at", "lease_owner", "lease_token", "lease_expires_at", "reply",
                 "error", "cancel_requested_at", "cancel_reason", "reply_awaited"}
ENQUEUED_ONCE = {"id", "session_id", "agent", "body", "customer_id", "variables", "metadata",
                 "dedupe_key", "max_attempts", "enqueued_at"}


async def test_the_worker_may_update_a_messages_state_columns_only(conn):
    """A new column of fleet.messages must be put on one side or the other (in the migration
    that adds it): this fails until it is."""
    rows = await conn.fetch(
        "SELECT attname, has_column_privilege('fleet_worker', attrelid, attname, 'UPDATE') AS may"
        " FROM pg_attribute WHERE attrelid = 'fleet.messages'::regclass"
        " AND attnum > 0 AND NOT attisdropped")
    writable = {r["attname"] for r in rows if r["may"]}
    assert {r["attname"] for r in rows} == WORKER_WRITES | ENQUEUED_ONCE
    assert writable == WORKER_WRITES


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


async def test_fleet_prune_as_a_worker_role_is_refused(conn, fleet_env, login_role):
    """Workers may not delete messages: retention is the schema owner's."""
    await conn.execute("""
        INSERT INTO fleet.sessions (session_id) VALUES ('role-old');
        INSERT INTO fleet.messages (session_id, body, state, reply, finished_at, enqueued_at)
        VALUES ('role-old', 'old', 'done', 'ok', now() - interval '40 days',
                now() - interval '41 days')""")
    url = login_role("fleet_worker")
    done = fleet("prune", "--older-than", "30", env=dict(fleet_env, DATABASE_URL=url))
    assert done.returncode == 1
    assert "permission denied" in done.stderr and "Traceback" not in done.stderr
    assert await conn.fetchval("SELECT count(*) FROM fleet.messages") == 1


# -- the fleet runs as these roles ------------------------------------------------------------

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
        return as_login(db_url, name)

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


# -- the customer-data MCP server: the whole surface, its token, its Host check, its limits ------

MCP_TOOLS = {"lookup_customer", "find_customer_by_email", "lookup_order",
             "find_similar_resolved_tickets", "issue_refund"}
MCP_HEADERS = {"Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
LIST_TOOLS = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}


#: The module's one MCP server runs with small limits so the 429 tests can reach them;
#: the other tests make a handful of requests and the rate tests wait for a refill afterwards.
RATE, BURST, CONCURRENCY = 20, 20, 4


@pytest.fixture(scope="module")
def mcp_db(server_url, template_url):
    from tests.mcp_process import module_database

    with module_database(server_url) as url:
        _admin_sql(url, """
            INSERT INTO customers (id, email, name, metadata)
                VALUES ('c1', 'ada@example.com', 'Ada', '{"tier": "pro"}');
            INSERT INTO orders (id, customer_id, amount_cents, status)
                VALUES ('4429', 'c1', 5000, 'delivered');""")
        yield url


@pytest.fixture(scope="module")
def mcp_server(mcp_db, fleet_home, tmp_path_factory):
    from tests.mcp_process import module_env, running_mcp

    log = tmp_path_factory.mktemp("mcp") / "mcp.log"
    with running_mcp(module_env(mcp_db, fleet_home), log,
                     CUSTOMER_DATA_RATE_LIMIT=str(RATE), CUSTOMER_DATA_RATE_BURST=str(BURST),
                     CUSTOMER_DATA_MAX_CONCURRENCY=str(CONCURRENCY)) as server:
        yield server


def _admin_sql(url: str, sql: str) -> None:
    from tests.mcp_process import _admin

    _admin(url, sql)


async def _post(url: str, body: dict, headers: dict[str, str]) -> Any:
    import httpx2

    async with httpx2.AsyncClient(timeout=30, trust_env=False) as client:
        return await client.post(url, json=body, headers=headers)


async def test_mcp_server_demands_its_bearer_token(mcp_server):
    for auth in ({}, {"Authorization": "Bearer wrong"},
                 {"Authorization": f"Basic {mcp_server.token}"},
                 {"Authorization": f"Bearer {mcp_server.token}x"}):
        response = await _post(mcp_server.url, LIST_TOOLS, {**MCP_HEADERS, **auth})
        assert response.status_code == 401, (auth, response.text)
        assert mcp_server.token not in response.text
    ok = await _post(mcp_server.url, LIST_TOOLS,
                     {**MCP_HEADERS, "Authorization": f"Bearer {mcp_server.token}"})
    assert ok.status_code == 200, ok.text
    assert {t["name"] for t in ok.json()["result"]["tools"]} == MCP_TOOLS


@pytest.mark.parametrize("host", ["evil.example", "attacker.test:8765", "localhost.evil.example"])
async def test_mcp_server_rejects_foreign_host_headers(mcp_server, host):
    response = await _post(mcp_server.url, LIST_TOOLS, {
        **MCP_HEADERS, "Authorization": f"Bearer {mcp_server.token}", "Host": host})
    assert response.status_code == 421, response.text


async def test_the_agent_has_no_sql_tool_only_the_five_mcp_tools_and_load_skill(
    mcp_server, mcp_db
):
    from agents import RunContextWrapper

    from fleet.turn import AgentHandler, TurnContext

    cfg = Settings(database_url=mcp_db, customer_data_url=mcp_server.url,
                   customer_data_token=SecretStr(mcp_server.token))
    handler = AgentHandler(cfg)
    try:
        context = TurnContext(session_id="s", message_id=1, customer_id=None, variables={},
                              audit=None)
        tools = await handler.agent.get_all_tools(RunContextWrapper(context=context))
    finally:
        await handler.mcp.close()
    names = {t.name for t in tools}
    assert names == MCP_TOOLS | {"load_skill"}
    for tool in tools:  # no tool takes SQL, a query string, or a table name
        schema = json.dumps(getattr(tool, "params_json_schema", {})).lower()
        assert not any(word in schema for word in ("\"sql\"", "\"query\"", "\"table\"",
                                                   "\"statement\"")), (tool.name, schema)


def test_token_limits_accounting_rate_burst_and_concurrency():
    """The limiter's bookkeeping on a fake clock (no network: control flow only)."""
    from mcp_customer_data.limits import TokenLimits

    now = [0.0]
    limits = TokenLimits(rate=10, burst=3, concurrency=2, clock=lambda: now[0])
    assert limits.acquire("a") is None and limits.acquire("a") is None
    assert limits.acquire("a") == pytest.approx(0.1)  # two running: the concurrency limit
    assert limits.acquire("b") is None  # another token has its own budget
    limits.release("a")
    assert limits.acquire("a") is None  # the third of the burst
    limits.release("a")
    limits.release("a")
    wait = limits.acquire("a")  # burst spent, no time passed
    assert wait == pytest.approx(0.1)
    now[0] += wait
    assert limits.acquire("a") is None  # refilled at 10/s
    limits.release("a")
    now[0] += 100
    for _ in range(2):
        assert limits.acquire("a") is None  # refill is capped at the burst...
    limits.release("a")
    limits.release("a")
    assert limits.acquire("a") is None
    limits.release("a")
    assert limits.acquire("a") is not None  # ...of three


async def test_mcp_server_answers_429_with_retry_after_past_a_tokens_rate(mcp_server):
    import httpx2

    headers = {**MCP_HEADERS, "Authorization": f"Bearer {mcp_server.token}"}
    async with httpx2.AsyncClient(timeout=30, trust_env=False) as client:
        responses = await asyncio.gather(*(
            client.post(mcp_server.url, json=LIST_TOOLS, headers=headers) for _ in range(60)))
        # A stranger's requests are limited under their own key, never the fleet's token's.
        stranger = await client.post(mcp_server.url, json=LIST_TOOLS,
                                     headers={**MCP_HEADERS, "Authorization": "Bearer guess"})
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}
    assert codes.count(429) >= 60 - BURST - 10  # the rest of the burst was refused...
    assert codes.count(200) >= min(BURST, CONCURRENCY)  # ...after admitting some
    assert stranger.status_code == 401
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert error["data"]["retry_after"] > 0 and "rate limited" in error["message"]
    await asyncio.sleep(BURST / RATE + 0.5)  # leave a full bucket to the next test


async def test_worker_mcp_client_waits_out_429s_and_every_call_succeeds(mcp_server, mcp_db,
                                                                       caplog):
    import logging
    import time

    from fleet.mcp_client import MCPClientPool

    cfg = Settings(database_url=mcp_db, customer_data_url=mcp_server.url,
                   customer_data_token=SecretStr(mcp_server.token))
    pool = MCPClientPool(cfg)
    calls = 3 * BURST
    started = time.monotonic()
    try:
        with caplog.at_level(logging.INFO, logger="fleet.mcp_client"):
            results = await asyncio.gather(*(
                pool.call_tool("lookup_order", {"order_id": "4429"}, {"session_id": f"s{i}"})
                for i in range(calls)))
    finally:
        await pool.close()
    elapsed = time.monotonic() - started
    assert all(not r.is_error for r in results)
    assert all("4429" in json.dumps(r.structured_content) for r in results)
    throttled = [r for r in caplog.records if "rate limited" in r.getMessage()]
    assert throttled, "the burst never reached the server's limit"
    # Over the burst, the calls (plus connects) went at the server's rate, not at once.
    assert elapsed >= (calls - BURST) / RATE * 0.8
    await asyncio.sleep(BURST / RATE + 0.5)
