"""The offline support policy through the real Agents SDK Runner (no database, no network).

The five customer-data tools are stood in for by local function tools returning the shapes the
MCP server returns; the process-level tests (test_agent_turn.py) drive the real server. What is
checked here is the policy itself: which tools it calls, in which order, what it reads from
their results and from the history, and what it replies.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from agents import Agent, FunctionTool, Runner, RunState, set_tracing_disabled

from fleet.offline_model import Conversation, OfflineSupportPolicy, classify
from fleet.skills import SkillLibrary

set_tracing_disabled(True)

ORDERS = {"4429": {"id": "4429", "customer_id": "C-1", "amount_cents": 2999, "status": "delivered"}}
CUSTOMERS = {"C-1": {"id": "C-1", "name": "Sam Lee", "email": "sam@example.com", "tier": "pro"}}
CASES = [
    {"ticket_id": "T-1001", "title": "Refund not received after two weeks",
     "resolution": "Re-issued the refund through the processor and emailed the reference",
     "distance": 0.18},
    {"ticket_id": "T-1002", "title": "Package arrived damaged", "resolution": "Replacement sent",
     "distance": 0.42},
]


class Recorder:
    def __init__(self, cases: list[dict[str, Any]] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.cases = CASES if cases is None else cases

    def tools(self) -> list[FunctionTool]:
        def make(name: str, fn: Any, approval: bool = False) -> FunctionTool:
            async def invoke(_ctx: Any, raw: str) -> str:
                args = json.loads(raw)
                self.calls.append((name, args))
                return json.dumps(fn(**args))

            return FunctionTool(
                name=name,
                description=name,
                params_json_schema={"type": "object", "properties": {}},
                on_invoke_tool=invoke,
                strict_json_schema=False,
                needs_approval=approval,
            )

        def order(order_id: str) -> Any:
            return ORDERS.get(order_id, {"error": f"order {order_id} not found"})

        return [
            SkillLibrary().tool(),
            make("lookup_order", order),
            make("lookup_customer", lambda customer_id: CUSTOMERS[customer_id]),
            make("find_customer_by_email", lambda email: CUSTOMERS["C-1"]),
            make(
                "find_similar_resolved_tickets",
                lambda description, limit: {"results": self.cases},
            ),
            make(
                "issue_refund",
                lambda order_id, amount_cents, reason: {
                    "refund_id": "5f0c", "order_id": order_id, "amount_cents": amount_cents,
                },
                approval=True,
            ),
        ]


def agent(recorder: Recorder, customer_id: str | None = None) -> Agent[Any]:
    instructions = "Support agent.\n" + SkillLibrary().index()
    if customer_id:
        instructions += f"\n\nCustomer id: {customer_id}"
    return Agent(name="support", instructions=instructions, model=OfflineSupportPolicy(),
                 tools=recorder.tools())


class ListSession:
    session_settings = None

    def __init__(self) -> None:
        self.session_id = "s"
        self.items: list[Any] = []

    async def get_items(self, limit: int | None = None) -> list[Any]:
        return list(self.items[-limit:] if limit else self.items)

    async def add_items(self, items: list[Any]) -> None:
        self.items.extend(items)

    async def pop_item(self) -> Any:
        return self.items.pop() if self.items else None

    async def clear_session(self) -> None:
        self.items.clear()


async def test_complaint_loads_skill_searches_and_cites_the_closest_case() -> None:
    rec = Recorder()
    result = await Runner.run(
        agent(rec), "I haven't received my refund from order #4429, it's been two weeks."
    )
    names = [name for name, _ in rec.calls]
    assert names == ["lookup_order", "find_similar_resolved_tickets"]
    loads = [i for i in result.new_items if getattr(i.raw_item, "name", "") == "load_skill"]
    assert [json.loads(i.raw_item.arguments)["name"] for i in loads] == ["find-similar-cases"]
    reply = result.final_output
    assert "Refund not received after two weeks" in reply and "T-1001" in reply
    assert "Re-issued the refund" in reply
    assert "$29.99" in reply  # read from the lookup_order result


async def test_weak_match_says_no_strong_precedent() -> None:
    rec = Recorder(cases=[{"ticket_id": "T-9", "title": "Login loop", "resolution": "Cleared",
                           "distance": 0.81}])
    result = await Runner.run(agent(rec), "My parcel for order #4429 smells of fish.")
    assert "no strong prior precedent" in result.final_output
    assert "Cleared" not in result.final_output


async def test_memory_across_turns_recalls_name_and_order() -> None:
    rec, session = Recorder(), ListSession()
    await Runner.run(agent(rec), "Hi, I'm Priya. Order #4429 arrived late.", session=session)
    rec.calls.clear()
    result = await Runner.run(agent(rec), "What's my name and order number?", session=session)
    assert rec.calls == []  # answered from history, no tool call
    assert "Priya" in result.final_output and "#4429" in result.final_output


async def test_handoff_activates_summarize_ticket_and_writes_five_sections() -> None:
    rec = Recorder()
    result = await Runner.run(
        agent(rec), "write a handoff note for ticket #4471, refund delayed two weeks, customer Sam."
    )
    loads = [json.loads(i.raw_item.arguments)["name"] for i in result.new_items
             if getattr(i.raw_item, "name", "") == "load_skill"]
    assert loads == ["summarize-ticket"]
    reply = result.final_output
    for section in ("Customer Context", "Issue", "Resolution Steps Taken", "Current Status",
                    "Recommended Next Action"):
        assert f"## {section}" in reply
    assert "Sam" in reply and "#4471" in reply and "Refund delayed two weeks" in reply


async def test_human_request_escalates_with_six_sections() -> None:
    rec = Recorder()
    result = await Runner.run(agent(rec, "C-1"), "This is useless. I want to talk to a person.")
    assert ("lookup_customer", {"customer_id": "C-1"}) in rec.calls
    for section in ("Customer Context", "Sentiment Signals", "Recommended Team", "Suggested SLA"):
        assert f"## {section}" in result.final_output
    assert "Pro tier" in result.final_output


async def test_unhappy_pro_customer_is_escalated_after_the_lookup() -> None:
    rec = Recorder()
    result = await Runner.run(
        agent(rec, "C-1"), "This is unacceptable, my refund for order #4429 is still missing!"
    )
    loads = [json.loads(i.raw_item.arguments)["name"] for i in result.new_items
             if getattr(i.raw_item, "name", "") == "load_skill"]
    assert loads == ["find-similar-cases", "escalate-with-context"]
    assert "## Suggested SLA" in result.final_output


async def test_refund_request_calls_issue_refund_and_pauses_for_approval() -> None:
    rec = Recorder()
    bot = agent(rec)
    result = await Runner.run(bot, "Please refund order #4429, it arrived damaged.")
    assert [name for name, _ in rec.calls] == ["lookup_order"]
    assert len(result.interruptions) == 1
    pending = result.interruptions[0]
    assert pending.name == "issue_refund"
    assert json.loads(pending.arguments) == {
        "order_id": "4429", "amount_cents": 2999, "reason": "arrived damaged"}
    assert pending.call_id.startswith("call_")

    # Approved: the tool runs and the reply reports the refund.
    state = await RunState.from_string(bot, result.to_state().to_string())
    state.approve(state.get_interruptions()[0])
    done = await Runner.run(bot, state)
    assert rec.calls[-1][0] == "issue_refund"
    assert "has been issued" in done.final_output and "5f0c" in done.final_output

    # Rejected: the model is told why and says no.
    rec2 = Recorder()
    bot2 = agent(rec2)
    paused = await Runner.run(bot2, "Please refund order #4429, it arrived damaged.")
    state = await RunState.from_string(bot2, paused.to_state().to_string())
    state.reject(state.get_interruptions()[0], rejection_message="duplicate of refund 77")
    said_no = await Runner.run(bot2, state)
    assert "issue_refund" not in [name for name, _ in rec2.calls]
    assert "can't issue the refund" in said_no.final_output
    assert "duplicate of refund 77" in said_no.final_output


async def test_explicit_amount_and_reason_win_over_the_order_amount() -> None:
    rec = Recorder()
    result = await Runner.run(
        agent(rec),
        "Supervisor approved the refund for order #4429. Call issue_refund now: 1500 cents, "
        "reason 'arrived damaged'.",
    )
    assert json.loads(result.interruptions[0].arguments) == {
        "order_id": "4429", "amount_cents": 1500, "reason": "arrived damaged"}


async def test_unknown_order_is_reported_not_refunded() -> None:
    rec = Recorder()
    result = await Runner.run(agent(rec), "Please refund order #9999.")
    assert not result.interruptions
    assert "couldn't find order #9999" in result.final_output


async def test_call_ids_are_unique_across_runs() -> None:
    rec = Recorder()
    ids: set[str] = set()
    for _ in range(5):
        result = await Runner.run(agent(rec), "I haven't received my refund for order #4429.")
        for item in result.new_items:
            call_id = getattr(item.raw_item, "call_id", None)
            if getattr(item.raw_item, "type", "") == "function_call":
                assert call_id and call_id not in ids
                ids.add(call_id)
    assert len(ids) == 15


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("I haven't received my refund from order #4429, it's been two weeks.", "complaint"),
        ("Please refund order #4429", "refund"),
        ("I want a refund for order 4429", "refund"),
        ("TL;DR this thread", "handoff"),
        ("where does this stand before I escalate", "handoff"),
        ("give my lead the rundown on #4471", "handoff"),
        ("I want a human", "escalate"),
        ("What's my order number again?", "memory"),
        ("hello", "greeting"),
    ],
)
def test_intents(text: str, intent: str) -> None:
    assert classify(Conversation.read(None, text)) == intent
