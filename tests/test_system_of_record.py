"""The system of record on real PostgreSQL: schema, seed, semantic search, mixed models, reembed.

Issue 3's acceptance 5 (semantic ranking, `fleet search`) and 6 (seeding is idempotent, past
cases == tickets == embeddings, one model). The corpus is seeded once per test session
(tests/seeded.py) and cloned where a test writes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import numpy as np
import pytest

from fleet.settings import Settings
from tests.seeded import seeded_clone, seeded_template

MONEY = {"refund_delayed", "refund_request", "duplicate_charge", "billing_error"}
SHIPPING_OR_LOGIN = {"shipping_delay", "lost_package", "login", "two_factor"}


@pytest.fixture(scope="module")
def seeded(server_url: str, template_url: str) -> tuple[str, Any]:
    return seeded_template(server_url)


@pytest.fixture
def clone(server_url: str, seeded: tuple[str, Any]) -> Iterator[str]:
    with seeded_clone(server_url) as url:
        yield url


async def _connect(url: str) -> asyncpg.Connection:
    from fleet.database import connect

    return await connect(Settings(database_url=url), "fleet-test", url=url, vector=True)


@pytest.fixture
async def sconn(clone: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await _connect(clone)
    yield conn
    await conn.close()


# --- schema ----------------------------------------------------------------------------------


async def test_schema_has_the_course_tables_and_constraints(conn: asyncpg.Connection) -> None:
    tables = {r["tablename"] for r in await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables >= {"conversations", "documents", "embeddings", "audit_log",
                      "capability_invocations", "customers", "orders", "tickets", "refunds",
                      "run_states"}
    columns = {r["column_name"] for r in await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'audit_log'")}
    assert columns == {"id", "conversation_id", "actor", "action", "target", "payload",
                       "result", "created_at"}
    # The vector column's width follows the configured model; the index is HNSW, cosine.
    assert await conn.fetchval(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = 'embeddings'::regclass AND attname = 'embedding'") == "vector(384)"
    index = await conn.fetchval("SELECT indexdef FROM pg_indexes"
                                " WHERE indexname = 'idx_embeddings_hnsw'")
    assert "USING hnsw" in index and "vector_cosine_ops" in index

    await conn.execute("INSERT INTO conversations (session_id, user_id) VALUES ('s1', 'u1')")
    refused = [
        "INSERT INTO audit_log (actor, action, payload) VALUES ('x', 'made_up_verb', '{}')",
        "INSERT INTO capability_invocations (conversation_id, capability, arguments, status)"
        " VALUES ('s1', 'tool:x', '{}', 'maybe')",
        "INSERT INTO customers (id, email, name, metadata)"
        " VALUES ('c1', 'a@b.co', 'A', '{\"tier\": \"gold\"}')",
        "INSERT INTO customers (id, email, name) VALUES ('c2', 'Upper@Case.com', 'B')",
        "INSERT INTO embeddings (chunk_text, chunk_index, embedding, model)"
        f" VALUES ('x', 0, '[{','.join(['0.1'] * 384)}]', 'm')",  # neither document nor chat
        "INSERT INTO tickets (id, customer_id, subject, body, status)"
        " VALUES ('t1', 'nobody', 's', 'b', 'resolved')",
    ]
    for statement in refused:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError):
            await conn.execute(statement)
    await conn.execute("INSERT INTO customers (id, email, name) VALUES ('c3', 'c@d.co', 'C')")
    await conn.execute("INSERT INTO orders (id, customer_id, amount_cents, status)"
                       " VALUES ('o1', 'c3', 100, 'paid')")
    for amount, reason in ((0, "r"), (-1, "r"), (10, "  ")):
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO refunds (order_id, amount_cents, reason)"
                               " VALUES ('o1', $1, $2)", amount, reason)
    run_state = await conn.fetchrow(
        "INSERT INTO run_states (conversation_id, tool, arguments, call_id, state, expires_at)"
        " VALUES ('s1', 'issue_refund', '{}', 'c1', '{}', now() + interval '1 day')"
        " RETURNING status, interruptions")
    assert (run_state["status"], run_state["interruptions"]) == ("awaiting", [])


async def test_openai_model_gives_a_1536_wide_column(server_url: str, template_url: str) -> None:
    """The migration's placeholders follow FLEET_EMBEDDINGS: a database migrated for
    text-embedding-3-small gets vector(1536)."""
    from fleet.database import connect
    from fleet.migrate import migrate
    from tests.seeded import _admin, with_database

    await _admin(server_url, 'DROP DATABASE IF EXISTS "t_openai_dims" WITH (FORCE)')
    await _admin(server_url, 'CREATE DATABASE "t_openai_dims"')
    url = with_database(server_url, "t_openai_dims")
    try:
        settings = Settings(database_url=url, fleet_embeddings="openai")
        conn = await connect(settings, "fleet-test", url=url)
        try:
            await migrate(conn, settings)
            assert await conn.fetchval(
                "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'embeddings'::regclass"
                " AND attname = 'embedding'") == 1536
        finally:
            await conn.close()
    finally:
        await _admin(server_url, 'DROP DATABASE IF EXISTS "t_openai_dims" WITH (FORCE)')


# --- 6. seeding ------------------------------------------------------------------------------


async def test_seed_lays_down_the_corpus_in_the_searchable_shape(
    seeded: tuple[str, Any]
) -> None:
    url, report = seeded
    conn = await _connect(url)
    try:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM tickets) AS tickets,"
            " (SELECT count(*) FROM tickets WHERE status = 'resolved') AS resolved,"
            " (SELECT count(*) FROM documents WHERE source = 'past_case') AS past_cases,"
            " (SELECT count(*) FROM embeddings e JOIN documents d ON d.id = e.document_id"
            "   WHERE d.source = 'past_case') AS past_case_embeddings,"
            " (SELECT count(DISTINCT model) FROM embeddings) AS models,"
            " (SELECT count(DISTINCT category) FROM tickets) AS categories,"
            " (SELECT count(DISTINCT subject) FROM tickets) AS subjects,"
            " (SELECT count(DISTINCT resolution) FROM tickets) AS resolutions")
        assert counts["tickets"] >= 40
        assert counts["tickets"] == counts["resolved"] == counts["past_cases"] \
            == counts["past_case_embeddings"]
        assert counts["models"] == 1
        assert counts["categories"] >= 12
        # Genuinely different cases, not rewordings: every subject and resolution is distinct.
        assert counts["subjects"] == counts["resolutions"] == counts["tickets"]
        # Every past case joins to its ticket the way find_similar_resolved_tickets reads it.
        assert await conn.fetchval(
            "SELECT count(*) FROM documents d JOIN tickets t ON t.id = d.metadata->>'ticket_id'"
            " WHERE d.source = 'past_case'") == counts["tickets"]
        assert await conn.fetchval("SELECT DISTINCT model FROM embeddings") == "all-MiniLM-L6-v2"
        order = await conn.fetchrow("SELECT * FROM orders WHERE id = '4429'")
        assert order["customer_id"] == "cus-1001" and order["amount_cents"] == 12900
        ticket = await conn.fetchrow("SELECT * FROM tickets WHERE id = '4471'")
        assert ticket["customer_id"] == "cus-1001" and "two weeks" in ticket["subject"]
        tiers = {r["tier"] for r in await conn.fetch(
            "SELECT DISTINCT COALESCE(metadata->>'tier', 'standard') AS tier FROM customers")}
        assert tiers == {"standard", "pro", "enterprise"}
        # Policies are chunked; past cases are one chunk each.
        assert await conn.fetchval(
            "SELECT max(n) FROM (SELECT count(*) AS n FROM embeddings e JOIN documents d"
            " ON d.id = e.document_id WHERE d.source = 'past_case' GROUP BY d.id) x") == 1
        assert await conn.fetchval(
            "SELECT count(*) FROM embeddings e JOIN documents d ON d.id = e.document_id"
            " WHERE d.source = 'policy_library'") > await conn.fetchval(
            "SELECT count(*) FROM documents WHERE source = 'policy_library'")
        audit = await conn.fetch("SELECT * FROM audit_log WHERE action = 'corpus_seeded'")
        assert len(audit) == 1 and audit[0]["payload"]["model"] == "all-MiniLM-L6-v2"
        assert audit[0]["result"]["totals"]["tickets"] == counts["tickets"]
    finally:
        await conn.close()
    assert report.added["tickets"] == counts["tickets"]


async def test_seeding_twice_changes_no_counts(clone: str, sconn: asyncpg.Connection) -> None:
    from fleet.seed import seed_database

    tables = ("customers", "orders", "refunds", "tickets", "documents", "embeddings")

    async def counts() -> dict[str, int]:
        return {t: await sconn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}

    before = await counts()
    report = await seed_database(sconn, Settings(database_url=clone))
    assert await counts() == before
    assert set(report.added.values()) == {0}
    assert await sconn.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'corpus_seeded'") == 2


async def test_seed_reembeds_a_case_whose_text_changed(clone: str,
                                                      sconn: asyncpg.Connection) -> None:
    from fleet.seed import seed_database

    # As if #4471 had been seeded (and embedded) from an older version of the generator.
    doc = await sconn.fetchval("UPDATE documents SET body = 'older text'"
                               " WHERE metadata->>'ticket_id' = '4471' RETURNING id")
    await sconn.execute("UPDATE embeddings SET chunk_text = 'older text' WHERE document_id = $1",
                        doc)
    report = await seed_database(sconn, Settings(database_url=clone))
    assert report.added["documents_updated"] == 1 and report.added["chunks_embedded"] == 1
    rows = await sconn.fetch("SELECT chunk_text FROM embeddings WHERE document_id = $1", doc)
    assert len(rows) == 1 and rows[0]["chunk_text"].startswith("Refund delayed two weeks")


# --- 5. semantic ranking ---------------------------------------------------------------------


async def test_money_back_ranks_refund_and_billing_above_shipping_and_login(
    seeded: tuple[str, Any]
) -> None:
    from fleet.search import search

    url, _ = seeded
    conn = await _connect(url)
    try:
        hits = await search(conn, "I never got my money back", Settings(database_url=url),
                            source="past_case", limit=50)
    finally:
        await conn.close()
    categories = [hit.metadata["category"] for hit in hits]
    assert len(categories) >= 40
    ranks = {cat: [i for i, c in enumerate(categories) if c == cat] for cat in set(categories)}
    money = sorted(i for cat in MONEY for i in ranks.get(cat, []))
    other = sorted(i for cat in SHIPPING_OR_LOGIN for i in ranks.get(cat, []))
    assert all(c in MONEY for c in categories[:5]), categories[:5]
    assert np.median(money) < np.median(other)
    assert min(other) > 5
    distances = [hit.distance for hit in hits]
    assert distances == sorted(distances)


async def test_source_filter_keeps_chats_from_posing_as_policy(seeded: tuple[str, Any]) -> None:
    from fleet.search import search

    url, _ = seeded
    conn = await _connect(url)
    settings = Settings(database_url=url)
    try:
        policy = await search(conn, "how long does a refund take to reach my card", settings,
                              source="policy_library", limit=5)
        cases = await search(conn, "how long does a refund take to reach my card", settings,
                             source="past_case", limit=5)
        everything = await search(conn, "how long does a refund take to reach my card",
                                  settings, limit=10)
    finally:
        await conn.close()
    assert len(policy) == 5 and {h.source for h in policy} == {"policy_library"}
    assert policy[0].metadata["slug"] == "refund-policy"
    assert "business days" in policy[0].chunk_text
    assert len(cases) == 5 and {h.source for h in cases} == {"past_case"}
    assert {h.source for h in everything} == {"policy_library", "past_case"}


def test_fleet_search_cli_puts_a_delayed_refund_first(
    seeded: tuple[str, Any], fleet_env: dict[str, str]
) -> None:
    """The real CLI in a subprocess (it loads the model itself, offline)."""
    from tests.processes import fleet

    url, _ = seeded
    env = dict(fleet_env, DATABASE_URL=url)
    done = fleet("search", "refund delayed two weeks", "--json", env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    hits = json.loads(done.stdout)
    assert len(hits) == 5
    assert hits[0]["metadata"]["category"] == "refund_delayed"
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    bad = fleet("search", "refund", "--source", "chat_logs", env=env, timeout=60)
    assert bad.returncode == 2
    assert "source must be one of past_case, policy_library" in bad.stderr


# --- mixed models and reembed ----------------------------------------------------------------


async def test_mixed_models_are_refused_naming_both_and_the_fix(
    clone: str, sconn: asyncpg.Connection
) -> None:
    from fleet.search import MixedModelsError, search
    from fleet.seed import seed_database

    await sconn.execute("UPDATE embeddings SET model = 'text-embedding-3-small'"
                        " WHERE id = (SELECT min(id::text)::uuid FROM embeddings)")
    settings = Settings(database_url=clone)
    with pytest.raises(MixedModelsError) as refused:
        await search(sconn, "refund", settings)
    message = str(refused.value)
    assert "text-embedding-3-small" in message and "all-MiniLM-L6-v2" in message
    assert "fleet reembed" in message
    with pytest.raises(MixedModelsError):
        await seed_database(sconn, settings)


async def test_reembed_is_resumable(clone: str, sconn: asyncpg.Connection) -> None:
    """All rows stale (another model's name); the first run dies after one batch; searching is
    still refused; a second run finishes; every document has fresh chunks of one model."""
    from fleet.embeddings.store import reembed
    from fleet.search import MixedModelsError, search

    settings = Settings(database_url=clone)
    total = await sconn.fetchval("SELECT count(*) FROM embeddings")
    await sconn.execute("UPDATE embeddings SET model = 'old-model'")

    class Interrupted(Exception):
        pass

    def die_after_first_batch(message: str) -> None:
        if message.startswith("re-embedded"):
            raise Interrupted

    with pytest.raises(Interrupted):
        await reembed(sconn, settings, batch=10, progress=die_after_first_batch)
    assert await sconn.fetchval("SELECT count(*) FROM embeddings WHERE model = 'old-model'") > 0
    assert await sconn.fetchval(
        "SELECT count(*) FROM embeddings WHERE model = 'all-MiniLM-L6-v2'") > 0
    with pytest.raises(MixedModelsError):
        await search(sconn, "refund", settings)

    report = await reembed(sconn, settings, batch=10)
    assert 0 < report.documents < await sconn.fetchval("SELECT count(*) FROM documents")
    assert await sconn.fetchval("SELECT array_agg(DISTINCT model) FROM embeddings") \
        == ["all-MiniLM-L6-v2"]
    assert await sconn.fetchval("SELECT count(*) FROM embeddings") == total
    hits = await search(sconn, "refund delayed two weeks", settings, limit=1)
    assert hits[0].metadata["category"] == "refund_delayed"
    again = await reembed(sconn, settings)
    assert (again.documents, again.chunks) == (0, 0)


async def test_reembed_changes_the_column_width_when_the_model_does(
    server_url: str, template_url: str
) -> None:
    """A library stored as 1536-dim text-embedding-3-small vectors, reembedded with the local
    model: the column becomes vector(384), every row MiniLM, the HNSW index rebuilt."""
    from fleet.database import connect
    from fleet.embeddings.store import reembed
    from fleet.migrate import migrate
    from fleet.search import search
    from tests.seeded import _admin, with_database

    name = "t_reembed_width"
    await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await _admin(server_url, f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    try:
        openai = Settings(database_url=url, fleet_embeddings="openai")
        conn = await connect(openai, "fleet-test", url=url)
        await migrate(conn, openai)  # (creates the vector extension the next connection needs)
        await conn.close()
        conn = await connect(openai, "fleet-test", url=url, vector=True)
        try:
            rng = np.random.default_rng(7)
            for i, body in enumerate(["Refunds reach the card in 5-10 business days.",
                                      "Parcels stuck for 5 days get a carrier trace."]):
                doc = await conn.fetchval(
                    "INSERT INTO documents (source, title, body, metadata)"
                    " VALUES ('policy_library', $1, $2, $3) RETURNING id",
                    f"p{i}", body, {"slug": f"p{i}"})
                await conn.execute(
                    "INSERT INTO embeddings (document_id, chunk_index, chunk_text, embedding,"
                    " model) VALUES ($1, 0, $2, $3, 'text-embedding-3-small')",
                    doc, body, rng.standard_normal(1536).astype(np.float32))
            local = Settings(database_url=url)
            report = await reembed(conn, local)
            assert report.column_changed and report.documents == 2
            assert await conn.fetchval(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = 'embeddings'::regclass AND attname = 'embedding'") \
                == "vector(384)"
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'idx_embeddings_hnsw'") == 1
            hits = await search(conn, "when will my refund arrive", local, limit=2)
            assert hits[0].title == "p0"
        finally:
            await conn.close()
    finally:
        await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_concurrent_searches_share_one_model() -> None:
    """The local model is loaded once per process, even when threads race for it."""
    from fleet.embeddings.backends import local_embedder

    async def many() -> list[Any]:
        return await asyncio.gather(*(asyncio.to_thread(local_embedder) for _ in range(4)))

    models = asyncio.run(many())
    assert len({id(m) for m in models}) == 1


async def test_bench_search_small_scale(settings: Settings) -> None:
    """`fleet bench search` at a tiny scale runs end to end and finds the exact top 5 (at this
    size the planner may rightly prefer sorting 1,500 rows to the index; the real numbers and
    plans, 10k and 100k, are in BENCHMARKS.md)."""
    from fleet.bench.search import SearchBenchConfig, run_search_bench

    report = await run_search_bench(
        settings,
        SearchBenchConfig(sizes=[1500], queries=20, ef_search=[64], filters=["none", "past_case"],
                          exact_queries=3),
        progress=lambda _line: None,
    )
    assert [s.vectors for s in report.sizes] == [1500]
    assert len(report.results) == 2
    for result in report.results:
        assert result.recall_at_5 >= 0.9 and 0 < result.p50_ms <= result.p99_ms
