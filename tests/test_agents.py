"""Agents as database rows (issue 8): definitions, validation, versions, the claim filter.

Real PostgreSQL, one fresh database per test. The process-level acceptance tests (agents served
by real workers, delegation) live in ``tests/test_agent_hierarchy.py``.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from fleet import agents, queue
from fleet.agents import CUSTOMER_DATA_TOOLS, spec_from
from fleet.errors import InvalidInput, NotFound
from fleet.skills import SkillLibrary

SKILLS = sorted(SkillLibrary().skills)


def spec(name: str, **kw: object) -> agents.AgentSpec:
    return spec_from(name=name, instructions=kw.pop("instructions", f"You are {name}."), **kw)


async def test_migrate_seeds_the_support_agent_with_every_tool_and_skill(
    conn: asyncpg.Connection,
) -> None:
    support = await agents.get(conn, "support")
    assert support.version == 1
    assert support.tools == list(CUSTOMER_DATA_TOOLS)
    assert sorted(support.skills) == SKILLS and SKILLS
    assert support.model is None and support.sub_agents == []
    assert "customer-support agent" in support.instructions
    # get_or_create keeps what is stored.
    again, created = await agents.get_or_create(
        conn, spec("support", instructions="other"), known_skills=SKILLS
    )
    assert not created and again.instructions == support.instructions
    assert await conn.fetchval("SELECT count(*) FROM fleet.agent_versions") == 1


async def test_create_update_bumps_version_and_keeps_every_snapshot(
    conn: asyncpg.Connection,
) -> None:
    row = await agents.create(
        conn, spec("billing", tools=["lookup_order"], skills=["find-similar-cases"],
                   metadata={"team": "b"}), known_skills=SKILLS)
    assert row.version == 1 and row.tools == ["lookup_order"]
    updated = await agents.update(
        conn, "billing", {"instructions": "Sign off: Billing team"}, known_skills=SKILLS)
    assert updated.version == 2 and updated.instructions == "Sign off: Billing team"
    assert updated.tools == ["lookup_order"] and updated.metadata == {"team": "b"}
    assert updated.id == row.id and updated.updated_at >= row.updated_at
    snapshots = await agents.load_versions(conn, {"billing": 1})
    assert snapshots["billing"].instructions == "You are billing."
    assert (await agents.load_versions(conn, {"billing": 2}))["billing"].version == 2
    names = [a.name for a in await agents.list_agents(conn)]
    assert names == ["billing", "support"]
    with pytest.raises(InvalidInput, match="already exists"):
        await agents.create(conn, spec("billing"), known_skills=SKILLS)
    with pytest.raises(NotFound):
        await agents.update(conn, "nobody", {"instructions": "x"}, known_skills=SKILLS)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"tools": ["run_sql"]}, "unknown tool 'run_sql'"),
        ({"skills": ["juggling"]}, "unknown skill 'juggling'"),
        ({"sub_agents": ["ghost"]}, "unknown sub-agent 'ghost'"),
        ({"sub_agents": ["x"]}, "cannot be its own sub-agent"),
    ],
)
async def test_bad_definitions_are_refused_with_one_sentence(
    conn: asyncpg.Connection, fields: dict[str, object], error: str
) -> None:
    with pytest.raises(InvalidInput, match=error):
        await agents.create(conn, spec("x", **fields), known_skills=SKILLS)
    assert await agents.find(conn, "x") is None


def test_bad_names_and_empty_instructions_are_refused() -> None:
    with pytest.raises(InvalidInput, match="name"):
        spec_from(name="Bad Name", instructions="x")
    with pytest.raises(InvalidInput, match="instructions"):
        spec_from(name="ok", instructions="   ")


@pytest.mark.parametrize("instructions", ["   ", "\xa0\u2007\u202f", "\u3000\x1c"])
async def test_blank_instructions_are_refused_by_the_table_too(
    conn: asyncpg.Connection, instructions: str
) -> None:
    """A direct INSERT meets the same rule as the spec (migration 0021), no-break spaces
    included, whatever the server's locale."""
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await conn.execute(
            "INSERT INTO fleet.agents (name, instructions) VALUES ('blank', $1)", instructions)
    assert refused.value.constraint_name == "agents_instructions_size"
    with pytest.raises(InvalidInput, match="instructions must not be empty"):
        spec_from(name="blank", instructions=instructions)


async def test_cycles_are_refused_at_definition_on_create_and_update(
    conn: asyncpg.Connection, db_url: str
) -> None:
    await agents.create(conn, spec("c"), known_skills=SKILLS)
    await agents.create(conn, spec("b", sub_agents=["c"]), known_skills=SKILLS)
    await agents.create(conn, spec("a", sub_agents=["b"]), known_skills=SKILLS)
    with pytest.raises(InvalidInput, match=r"cycle \(c -> a -> b -> c\)"):
        await agents.update(conn, "c", {"sub_agents": ["a"]}, known_skills=SKILLS)
    assert (await agents.get(conn, "c")).version == 1
    # Concurrent updates that would each add half of a cycle: the table lock serialises them,
    # so exactly one wins.
    await agents.create(conn, spec("p"), known_skills=SKILLS)
    await agents.create(conn, spec("q"), known_skills=SKILLS)
    from fleet.database import _init_json

    pool = await asyncpg.create_pool(db_url, min_size=2, max_size=2, init=_init_json)
    try:
        results = await asyncio.gather(
            agents.update(pool, "p", {"sub_agents": ["q"]}, known_skills=SKILLS),
            agents.update(pool, "q", {"sub_agents": ["p"]}, known_skills=SKILLS),
            return_exceptions=True,
        )
    finally:
        await pool.close()
    assert sorted(type(r).__name__ for r in results) == ["AgentRow", "InvalidInput"]


async def test_enqueue_refuses_an_unknown_agent(conn: asyncpg.Connection) -> None:
    with pytest.raises(InvalidInput, match="unknown agent 'nobody'"):
        await queue.enqueue(conn, "s", "hello", agent="nobody")
    assert await queue.enqueue(conn, "s", "hello", agent="support")


async def test_claim_takes_only_messages_for_agents_the_worker_can_serve(
    conn: asyncpg.Connection,
) -> None:
    await agents.create(conn, spec("reader", tools=["lookup_order"]), known_skills=SKILLS)
    await agents.create(conn, spec("refunder", tools=["lookup_order", "issue_refund"]),
                        known_skills=SKILLS)
    await agents.create(conn, spec("summarizer", skills=["summarize-ticket"]),
                        known_skills=SKILLS)
    # A parent is servable only if its sub-agents are.
    await agents.create(conn, spec("front", tools=["lookup_order"], sub_agents=["refunder"]),
                        known_skills=SKILLS)
    for n, agent in enumerate(["refunder", "reader", "summarizer", "front", "reader"]):
        await queue.enqueue(conn, f"s{n}", "hi", agent=agent)
    have_tools = [t for t in CUSTOMER_DATA_TOOLS if t != "issue_refund"]
    claimed = await queue.claim(conn, "w1", 10, 30, tools=have_tools,
                                skills=["find-similar-cases"])
    assert sorted(m.agent for m in claimed) == ["reader", "reader"]
    # The rest stay queued for a worker that has what they need; the noop claim takes any.
    assert await queue.claim(conn, "w2", 10, 30, tools=[], skills=[]) == []
    rest = await queue.claim(conn, "w3", 10, 30)
    assert sorted(m.agent for m in rest) == ["front", "refunder", "summarizer"]


async def test_claim_with_the_agent_filter_reads_the_claimable_index(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute("""
        INSERT INTO fleet.sessions (session_id) SELECT 's' || g FROM generate_series(1, 5000) g;
        INSERT INTO fleet.messages (session_id, body, state, is_head, finished_at, reply)
        SELECT 's' || g, 'old', 'done', false, now(), 'ok' FROM generate_series(1, 5000) g;
        INSERT INTO fleet.messages (session_id, body, is_head)
        SELECT 's' || g, 'new', true FROM generate_series(1, 5000) g;
        ANALYZE fleet.messages;
    """)
    from fleet.sql import queries

    claim = queries("queries.sql")["claim"]
    plan = "\n".join(r[0] for r in await conn.fetch(
        "EXPLAIN " + claim.replace("$1", "'w'").replace("$2", "10").replace("$3", "30")
        .replace("$4::text[]", "ARRAY['lookup_order']::text[]")
        .replace("$5::text[]", "ARRAY[]::text[]")))
    assert "messages_claimable" in plan, plan
    assert "InitPlan" in plan or "SubPlan" in plan, plan


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_agents_create_list_show_update(fleet_env: dict[str, str], tmp_path) -> None:
    from tests.processes import fleet, fleet_json

    instructions = tmp_path / "tier2.md"
    instructions.write_text("You are the tier-2 billing specialist.\nSign off: Tier-2 Billing\n")
    created = fleet_json("agents", "create", "tier2", "--instructions-file", str(instructions),
                         "--tool", "lookup_order", "--tool", "lookup_customer",
                         "--skill", "find-similar-cases", "--metadata", "team=billing",
                         "--metadata", "level=2", env=fleet_env)
    assert created["version"] == 1 and created["tools"] == ["lookup_order", "lookup_customer"]
    assert created["metadata"] == {"team": "billing", "level": 2}
    assert created["model"] is None
    done = fleet("agents", "create", "front", "--instructions", "Delegate: billing -> tier2",
                 "--sub-agent", "tier2", "--model", "offline", env=fleet_env)
    assert done.returncode == 0, done.stderr
    assert "sub_agents: tier2" in done.stdout and "model: offline" in done.stdout

    listed = fleet_json("agents", "list", env=fleet_env)
    assert [a["name"] for a in listed] == ["front", "support", "tier2"]
    table = fleet("agents", "list", env=fleet_env)
    assert table.returncode == 0 and "tier2" in table.stdout and "(fleet default)" in table.stdout

    shown = fleet_json("agents", "show", "tier2", env=fleet_env)
    assert shown["instructions"].startswith("You are the tier-2")
    updated = fleet_json("agents", "update", "tier2", "--instructions", "Sign off: T2",
                         "--metadata", "level=3", "--no-skills", env=fleet_env)
    assert updated["version"] == 2 and updated["skills"] == []
    assert updated["metadata"] == {"team": "billing", "level": 3}
    assert updated["tools"] == ["lookup_order", "lookup_customer"]
    text = fleet("agents", "show", "tier2", env=fleet_env)
    assert "version: 2" in text.stdout and "  Sign off: T2" in text.stdout


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["create", "x", "--instructions", "hi", "--tool", "run_sql"], "unknown tool 'run_sql'"),
        (["create", "x", "--instructions", "hi", "--skill", "nope"], "unknown skill 'nope'"),
        (["create", "x", "--instructions", "hi", "--sub-agent", "ghost"], "unknown sub-agent"),
        (["create", "x"], "needs --instructions"),
        (["create", "Bad", "--instructions", "hi"], "name"),
        (["create", "support", "--instructions", "hi"], "already exists"),
        (["create", "x", "--instructions", "hi", "--metadata", "novalue"], "KEY=VALUE"),
        (["update", "ghost", "--instructions", "hi"], "no agent named 'ghost'"),
        (["update", "support"], "nothing to update"),
        (["update", "support", "--sub-agent", "support"], "own sub-agent"),
        (["show", "ghost"], "no agent named 'ghost'"),
    ],
)
def test_cli_agents_errors_are_one_sentence(
    fleet_env: dict[str, str], args: list[str], error: str
) -> None:
    from tests.processes import fleet

    done = fleet("agents", *args, env=fleet_env)
    assert done.returncode != 0
    assert error in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr


def test_cli_agents_cycle_refused(fleet_env: dict[str, str]) -> None:
    from tests.processes import fleet

    assert fleet("agents", "create", "a", "--instructions", "a", env=fleet_env).returncode == 0
    assert fleet("agents", "create", "b", "--instructions", "b", "--sub-agent", "a",
                 env=fleet_env).returncode == 0
    done = fleet("agents", "update", "a", "--sub-agent", "b", env=fleet_env)
    assert done.returncode == 2
    assert "sub-agents would form a cycle (a -> b -> a)" in done.stderr


async def test_per_agent_limits_in_metadata_are_validated(conn: asyncpg.Connection) -> None:
    with pytest.raises(InvalidInput, match=r"metadata\.limits"):
        await agents.create(conn, spec("x", metadata={"limits": {"max_tool_calls": 0}}),
                            known_skills=SKILLS)
    row = await agents.create(conn, spec("x", metadata={"limits": {"max_tool_calls": 3}}),
                              known_skills=SKILLS)
    assert row.metadata["limits"] == {"max_tool_calls": 3}


async def test_a_retried_parent_gets_the_child_it_already_has(
    conn: asyncpg.Connection, settings, db_url: str
) -> None:
    """A retried attempt of the parent turn asks again with new tool call ids: the delegation's
    dedupe key (parent message, sub-agent, question) hands it the same child message, already
    answered, instead of running the specialist a second time."""
    from types import SimpleNamespace

    from fleet.audit import TurnAudit
    from fleet.database import create_pool
    from fleet.delegation import Delegator
    from fleet.handlers import NoopHandler
    from fleet.worker import Worker

    await agents.create(conn, spec("tier2"), known_skills=SKILLS)
    parent_id = await queue.enqueue(conn, "parent-s", "my card was charged twice")
    pool = await create_pool(settings, "fleet-test", url=db_url, min_size=1, max_size=2)
    worker = Worker(settings, NoopHandler(work_delay=0.0), concurrency=2)
    running = asyncio.create_task(worker.run())
    delegate = Delegator(settings, lambda: pool)
    try:
        answers, audits = [], []
        for call_id in ("call-attempt-1", "call-attempt-2"):
            turn = SimpleNamespace(message_id=parent_id, session_id="parent-s", customer_id=None,
                                   variables={}, depth=0, lease=None,
                                   audit=TurnAudit("parent-s", actor="agent:support"))
            answers.append(await delegate(turn, "support", "tier2", "check the charge", call_id))
            audits.append(turn.audit.rows[-1])
        other = SimpleNamespace(message_id=parent_id, session_id="parent-s", customer_id=None,
                                variables={}, depth=0, lease=None,
                                audit=TurnAudit("parent-s", actor="agent:support"))
        await delegate(other, "support", "tier2", "a different question", "call-3")
    finally:
        await delegate.close()  # the LISTEN connection its waits opened
        worker.stop()
        await asyncio.wait_for(running, 30)
        await pool.close()
    assert answers == ["ok", "ok"]
    children = await conn.fetch(
        "SELECT id, body, attempts FROM fleet.messages WHERE agent = 'tier2' ORDER BY id")
    assert [c["body"] for c in children] == ["check the charge", "a different question"]
    assert children[0]["attempts"] == 1  # ran once, not once per parent attempt
    assert {a.payload["child_message_id"] for a in audits} == {children[0]["id"]}


async def test_a_delegation_behind_a_parked_one_answers_at_once(
    conn: asyncpg.Connection, settings, db_url: str
) -> None:
    """The conversation's earlier delegation waits for a human approval, so the new child
    cannot run before that decision: the parent is told so at once instead of holding its
    worker slot until the wait times out."""
    from types import SimpleNamespace

    from fleet.audit import TurnAudit
    from fleet.database import create_pool
    from fleet.delegation import Delegator, child_session

    await agents.create(conn, spec("tier2"), known_skills=SKILLS)
    parent_id = await queue.enqueue(conn, "parent-p", "refund me and check the charge")
    earlier = await queue.enqueue(conn, child_session("parent-p", "tier2"), "refund order 1",
                                  agent="tier2")
    claimed = await queue.claim(conn, "w", 5, 30)
    assert {m.id for m in claimed} == {parent_id, earlier}
    await conn.execute(
        "UPDATE fleet.messages SET state = 'awaiting_approval', lease_owner = NULL,"
        " lease_token = NULL, lease_expires_at = NULL WHERE id = $1", earlier)
    pool = await create_pool(settings, "fleet-test", url=db_url, min_size=1, max_size=2)
    try:
        turn = SimpleNamespace(message_id=parent_id, session_id="parent-p", customer_id=None,
                               variables={}, depth=0, lease=None,
                               audit=TurnAudit("parent-p", actor="agent:support"))
        answer = await asyncio.wait_for(
            Delegator(settings, lambda: pool)(turn, "support", "tier2", "check the charge", "c1"),
            timeout=10)
    finally:
        await pool.close()
    assert "busy with an earlier request waiting for a human approval" in answer
    assert turn.audit.rows[-1].result["status"] == "awaiting"
    assert turn.audit.rows[-1].result["state"] == "queued"


async def test_concurrent_metadata_merges_both_land(settings, db_url: str) -> None:
    """`fleet agents update --metadata` merges under the agents' lock: two at once keep both."""
    from fleet.database import create_pool

    pool = await create_pool(settings, "fleet-test", url=db_url, min_size=2, max_size=4)
    try:
        await asyncio.gather(*(
            agents.update(pool, "support", {}, known_skills=SKILLS, merge_metadata={key: i})
            for i, key in enumerate(("team", "tier", "region", "owner"))))
        row = await agents.get(pool, "support")
    finally:
        await pool.close()
    assert {"team", "tier", "region", "owner"} <= set(row.metadata)
    assert row.version == 5
