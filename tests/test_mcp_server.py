"""The customer-data MCP server over real streamable HTTP, on a real seeded database.

Issue 3's acceptance 1-4: exactly five tools and no SQL tool; every refusal names the problem
and changes nothing; a failure injected between the refund insert and the audit insert leaves
neither; idempotency (sequential and concurrent); 401 without the right token.

One seeded database and one server (uvicorn in a thread, free port, the real ASGI app, with
``statement_cache_size=0`` as behind PgBouncer) serve the module; each test takes its own
orders so the tests do not depend on each other's writes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from fleet.settings import Settings
from tests.seeded import RunningServer, mcp_server_in_thread
from tests.urls import as_login

TOOLS = {
    "lookup_customer": {"customer_id"},
    "find_customer_by_email": {"email"},
    "lookup_order": {"order_id"},
    "find_similar_resolved_tickets": {"description", "limit"},
    "issue_refund": {"order_id", "amount_cents", "reason"},
}


@pytest.fixture(scope="module")
def server(seeded_db: str) -> Iterator[RunningServer]:
    with mcp_server_in_thread(seeded_db, fleet_statement_cache_size=0) as running:
        yield running


@asynccontextmanager
async def mcp_client(server: RunningServer, token: str | None = None,
                     mode: str = "auto") -> AsyncIterator[Client]:
    """The MCP SDK's own client (``mode="auto"``: the 2026 revision against this server;
    ``"legacy"``: the ``initialize`` handshake, as older clients do)."""
    headers = {"Authorization": f"Bearer {token or server.token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with Client(streamable_http_client(server.url, http_client=http),
                          mode=mode) as client:
            yield client


async def call(client: Client, tool: str, arguments: dict[str, Any],
               meta: dict[str, Any] | None = None) -> tuple[bool, Any]:
    """(is_error, structured result or the error text)."""
    result = await client.call_tool(tool, arguments, meta=meta)
    if result.is_error:
        return True, result.content[0].text
    return False, result.structured_content


async def snapshot(db: asyncpg.Connection) -> dict[str, str]:
    """A fingerprint of every row of the tables a refund touches."""
    out = {}
    for table in ("refunds", "orders", "audit_log"):
        out[table] = await db.fetchval(
            "SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
            f" FROM {table} t"
        )
    return out


async def fresh_orders(db: asyncpg.Connection, n: int) -> list[asyncpg.Record]:
    """Delivered orders nobody has refunded yet, other than the scenario's #4429 and #4433."""
    rows = await db.fetch(
        "SELECT id, amount_cents FROM orders o WHERE status = 'delivered'"
        " AND id NOT IN ('4429', '4433')"
        " AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.id) ORDER BY id LIMIT $1",
        n,
    )
    assert len(rows) == n, "the seed has too few unrefunded orders for this test"
    return rows


# --- 1. the surface --------------------------------------------------------------------------


async def test_exactly_five_tools_no_sql(server: RunningServer) -> None:
    async with mcp_client(server) as client:
        tools = (await client.list_tools()).tools
    assert {t.name: set(t.input_schema["properties"]) for t in tools} == TOOLS
    for tool in tools:
        schema = tool.input_schema
        # Typed inputs only: strings and integers, nothing free-form, nothing called SQL.
        assert {p["type"] for p in schema["properties"].values()} <= {"string", "integer"}
        assert not any("sql" in name.lower() or "query" in name.lower()
                       for name in schema["properties"])
        assert "sql" not in tool.name.lower()
        # Each description tells the model when to call it.
        assert "Call it" in (tool.description or ""), tool.name
    kinds = {t.name: t.annotations.read_only_hint for t in tools}
    assert kinds == {name: name != "issue_refund" for name in TOOLS}


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_both_protocol_eras_are_served(server: RunningServer, mode: str) -> None:
    """The worker speaks the 2026 revision; a client of the handshake era (an older SDK, a
    person's coding agent) still gets the same tools and answers."""
    async with mcp_client(server, mode=mode) as client:
        assert client.protocol_version == ("2026-07-28" if mode == "auto" else "2025-11-25")
        assert {t.name for t in (await client.list_tools()).tools} == set(TOOLS)
        is_error, order = await call(client, "lookup_order", {"order_id": "4429"})
    assert not is_error and order["order_id"] == "4429"


# --- reads -----------------------------------------------------------------------------------


async def test_lookup_customer_and_email(server: RunningServer) -> None:
    async with mcp_client(server) as client:
        error, sam = await call(client, "lookup_customer", {"customer_id": "cus-1001"})
        assert not error
        assert sam == {"customer_id": "cus-1001", "email": "sam.rivera@example.com",
                       "name": "Sam Rivera", "tier": "pro", "open_ticket_count": 0}
        # No tier recorded: standard.
        error, tomas = await call(client, "lookup_customer", {"customer_id": "cus-1007"})
        assert not error and tomas["tier"] == "standard"
        error, text = await call(client, "lookup_customer", {"customer_id": "cus-9999"})
        assert error and "no customer has id 'cus-9999'" in text
        error, found = await call(client, "find_customer_by_email",
                                  {"email": "  Sam.Rivera@Example.com "})
        assert not error and found["customer_id"] == "cus-1001"
        assert "4429" in [o["order_id"] for o in found["recent_orders"]]
        error, text = await call(client, "find_customer_by_email", {"email": "nobody@example.com"})
        assert error and "no customer has the email address nobody@example.com" in text
        error, text = await call(client, "find_customer_by_email", {"email": "not an email"})
        assert error and "is not an email address" in text


async def test_open_ticket_count_counts_open_tickets(server: RunningServer,
                                                     db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO tickets (id, customer_id, subject, body, status) VALUES"
        " ('T-open-1', 'cus-1003', 'still broken', 'x', 'open'),"
        " ('T-open-2', 'cus-1003', 'another', 'y', 'pending')"
    )
    async with mcp_client(server) as client:
        error, jordan = await call(client, "lookup_customer", {"customer_id": "cus-1003"})
    assert not error and jordan["open_ticket_count"] == 2


async def test_a_search_holds_no_connection_while_its_query_is_embedded(
        seeded_db: str, monkeypatch) -> None:
    """A search waits for the model (under load, for the batch ahead of it too) without a
    pool connection: with a pool of one, a lookup goes through while a search is embedding."""
    from fleet.database import create_pool
    from fleet.embeddings import model_spec
    from mcp_customer_data import data

    settings = Settings(database_url=seeded_db)
    pool = await create_pool(settings, "fleet-test", url=seeded_db, min_size=1, max_size=1,
                             vector=True)
    embedding, release = asyncio.Event(), asyncio.Event()
    real = data.aembed_query

    async def slow_model(text, settings=None):
        embedding.set()
        await release.wait()
        return await real(text, settings)

    monkeypatch.setattr(data, "aembed_query", slow_model)
    try:
        search = asyncio.create_task(data.find_similar_resolved_tickets(
            pool, model_spec(settings), "my refund never arrived", 3, settings))
        await asyncio.wait_for(embedding.wait(), 10)
        order = await asyncio.wait_for(data.lookup_order(pool, "4429"), 5)
        release.set()
        found = await asyncio.wait_for(search, 30)
    finally:
        release.set()
        await pool.close()
    assert order.order_id == "4429" and found.matches


async def test_lookup_order(server: RunningServer) -> None:
    async with mcp_client(server) as client:
        error, order = await call(client, "lookup_order", {"order_id": "#4429"})
        assert not error
        assert order["order_id"] == "4429" and order["customer_id"] == "cus-1001"
        assert order["amount_cents"] == 12900 and order["refundable_cents"] == 12900
        assert order["customer_tier"] == "pro" and order["refunds"] == []
        error, partial = await call(client, "lookup_order", {"order_id": "4431"})
        assert not error
        assert (partial["refunded_cents"], partial["refundable_cents"]) == (1500, 3099)
        assert [r["amount_cents"] for r in partial["refunds"]] == [1500]
        error, text = await call(client, "lookup_order", {"order_id": "123456"})
        assert error and "no order has id '123456'" in text


async def test_reads_for_a_conversation_are_audited_in_their_own_statement(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    """A read made for a turn leaves its customer_data_read row (tool, arguments, run variables,
    what was found); a conversation that does not exist keeps the row with no link; an
    operator's call (no _meta) and a read that finds nothing leave none."""
    session = f"sess-{uuid.uuid4().hex[:8]}"
    await db.execute("INSERT INTO conversations (session_id, user_id) VALUES ($1, 'cus-1001')",
                     session)
    before = await db.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")
    meta = {"session_id": session, "message_id": 7, "variables": {"tenant_id": "t-1"}}
    async with mcp_client(server) as client:
        error, order = await call(client, "lookup_order", {"order_id": "4431"}, meta=meta)
        assert not error and [r["amount_cents"] for r in order["refunds"]] == [1500]
        error, found = await call(client, "find_customer_by_email",
                                  {"email": "sam.rivera@example.com"}, meta=meta)
        assert not error and "4429" in [o["order_id"] for o in found["recent_orders"]]
        error, _ = await call(client, "lookup_customer", {"customer_id": "cus-9999"}, meta=meta)
        assert error
        error, _ = await call(client, "lookup_customer", {"customer_id": "cus-1001"})
        assert not error
        error, _ = await call(client, "lookup_customer", {"customer_id": "cus-1001"},
                              meta={"session_id": "no-such-session"})
        assert not error
    rows = await db.fetch("SELECT * FROM audit_log WHERE id > $1 AND action = 'customer_data_read'"
                          " ORDER BY id", before)
    assert [(r["target"], r["conversation_id"]) for r in rows] == [
        ("mcp:lookup_order", session), ("mcp:find_customer_by_email", session),
        ("mcp:lookup_customer", None)]
    order_row, email_row, orphan = rows
    assert order_row["payload"] == {
        "tool": "lookup_order", "arguments": {"order_id": "4431"}, "session_id": session,
        "message_id": 7, "variables": {"tenant_id": "t-1"}, "traceparent": None}
    assert order_row["result"] == {"order_id": "4431", "customer_id": order["customer_id"]}
    assert order_row["actor"] == "mcp:customer-data"
    assert email_row["result"] == {"customer_id": "cus-1001"}
    assert orphan["payload"]["session_id"] == "no-such-session"
    assert orphan["result"] == {"customer_id": "cus-1001"}


async def test_similar_tickets_ranked_and_capped(server: RunningServer) -> None:
    async with mcp_client(server) as client:
        error, found = await call(client, "find_similar_resolved_tickets", {
            "description": "I'm Sam, and I haven't had my refund for order #4429 in two weeks.",
            "limit": 3,
        })
        assert not error
        matches = found["matches"]
        assert len(matches) == 3
        assert matches[0]["ticket_id"] == "4471"
        assert all(m["category"] == "refund_delayed" for m in matches[:2])
        distances = [m["distance"] for m in matches]
        assert distances == sorted(distances)
        assert matches[0]["resolution"]
        error, capped = await call(client, "find_similar_resolved_tickets",
                                   {"description": "my parcel never arrived", "limit": 500})
        assert not error and capped["limit_applied"] == 10 and len(capped["matches"]) == 10
        assert capped["matches"][0]["category"] in {"lost_package", "shipping_delay"}
        error, text = await call(client, "find_similar_resolved_tickets",
                                 {"description": "   ", "limit": 3})
        assert error and "description is empty" in text
        error, text = await call(client, "find_similar_resolved_tickets",
                                 {"description": "refund", "limit": 0})
        assert error and "limit must be a positive integer" in text


# --- 2. refusals change nothing ----------------------------------------------------------------

REFUSALS = [
    ("unknown order", {"order_id": "9999999", "amount_cents": 100, "reason": "r"},
     "no order has id '9999999'"),
    ("not an order number", {"order_id": "4429; DROP TABLE refunds", "amount_cents": 1,
                             "reason": "r"}, "is not an order number"),
    ("zero", {"order_id": "4429", "amount_cents": 0, "reason": "r"},
     "amount_cents must be a positive integer"),
    ("negative", {"order_id": "4429", "amount_cents": -500, "reason": "r"},
     "amount_cents must be a positive integer"),
    ("fraction", {"order_id": "4429", "amount_cents": 12.5, "reason": "r"}, "amount_cents"),
    ("string", {"order_id": "4429", "amount_cents": "100", "reason": "r"}, "amount_cents"),
    ("boolean", {"order_id": "4429", "amount_cents": True, "reason": "r"}, "amount_cents"),
    ("over what is left", {"order_id": "4431", "amount_cents": 3100, "reason": "r"},
     "more than the 3099 cents still refundable on order 4431"),
    ("already fully refunded", {"order_id": "4432", "amount_cents": 1, "reason": "r"},
     "more than the 0 cents still refundable on order 4432"),
    ("more than paid", {"order_id": "4429", "amount_cents": 12901, "reason": "r"},
     "more than the 12900 cents still refundable"),
    ("empty reason", {"order_id": "4429", "amount_cents": 100, "reason": "   "},
     "reason is empty"),
]


@pytest.mark.parametrize(("arguments", "message"), [(a, m) for _, a, m in REFUSALS],
                         ids=[name for name, _, _ in REFUSALS])
async def test_refusals_name_the_problem_and_write_nothing(
    server: RunningServer, db: asyncpg.Connection, arguments: dict[str, Any], message: str
) -> None:
    before = await snapshot(db)
    async with mcp_client(server) as client:
        error, text = await call(client, "issue_refund", arguments,
                                 meta={"idempotency_key": f"call-{uuid.uuid4()}"})
    assert error, text
    assert message in text
    assert await snapshot(db) == before


async def test_failure_between_refund_and_audit_leaves_neither(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    """A trigger makes the refund_issued audit insert fail: the real issue_refund path runs
    (refund inserted, order updated: the trigger checks both are visible, hence FI001) and the
    whole transaction rolls back."""
    (order,) = await fresh_orders(db, 1)
    await db.execute("""
        CREATE FUNCTION pg_temp_fail_refund_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.action = 'refund_issued' THEN
                IF EXISTS (SELECT 1 FROM refunds WHERE id = (NEW.result->>'refund_id')::uuid)
                   AND EXISTS (SELECT 1 FROM orders WHERE id = NEW.payload->>'order_id'
                               AND status = 'partially_refunded') THEN
                    RAISE EXCEPTION 'injected: refund written, audit fails' USING ERRCODE = 'FI001';
                END IF;
                RAISE EXCEPTION 'injected: refund not visible' USING ERRCODE = 'FI002';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER fail_refund_audit BEFORE INSERT ON audit_log
            FOR EACH ROW EXECUTE FUNCTION pg_temp_fail_refund_audit();
    """)
    arguments = {"order_id": order["id"], "amount_cents": 500, "reason": "damaged box"}
    key = f"call-{uuid.uuid4()}"
    try:
        before = await snapshot(db)
        async with mcp_client(server) as client:
            error, text = await call(client, "issue_refund", arguments,
                                     meta={"idempotency_key": key})
        assert error
        assert "database error FI001" in text and "nothing was refunded" in text
        assert await snapshot(db) == before
    finally:
        await db.execute("DROP TRIGGER fail_refund_audit ON audit_log;"
                         " DROP FUNCTION pg_temp_fail_refund_audit()")
    # The same call (same key) now goes through: the failure was the audit insert alone.
    async with mcp_client(server) as client:
        error, refund = await call(client, "issue_refund", arguments,
                                   meta={"idempotency_key": key})
    assert not error and refund["replayed"] is False
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE idempotency_key = $1", key) == 1


# --- a refund, its receipt, and 3. idempotency -------------------------------------------------


async def test_refund_writes_refund_status_and_audit_together(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    (order,) = await fresh_orders(db, 1)
    session = f"sess-{uuid.uuid4().hex[:8]}"
    await db.execute("INSERT INTO conversations (session_id, user_id) VALUES ($1, 'cus-1001')",
                     session)
    key = f"call-{uuid.uuid4()}"
    async with mcp_client(server) as client:
        error, first = await call(
            client, "issue_refund",
            {"order_id": order["id"], "amount_cents": 1000, "reason": "late delivery"},
            meta={"idempotency_key": key, "session_id": session, "message_id": 42},
        )
        assert not error, first
        assert first["order_status"] == "partially_refunded"
        assert first["refundable_cents"] == order["amount_cents"] - 1000
        rest = order["amount_cents"] - 1000
        error, second = await call(
            client, "issue_refund",
            {"order_id": order["id"], "amount_cents": rest, "reason": "item returned"},
            meta={"idempotency_key": f"call-{uuid.uuid4()}", "session_id": session},
        )
        assert not error and second["order_status"] == "refunded"
        assert second["refundable_cents"] == 0
    assert await db.fetchval("SELECT status FROM orders WHERE id = $1", order["id"]) == "refunded"
    audit = await db.fetch(
        "SELECT * FROM audit_log WHERE action = 'refund_issued' AND conversation_id = $1"
        " ORDER BY id", session)
    assert [a["payload"]["amount_cents"] for a in audit] == [1000, rest]
    assert audit[0]["payload"]["idempotency_key"] == key
    assert audit[0]["payload"]["message_id"] == 42
    assert audit[0]["result"]["refund_id"] == first["refund_id"]
    assert audit[0]["actor"] == "mcp:customer-data"
    assert server.token not in json.dumps([dict(a) for a in audit], default=str)
    refund = await db.fetchrow("SELECT * FROM refunds WHERE idempotency_key = $1", key)
    assert refund["conversation_id"] == session and refund["amount_cents"] == 1000


async def test_same_key_twice_gives_one_refund(server: RunningServer,
                                               db: asyncpg.Connection) -> None:
    (order,) = await fresh_orders(db, 1)
    key = f"call-{uuid.uuid4()}"
    arguments = {"order_id": order["id"], "amount_cents": 700, "reason": "goodwill"}
    async with mcp_client(server) as client:
        error, first = await call(client, "issue_refund", arguments, meta={"idempotency_key": key})
        assert not error
        before = await snapshot(db)
        error, again = await call(client, "issue_refund", arguments, meta={"idempotency_key": key})
        assert not error
        assert again["refund_id"] == first["refund_id"] and again["replayed"] is True
        assert await snapshot(db) == before  # the repeat wrote nothing, not even audit
        # The key belongs to that refund: reusing it for another amount is refused.
        error, text = await call(client, "issue_refund", {**arguments, "amount_cents": 701},
                                 meta={"idempotency_key": key})
        assert error and "already issued a refund of 700 cents" in text
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE order_id = $1", order["id"]) == 1


async def test_concurrent_calls_with_one_key_give_one_refund(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    key = f"call-{uuid.uuid4()}"
    audit_before = await db.fetchval("SELECT count(*) FROM audit_log")

    async def one() -> tuple[bool, Any]:
        async with mcp_client(server) as client:
            return await call(client, "issue_refund",
                              {"order_id": "4433", "amount_cents": 500, "reason": "duplicate"},
                              meta={"idempotency_key": key})

    results = await asyncio.gather(*(one() for _ in range(8)))
    assert all(not error for error, _ in results), results
    assert len({r["refund_id"] for _, r in results}) == 1
    assert sorted(r["replayed"] for _, r in results) == [False] + [True] * 7
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE idempotency_key = $1", key) == 1
    assert await db.fetchval("SELECT count(*) FROM audit_log") == audit_before + 1


async def test_concurrent_refunds_never_exceed_what_was_paid(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    (order,) = await fresh_orders(db, 1)
    share = order["amount_cents"] // 3 + 1  # two fit, the third would overshoot

    async def one() -> tuple[bool, Any]:
        async with mcp_client(server) as client:
            return await call(client, "issue_refund",
                              {"order_id": order["id"], "amount_cents": share, "reason": "split"},
                              meta={"idempotency_key": f"call-{uuid.uuid4()}"})

    results = await asyncio.gather(*(one() for _ in range(5)))
    ok = [r for error, r in results if not error]
    refused = [r for error, r in results if error]
    assert len(ok) == 2 and len(refused) == 3
    assert all("still refundable" in text for text in refused)
    total = await db.fetchval("SELECT sum(amount_cents) FROM refunds WHERE order_id = $1",
                              order["id"])
    assert total == 2 * share <= order["amount_cents"]


async def test_unknown_session_rolls_the_refund_back(server: RunningServer,
                                                     db: asyncpg.Connection) -> None:
    """audit_log.conversation_id is a foreign key: a refund whose receipt cannot be written
    is not written either."""
    (order,) = await fresh_orders(db, 1)
    before = await snapshot(db)
    async with mcp_client(server) as client:
        error, text = await call(
            client, "issue_refund", {"order_id": order["id"], "amount_cents": 100, "reason": "r"},
            meta={"idempotency_key": f"call-{uuid.uuid4()}", "session_id": "no-such-session"})
    assert error and "has no conversations row" in text and "nothing was refunded" in text
    assert await snapshot(db) == before


# --- 4. auth ---------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong", "tok-"], ids=["none", "wrong", "prefix"])
async def test_without_the_right_token_401_and_nothing_happens(
    server: RunningServer, db: asyncpg.Connection, token: str | None
) -> None:
    before = await snapshot(db)
    request = {
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "issue_refund",
                   "arguments": {"order_id": "4429", "amount_cents": 100, "reason": "r"}},
    }
    headers = {"Accept": "application/json, text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(server.url, json=request, headers=headers)
    assert response.status_code == 401
    assert await snapshot(db) == before
    # And through a real MCP client the session cannot even start.
    with pytest.raises(Exception):  # noqa: B017 - the client surfaces the 401 its own way
        async with mcp_client(server, token=token or "x") as client:
            await client.list_tools()


def test_token_is_required_to_start(seeded_db: str) -> None:
    from fleet.errors import ConfigurationError
    from mcp_customer_data import create_app

    with pytest.raises(ConfigurationError, match="CUSTOMER_DATA_TOKEN is not set"):
        create_app(Settings(database_url=seeded_db, customer_data_token=None))


def test_fleet_mcp_serve_without_token_exits_with_one_sentence(fleet_env: dict[str, str]) -> None:
    from tests.processes import fleet

    env = {k: v for k, v in fleet_env.items() if k != "CUSTOMER_DATA_TOKEN"}
    done = fleet("mcp", "serve", "--port", "1", env=env, timeout=60)
    assert done.returncode != 0
    assert "CUSTOMER_DATA_TOKEN is not set" in done.stderr
    assert "Traceback" not in done.stderr


async def test_mixed_models_refused_by_the_search_tool(server: RunningServer,
                                                       db: asyncpg.Connection) -> None:
    doc = await db.fetchval("SELECT id FROM documents WHERE source = 'policy_library' LIMIT 1")
    await db.execute(
        "INSERT INTO embeddings (document_id, chunk_index, chunk_text, embedding, model)"
        " SELECT $1, 99, 'x', embedding, 'text-embedding-3-small' FROM embeddings LIMIT 1", doc)
    try:
        async with mcp_client(server) as client:
            error, text = await call(client, "find_similar_resolved_tickets",
                                     {"description": "refund", "limit": 3})
        assert error
        assert "text-embedding-3-small" in text and "all-MiniLM-L6-v2" in text
        assert "fleet reembed" in text
    finally:
        await db.execute("DELETE FROM embeddings WHERE chunk_index = 99 AND document_id = $1", doc)


# --- the same server through PgBouncer, as the fleet_mcp role ----------------------------------


async def test_least_privilege_role_through_pgbouncer(
    server_url: str, seeded_db: str, db: asyncpg.Connection
) -> None:
    """The server's statements work as a LOGIN role of the fleet_mcp group (no access to
    conversations, queue or DDL), through PgBouncer in transaction mode, statement cache 0."""
    from tests.pgbouncer import SKIP_REASON, pgbouncer_binary, running_pgbouncer

    if pgbouncer_binary() is None:
        pytest.skip(SKIP_REASON)
    role = f"mcp_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE fleet_mcp")
    try:
        as_role = as_login(seeded_db, role)
        (order,) = await fresh_orders(db, 1)
        with running_pgbouncer(as_role, pool_size=2) as pooled, \
                mcp_server_in_thread(pooled, fleet_statement_cache_size=0) as pooled_server:
            async with mcp_client(pooled_server) as client:
                for _ in range(3):  # repeated statements: no prepared-statement clash
                    error, found = await call(client, "lookup_order", {"order_id": order["id"]})
                    assert not error, found
                    # Audited as this role: it may append to audit_log, not read it.
                    error, found = await call(client, "lookup_order", {"order_id": order["id"]},
                                              meta={"session_id": "no-such-session"})
                    assert not error, found
                    error, similar = await call(client, "find_similar_resolved_tickets",
                                                {"description": "charged twice", "limit": 2})
                    assert not error, similar
                error, refund = await call(
                    client, "issue_refund",
                    {"order_id": order["id"], "amount_cents": 250, "reason": "scratched"},
                    meta={"idempotency_key": f"call-{uuid.uuid4()}"})
                assert not error, refund
        assert await db.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'refund_issued'"
            " AND result->>'refund_id' = $1", refund["refund_id"]) == 1
    finally:
        await admin.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await admin.close()


async def test_pooled_connections_list_once_and_validate_every_result(
        server: RunningServer) -> None:
    """The pool lists the tools and compiles each output schema once; concurrent calls use
    connections of their own (reused afterwards), and every result is still checked against
    its tool's schema."""
    from pydantic import SecretStr

    from fleet.mcp_client import MCPClientPool

    cfg = server.settings.model_copy(update={
        "customer_data_url": server.url, "customer_data_token": SecretStr(server.token)})
    pool = MCPClientPool(cfg)
    try:
        await pool.warm()
        assert set(pool._validators) == {t.name for t in await pool.tools()}
        # The SDK's server answers server/discover: the 2026 revision, per-request envelopes.
        assert pool.endpoint.modern and pool.endpoint.protocol_version == "2026-07-28"
        validators = dict(pool._validators)
        for _ in range(2):
            results = await asyncio.gather(*(
                pool.call_tool("lookup_order", {"order_id": "4429"}, {"session_id": f"pool-{i}"})
                for i in range(6)))
            assert all(not r.is_error and r.structured_content["order_id"] == "4429"
                       for r in results)
        assert 2 <= pool.created <= 6, "concurrent calls on their own connections, then reused"
        assert pool._validators == validators  # compiled once, not per call or connection
        # Validation still happens: a result that breaks the schema is refused.
        bad = results[0].model_copy(update={"structured_content": {"order": "not an object"}})
        with pytest.raises(RuntimeError, match="Invalid structured content"):
            pool.validate("lookup_order", bad)
        missing = results[0].model_copy(update={"structured_content": None})
        with pytest.raises(RuntimeError, match="did not return structured content"):
            pool.validate("lookup_order", missing)
    finally:
        await pool.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced_transparently() -> None:
    """A kept-alive connection the server closed between two calls (its keep-alive timeout)
    costs the second call nothing: it is sent again on a new connection, not failed or
    retried with a back-off."""
    from pydantic import SecretStr

    from fleet.mcp_client import MCPClientPool

    served = dropped = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one request, then drop the connection when the next one arrives (as a
        server whose keep-alive timeout fired just then)."""
        nonlocal served, dropped
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        request = json.loads(await reader.readexactly(length))
        result: dict[str, Any] = {"content": [{"type": "text", "text": "ok"}], "isError": False}
        if request["method"] == "initialize":
            result = {"protocolVersion": "2025-06-18", "capabilities": {},
                      "serverInfo": {"name": "stub", "version": "1"}}
        elif request["method"] == "tools/list":
            result = {"tools": [{"name": "ping", "inputSchema": {"type": "object"}}]}
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"], "result": result}
        if request["method"] == "server/discover":  # a handshake-era server
            answer = {"jsonrpc": "2.0", "id": request["id"],
                      "error": {"code": -32601, "message": "Method not found"}}
        body = json.dumps(answer).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        served += 1
        if await reader.read(1):
            dropped += 1
        writer.close()

    stub = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = stub.sockets[0].getsockname()[1]
    cfg = Settings(customer_data_url=f"http://127.0.0.1:{port}/mcp",
                   customer_data_token=SecretStr("t"))
    pool = MCPClientPool(cfg, attempts=1)  # no retries: a failure would fail the call
    try:
        for i in range(3):
            result = await pool.call_tool("ping", {}, {"session_id": f"s{i}"})
            assert not result.is_error and result.content[0].text == "ok"
        # the discover probe (on a connection of its own), initialize, tools/list and three
        # calls each answered once; every request after initialize met a dropped connection
        # and went again on a new one
        assert (served, dropped) == (6, 4)
    finally:
        await pool.close()
        stub.close()
        await stub.wait_closed()


@pytest.mark.parametrize("era", ["2026-07-28", "2025-06-18"])
async def test_the_pool_speaks_what_the_server_speaks(era: str) -> None:
    """Like the SDK client's default mode: a server that answers ``server/discover`` with the
    2026 revision gets per-request envelopes (``_meta`` keys, ``Mcp-Method``/``Mcp-Name``
    headers matching the body, the caller's own ``_meta`` kept) and no handshake; one that
    does not gets ``initialize`` and the version header (and no ``Mcp-Param-*`` mirror of
    a declared argument, which only the 2026 revision has). A 429 on the probe is no verdict:
    the pool waits and probes again."""
    from pydantic import SecretStr

    from fleet.mcp_client import MCPClientPool

    seen: list[tuple[str, dict[str, str], dict[str, Any]]] = []
    throttled = False

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal throttled
        while head := await reader.readuntil(b"\r\n\r\n"):
            lines = head.decode("latin-1").split("\r\n")[1:-2]
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines)}
            request = json.loads(await reader.readexactly(int(headers["content-length"])))
            method, params = request["method"], request.get("params") or {}
            seen.append((method, headers, params))
            status, error, result = 200, None, None
            if method == "server/discover" and not throttled:
                throttled = True
                status, error = 429, {"code": -32029, "message": "rate limited",
                                      "data": {"retry_after": 0.01}}
            elif method == "server/discover" and era == "2026-07-28":
                result = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}}
            elif method == "server/discover":
                error = {"code": -32601, "message": "Method not found"}
            elif method == "initialize":
                result = {"protocolVersion": era, "capabilities": {},
                          "serverInfo": {"name": "stub", "version": "1"}}
            elif method == "tools/list":  # one argument declared as an Mcp-Param header
                result = {"tools": [{"name": "ping", "inputSchema": {
                    "type": "object",
                    "properties": {"region": {"type": "string", "x-mcp-header": "Region"}}}}]}
            else:
                result = {"content": [{"type": "text", "text": "ok"}], "isError": False}
            message = {"jsonrpc": "2.0", "id": request["id"]}
            message.update({"error": error} if error else {"result": result})
            body = json.dumps(message).encode()
            writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (status, len(body), body))
            await writer.drain()

    stub = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = stub.sockets[0].getsockname()[1]
    pool = MCPClientPool(Settings(customer_data_url=f"http://127.0.0.1:{port}/mcp",
                                  customer_data_token=SecretStr("t")), attempts=1)
    try:
        result = await pool.call_tool("ping", {"region": "eu"}, {"session_id": "s1"})
        assert not result.is_error and pool.endpoint.protocol_version == era
    finally:
        await pool.close()
        stub.close()
        await stub.wait_closed()
    methods = [method for method, _, _ in seen]
    _, call_headers, call_params = seen[-1]
    assert call_headers["mcp-protocol-version"] == era
    assert call_params["arguments"] == {"region": "eu"}
    assert call_params["_meta"]["session_id"] == "s1"
    if era == "2026-07-28":
        assert methods == ["server/discover", "server/discover", "tools/list", "tools/call"]
        assert pool.endpoint.modern
        assert call_headers["mcp-method"] == "tools/call" and call_headers["mcp-name"] == "ping"
        assert call_headers["mcp-param-region"] == "eu"
        envelope = call_params["_meta"]
        assert envelope["io.modelcontextprotocol/protocolVersion"] == era
        assert envelope["io.modelcontextprotocol/clientInfo"]["name"] == "fleet-worker"
        assert "io.modelcontextprotocol/clientCapabilities" in envelope
    else:
        assert methods == ["server/discover", "server/discover", "initialize", "tools/list",
                           "tools/call"]
        assert not pool.endpoint.modern
        assert "mcp-method" not in call_headers and "mcp-param-region" not in call_headers
        assert not any(key.startswith("io.modelcontextprotocol/")
                       for key in call_params["_meta"])


async def test_a_call_waits_for_a_restarting_server_instead_of_failing(seeded_db: str) -> None:
    """Nothing listens yet (the server is restarting): the call waits for it, within
    FLEET_MCP_STARTUP_WAIT_SECONDS, and succeeds, costing the turn no attempt."""
    from contextlib import ExitStack

    from pydantic import SecretStr

    from fleet.mcp_client import MCPClientPool
    from tests.seeded import free_port

    port = free_port()
    token = f"tok-{uuid.uuid4().hex}"
    cfg = Settings(database_url=seeded_db, customer_data_url=f"http://127.0.0.1:{port}/mcp",
                   customer_data_token=SecretStr(token), fleet_mcp_startup_wait_seconds=60)
    pool = MCPClientPool(cfg, attempts=1)  # one attempt: the wait must not use it up
    with ExitStack() as stack:
        call = asyncio.create_task(
            pool.call_tool("lookup_order", {"order_id": "4429"}, {"session_id": "outage"}))
        await asyncio.sleep(3)
        assert not call.done(), "the call should still be waiting for the server"
        await asyncio.to_thread(stack.enter_context, mcp_server_in_thread(
            seeded_db, port=port, token=token))
        result = await asyncio.wait_for(call, 60)
        await pool.close()
    assert not result.is_error and "4429" in json.dumps(result.structured_content)


async def test_an_outage_longer_than_the_wait_fails_the_call(seeded_db: str) -> None:
    from pydantic import SecretStr

    from fleet.mcp_client import CustomerDataUnavailable, MCPClientPool
    from tests.seeded import free_port

    cfg = Settings(database_url=seeded_db,
                   customer_data_url=f"http://127.0.0.1:{free_port()}/mcp",
                   customer_data_token=SecretStr("t"), fleet_mcp_startup_wait_seconds=1.5)
    pool = MCPClientPool(cfg, attempts=2)
    try:
        with pytest.raises(CustomerDataUnavailable, match="failed after 2 attempts"):
            await pool.call_tool("lookup_order", {"order_id": "4429"}, {"session_id": "x"})
    finally:
        await pool.close()
