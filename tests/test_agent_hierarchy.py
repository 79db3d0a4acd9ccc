"""Issue 8's acceptance on real processes: agents built from their rows by ``fleet worker
--handler agent`` processes, updated without a restart, delegating to sub-agents through the
queue, and claimed only by workers that have their tools and skills.

One seeded database, one ``fleet mcp serve`` and agent workers for the module (the MCP server
loads its embedding model once); the offline policy follows the documented directives of an
agent's instructions (``Reply prefix:``, ``Sign off:``, ``Delegate: <keyword> -> <agent>``).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleet import agents, queue
from fleet.agents import DEFAULT_INSTRUCTIONS, spec_from
from fleet.errors import InvalidInput
from fleet.settings import Settings
from fleet.skills import SKILLS_DIR, SkillLibrary
from tests.processes import fleet, fleet_json, wait_until
from tests.test_agent_turn import Stack, running_stack, seeded_template  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

SKILLS = sorted(SkillLibrary().skills)


@pytest.fixture(scope="module")
def stack(
    server_url: str, seeded_template: str, fleet_home: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    with running_stack(server_url, seeded_template, fleet_home,
                       tmp_path_factory.mktemp("hierarchy-stack")) as running:
        yield running


@pytest.fixture
async def conn(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    from fleet.database import connect

    connection = await connect(Settings(database_url=stack.url), "fleet-test", url=stack.url)
    await stack.mcp_ready()
    yield connection
    await connection.close()


async def _reply(conn: asyncpg.Connection, message_id: int, timeout: float = 120) -> str:
    async def done() -> Any:
        row = await conn.fetchrow(
            "SELECT state, reply, error FROM fleet.messages WHERE id = $1", message_id)
        assert row["state"] != "dead", row["error"]
        return row["reply"] if row["state"] == "done" else None

    return await wait_until(done, timeout=timeout, message=f"a reply to message {message_id}")


async def _define(conn: asyncpg.Connection, name: str, instructions: str, **kw: Any) -> None:
    await agents.create(conn, spec_from(name=name, instructions=instructions, **kw),
                        known_skills=SKILLS)


async def test_two_agents_two_sessions_each_built_from_its_row_and_updated_live(
    stack: Stack, conn: asyncpg.Connection
) -> None:
    """Acceptance 1."""
    tools = ["lookup_order", "lookup_customer", "find_similar_resolved_tickets"]
    await _define(conn, "polite", "You are the polite desk.\nReply prefix: [Polite desk]\n"
                  "Sign off: Warm regards, the polite desk", tools=tools,
                  skills=["find-similar-cases"])
    await _define(conn, "terse", "You are the terse desk.\nReply prefix: [Terse]\n"
                  "Sign off: -- T.", tools=tools, skills=["find-similar-cases"])
    worker_pids = {p.pid for p in stack.workers}
    complaint = "My order #4430 arrived damaged, the box was crushed."
    # Both queued before either is served: one worker (8 slots) runs the two turns at once.
    async with conn.transaction():
        first = [await queue.enqueue(conn, "a1-polite", complaint, agent="polite"),
                 await queue.enqueue(conn, "a1-terse", complaint, agent="terse")]
    polite, terse = [await _reply(conn, m) for m in first]
    assert polite.startswith("[Polite desk] ") and polite.endswith("Warm regards, the polite desk")
    assert terse.startswith("[Terse] ") and terse.endswith("-- T.")
    assert "[Terse]" not in polite and "polite desk" not in terse
    # Both ran a real turn through the MCP server, audited under their own agent.
    actors = {r["conversation_id"]: r["actor"] for r in await conn.fetch(
        "SELECT DISTINCT conversation_id, actor FROM audit_log "
        "WHERE conversation_id IN ('a1-polite', 'a1-terse') AND action = 'message_sent'")}
    assert actors == {"a1-polite": "agent:polite", "a1-terse": "agent:terse"}
    assert await conn.fetchval(
        "SELECT count(*) FROM audit_log WHERE conversation_id = 'a1-terse' "
        "AND target = 'mcp:lookup_order'") >= 1

    # Update the row through the CLI: the next turn follows it, with the same workers.
    updated = fleet_json("agents", "update", "terse", "--instructions",
                         "You are the terse desk.\nReply prefix: [Terse v2]\nSign off: -- T2.",
                         env=stack.env)
    assert updated["version"] == 2
    reply = await _reply(conn, await queue.enqueue(conn, "a1-terse", "Thanks, what now?",
                                                   agent="terse"))
    assert reply.startswith("[Terse v2] ") and reply.endswith("-- T2.")
    assert {p.pid for p in stack.workers} == worker_pids
    assert all(p.poll() is None for p in stack.workers)
    # The other agent is untouched.
    reply = await _reply(conn, await queue.enqueue(conn, "a1-polite", "Thanks, what now?",
                                                   agent="polite"))
    assert reply.startswith("[Polite desk] ")


async def test_support_delegates_to_a_specialist_through_a_child_turn(
    stack: Stack, conn: asyncpg.Connection
) -> None:
    """Acceptance 2: the trace shows the child turn; a cycle is refused at definition."""
    await _define(conn, "tier2", "You are the tier-2 specialist.\nReply prefix: [Tier 2]",
                  tools=["lookup_order", "lookup_customer", "find_similar_resolved_tickets"],
                  skills=["find-similar-cases"])
    await agents.update(conn, "support", {
        "instructions": DEFAULT_INSTRUCTIONS + "\nDelegate: specialist -> tier2",
        "sub_agents": ["tier2"],
    }, known_skills=SKILLS)
    # A cycle is refused when the agents are defined.
    with pytest.raises(InvalidInput, match=r"cycle \(tier2 -> support -> tier2\)"):
        await agents.update(conn, "tier2", {"sub_agents": ["support"]}, known_skills=SKILLS)
    done = fleet("agents", "update", "tier2", "--sub-agent", "support", env=stack.env)
    assert done.returncode == 2 and "cycle" in done.stderr

    body = "Please get a specialist to look at order #4429, it arrived damaged."
    parent_id = await queue.enqueue(conn, "a2-del", body)
    reply = await _reply(conn, parent_id)
    assert "I asked our tier2 specialist. [Tier 2] " in reply, reply

    child = await conn.fetchrow(
        "SELECT id, session_id, agent, state, attempts, metadata, reply, dedupe_key "
        "FROM fleet.messages WHERE session_id = 'a2-del/tier2'")
    assert child["agent"] == "tier2" and child["state"] == "done"
    assert child["metadata"]["delegation"]["depth"] == 1
    assert child["metadata"]["delegation"]["parent_message_id"] == parent_id
    assert child["dedupe_key"].startswith(f"delegation:{parent_id}:")
    assert child["reply"] in reply

    trace = fleet_json("trace", "a2-del", env=stack.env)
    delegated = [r for r in trace["audit"] if r["action"] == "delegated"]
    assert len(delegated) == 1
    assert delegated[0]["target"] == "agent:tier2"
    assert delegated[0]["payload"]["child_session"] == "a2-del/tier2"
    assert delegated[0]["payload"]["child_message_id"] == child["id"]
    assert delegated[0]["result"]["status"] == "ok"
    actions = [r["action"] for r in trace["audit"]]
    assert actions.index("message_received") < actions.index("delegated") < actions.index(
        "message_sent")
    # The child turn's own trail is part of the parent's trace.
    (sub,) = trace["delegations"]
    assert sub["session_id"] == "a2-del/tier2"
    sub_actions = [(r["action"], r["target"]) for r in sub["audit"]]
    assert sub_actions[0][0] == "message_received" and sub_actions[-1][0] == "message_sent"
    assert ("capability_invoked", "mcp:lookup_order") in sub_actions
    assert {r["actor"] for r in sub["audit"]} <= {"agent:tier2", "mcp:customer-data"}
    table = fleet("trace", "a2-del", env=stack.env)
    assert table.returncode == 0
    assert "delegated" in table.stdout and "session a2-del/tier2" in table.stdout


async def test_delegation_beyond_the_depth_limit_is_refused_at_run_time(
    stack: Stack, conn: asyncpg.Connection
) -> None:
    """Acceptance 2: support -> tier2 -> tier3 with FLEET_MAX_DELEGATION_DEPTH=1."""
    if await agents.find(conn, "tier2") is None:
        pytest.skip("needs the delegation test's agents")
    await _define(conn, "tier3", "You are tier 3.\nReply prefix: [Tier 3]")
    await agents.update(conn, "tier2", {
        "instructions": "You are the tier-2 specialist.\nReply prefix: [Tier 2]\n"
                        "Delegate: specialist -> tier3",
        "sub_agents": ["tier3"],
    }, known_skills=SKILLS)
    stack.stop_workers()
    stack.start_worker(FLEET_MAX_DELEGATION_DEPTH="1")
    try:
        reply = await _reply(conn, await queue.enqueue(
            conn, "a2-depth", "I need a specialist for order #4429."))
    finally:
        stack.stop_workers()
        stack.start_worker()
    assert "[Tier 2]" in reply
    assert "delegation refused: tier2 -> tier3 would be delegation depth 2, beyond " \
           "FLEET_MAX_DELEGATION_DEPTH=1" in reply, reply
    trace = fleet_json("trace", "a2-depth", env=stack.env)
    (sub,) = trace["delegations"]
    refused = [r for r in sub["audit"] if r["action"] == "delegated"]
    assert refused and refused[0]["result"]["status"] == "blocked"
    assert refused[0]["payload"]["depth"] == 2
    assert await conn.fetchval(
        "SELECT count(*) FROM fleet.messages WHERE agent = 'tier3'") == 0


async def test_a_worker_claims_only_agents_whose_skills_it_has(
    stack: Stack, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """A message for an agent needing a skill the worker lacks stays queued while others
    proceed; a worker that has it takes it."""
    partial = tmp_path / "skills"
    partial.mkdir()
    shutil.copytree(SKILLS_DIR / "find-similar-cases", partial / "find-similar-cases")
    await _define(conn, "summarizer", "You write handoff notes.",
                  tools=["lookup_order"], skills=["summarize-ticket"])
    await _define(conn, "finder", "You find similar cases.\nSign off: -- finder",
                  tools=["lookup_order", "find_similar_resolved_tickets"],
                  skills=["find-similar-cases"])
    stack.stop_workers()
    stack.start_worker(FLEET_SKILLS_DIR=str(partial))
    try:
        stuck = await queue.enqueue(conn, "cf-sum", "handoff note for order #4429 please",
                                    agent="summarizer")
        also_stuck = await queue.enqueue(conn, "cf-sup", "hello there", agent="support")
        served = await queue.enqueue(conn, "cf-find", "My order #4431 never arrived.",
                                     agent="finder")
        assert (await _reply(conn, served)).endswith("-- finder")
        await asyncio.sleep(2)  # several poll intervals of the worker
        for message_id in (stuck, also_stuck):
            row = await conn.fetchrow(
                "SELECT state, attempts FROM fleet.messages WHERE id = $1", message_id)
            assert (row["state"], row["attempts"]) == ("queued", 0)
    finally:
        stack.stop_workers()
        stack.start_worker()
    assert "## " in await _reply(conn, stuck)
    assert await _reply(conn, also_stuck)
