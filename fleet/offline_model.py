"""The offline support policy: a deterministic, rule-based stand-in for a language model.

It is NOT an LLM. It implements the Agents SDK's :class:`agents.Model` interface so that the real
``Runner`` loop, real MCP tool calls over HTTP, real skill loading and real human approvals run
without a model provider: each call reads the conversation it is given (history included, and
the results of the tools it already called this turn) and answers with either the next tool calls
or the final reply, by fixed rules:

* a refund request ("please refund order #4429", "issue a refund ...") looks the order up, then
  calls ``issue_refund`` (which the fleet gates behind a human) and reports the outcome;
* a handoff / TL;DR / "where does this stand" request loads the ``summarize-ticket`` skill and
  answers in the sections the skill's body lists;
* "I want a human", or a Pro/Enterprise customer who is clearly unhappy, loads
  ``escalate-with-context`` and answers in its sections;
* "what's my name / order number" answers from what the customer said in earlier turns;
* any other described problem loads ``find-similar-cases``, looks up the order or customer it
  mentions, searches similar resolved tickets, and drafts a reply that cites the closest case's
  resolution (or says there is no strong precedent when the closest case is far).

Two rules read the agent's instructions (agents are rows in ``fleet.agents``, so an operator can
see the policy follow the row), each a line of its own:

* ``Delegate: <keyword> -> <agent>``: when the newest message contains the keyword (any case)
  and the agent has the tool ``ask_<agent>`` (the sub-agent), call it with the message and
  answer with the specialist's reply (or say the delegation failed, quoting its error);
* ``Reply prefix: <text>`` and ``Sign off: <text>``: every final reply starts with / ends with
  that text.

Everything it needs is in the model input (the instructions carry the customer id and the skill
index), so it behaves the same in any worker process and on a resumed run. Every tool call gets a
fresh unique call id. ``latency`` simulates a provider's response time for benchmarks. Each
response reports an estimated usage (characters / 4 of the input and the output), so token
budgets and token metrics work offline too.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from agents import Model, ModelResponse, ModelSettings, ModelTracing, Usage
from agents.agent_output import AgentOutputSchemaBase
from agents.handoffs import Handoff
from agents.items import TResponseInputItem, TResponseStreamEvent
from agents.tool import Tool
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

#: The distance (cosine, lower is closer) above which a past case is not a strong precedent.
#: Matches the threshold the find-similar-cases skill states.
PRECEDENT_MAX_DISTANCE = 0.5

SUMMARY_SECTIONS = (
    "Customer Context",
    "Issue",
    "Resolution Steps Taken",
    "Current Status",
    "Recommended Next Action",
)
ESCALATION_SECTIONS = (
    "Customer Context",
    "Issue",
    "Attempted Resolutions",
    "Sentiment Signals",
    "Recommended Team",
    "Suggested SLA",
)

_ORDER = re.compile(
    r"(?:\border\s*(?:number|no\.?|id)?\s*(?:is\s*)?#?\s*|(?<![\w#])#)(\d{3,12})\b", re.IGNORECASE
)
_TICKET = re.compile(r"\b(?:ticket|case)\s*(?:number|no\.?)?\s*#?\s*(\d{3,12})\b", re.IGNORECASE)
_NAME = re.compile(
    r"(?i:\b(?:i'm|i am|my name is|this is|name's|customer|customer name))\s+([A-Z][a-z]{1,30})\b"
)
_NOT_NAMES = frozenset(
    {"Still", "Not", "So", "Very", "Really", "Just", "Having", "Writing", "Back", "Sorry"}
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_CUSTOMER_ID = re.compile(r"^Customer id: (\S+)$", re.MULTILINE)
_CENTS = re.compile(r"\b(\d{1,9})\s*cents\b", re.IGNORECASE)
_DOLLARS = re.compile(r"\$\s*(\d{1,7}(?:\.\d{1,2})?)")
_REASON = re.compile(r"\breason\s*[:=]?\s*['\"“]([^'\"”]{1,200})['\"”]", re.IGNORECASE)
_BECAUSE = re.compile(r"\b(?:because|since)\s+([^.!?]{3,160})", re.IGNORECASE)
_REASON_WORDS = re.compile(
    r"\b(arrived damaged|damaged|broken|never arrived|wrong item|defective|charged twice)\b",
    re.IGNORECASE,
)

_REFUND_ASK = re.compile(
    r"\b(?:issue|process|give|send|want|need|request|get|approve[ds]?)\b[^.!?]{0,40}\brefund\b"
    r"|\brefund\s+(?:me|it|order|#|the\s+order|my\s+order|\d)"
    r"|\bissue_refund\b",
    re.IGNORECASE,
)
_REFUND_STATUS = re.compile(
    r"\b(?:haven'?t|have not|didn'?t|did not|not yet|never)\s+(?:\w+\s+){0,2}"
    r"(?:received|got|gotten|seen)\b|\bwhere(?:'s| is)\s+my\s+refund\b|\bstill waiting\b",
    re.IGNORECASE,
)
_HANDOFF = re.compile(
    r"\bhand-?\s?off\b|\btl;?\s?dr\b|\bwhere does (?:this|it|that) stand\b|\brundown\b"
    r"|\bsummar(?:y|ize|ise)\b|\bcatch me up\b|\bbrief (?:my|the) (?:lead|manager)\b",
    re.IGNORECASE,
)
_HUMAN = re.compile(
    r"\b(?:a |an )?(?:human|real person|actual person|someone real)\b"
    r"|\b(?:talk|speak) to (?:a |an |your )?(?:person|agent|manager|supervisor)\b"
    r"|\bget me (?:a |an |your )?(?:manager|supervisor|person)\b|\bescalate\b",
    re.IGNORECASE,
)
_NEGATIVE = re.compile(
    r"\b(?:unacceptable|ridiculous|terrible|furious|angry|frustrat\w*|worst|fed up|awful|useless"
    r"|disappointed|outrageous|third time|still not|again\?)\b",
    re.IGNORECASE,
)
_MEMORY = re.compile(
    r"\bwhat(?:'s| is| was) my (?:name|order)\b|\bdo you remember\b|\bremind me\b"
    r"|\bwhich order (?:was|did|is)\b|\bwho am i\b",
    re.IGNORECASE,
)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_of(content: Any) -> str:
    """The plain text of a message's or a tool output's content (str or list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_of(part) for part in content)
    if isinstance(content, dict):
        for key in ("text", "output", "content"):
            if key in content:
                return _text_of(content[key])
        return ""
    return str(content)


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    dump = getattr(item, "model_dump", None)
    return dump(exclude_unset=True) if dump else {}


_DECODER = json.JSONDecoder()


def _json(text: str) -> Any:
    """JSON text decoded; several concatenated documents (one MCP content part each) become a
    list; None when it is not JSON."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        pass
    if not isinstance(text, str):
        return None
    documents, position = [], 0
    try:
        while position < len(text):
            while position < len(text) and text[position].isspace():
                position += 1
            if position == len(text):
                break
            value, position = _DECODER.raw_decode(text, position)
            documents.append(value)
    except ValueError:
        return None
    return documents or None


def _find_dicts(value: Any, key: str) -> list[dict[str, Any]]:
    """Every dict (depth-first, in order) in a decoded tool result that has ``key``."""
    found: list[dict[str, Any]] = []
    if isinstance(value, dict):
        if key in value:
            found.append(value)
        for child in value.values():
            found.extend(_find_dicts(child, key))
    elif isinstance(value, list):
        for child in value:
            found.extend(_find_dicts(child, key))
    return found


def _first(value: Any, *keys: str) -> Any:
    """The first value under any of ``keys`` anywhere in a decoded tool result."""
    for key in keys:
        hits = _find_dicts(value, key)
        if hits and hits[0][key] not in (None, ""):
            return hits[0][key]
    return None


def _money(cents: Any) -> str:
    try:
        return f"${int(cents) / 100:,.2f}"
    except (TypeError, ValueError):
        return "the order amount"


@dataclass
class ToolCall:
    call_id: str
    name: str
    arguments: dict[str, Any]
    output: str | None = None

    @cached_property
    def decoded(self) -> Any:
        """The output as JSON, decoded once (the policy reads it many times per call)."""
        return _json(self.output) if self.output is not None else None

    @property
    def failed(self) -> bool:
        """A tool output that reports an error (or a refusal) rather than data.

        The customer-data tools answer with JSON documents; an error result (``isError``) or a
        rejection message from the approver is plain text. ``load_skill`` answers with
        markdown and reports a failure as ``error: ...``.
        """
        if self.output is None:
            return True
        if self.name == "load_skill":
            return self.output.startswith("error:")
        decoded = self.decoded
        return decoded is None or (isinstance(decoded, dict) and bool(decoded.get("error")))


@dataclass
class Conversation:
    """What the policy reads from one model input."""

    instructions: str
    newest: str = ""
    earlier_user_texts: list[str] = field(default_factory=list)
    earlier_calls: list[ToolCall] = field(default_factory=list)
    turn_calls: list[ToolCall] = field(default_factory=list)

    @classmethod
    def read(cls, instructions: str | None, items: str | list[TResponseInputItem]) -> Conversation:
        convo = cls(instructions=instructions or "")
        if isinstance(items, str):
            convo.newest = items
            return convo
        calls: dict[str, ToolCall] = {}
        ordered: list[tuple[int, ToolCall]] = []
        user_positions: list[tuple[int, str]] = []
        for position, raw in enumerate(items):
            item = _as_dict(raw)
            kind = item.get("type")
            if item.get("role") == "user" and kind in (None, "message"):
                user_positions.append((position, _text_of(item.get("content"))))
            elif kind == "function_call":
                call = ToolCall(
                    call_id=str(item.get("call_id")),
                    name=str(item.get("name")),
                    arguments=_json(item.get("arguments") or "{}") or {},
                )
                calls[call.call_id] = call
                ordered.append((position, call))
            elif kind == "function_call_output":
                call = calls.get(str(item.get("call_id")))
                if call is not None:
                    call.output = _text_of(item.get("output"))
        if user_positions:
            last_position, convo.newest = user_positions[-1]
            convo.earlier_user_texts = [text for _, text in user_positions[:-1]]
        else:
            last_position = -1
        convo.earlier_calls = [c for p, c in ordered if p < last_position]
        convo.turn_calls = [c for p, c in ordered if p > last_position]
        return convo

    # -- facts ---------------------------------------------------------------------------

    def called(self, name: str) -> list[ToolCall]:
        return [c for c in self.turn_calls if c.name == name]

    def skill_loaded(self, skill: str) -> bool:
        """Progressive disclosure: a skill body loaded earlier in the conversation stays in
        context, so it is not loaded again."""
        return any(
            c.name == "load_skill" and c.arguments.get("name") == skill and not c.failed
            for c in self.earlier_calls + self.turn_calls
        )

    def skill_body(self, skill: str) -> str:
        for call in reversed(self.earlier_calls + self.turn_calls):
            if call.name == "load_skill" and call.arguments.get("name") == skill and call.output:
                return call.output
        return ""

    @property
    def customer_id(self) -> str | None:
        match = _CUSTOMER_ID.search(self.instructions)
        return match.group(1) if match else None

    def order_id(self, *, remembered: bool = True) -> str | None:
        match = _ORDER.search(_TICKET.sub(" ", self.newest))
        if match:
            return match.group(1)
        if remembered:
            for text in reversed(self.earlier_user_texts):
                match = _ORDER.search(_TICKET.sub(" ", text))
                if match:
                    return match.group(1)
        return None

    @property
    def ticket_id(self) -> str | None:
        match = _TICKET.search(self.newest)
        return match.group(1) if match else None

    @property
    def name(self) -> str | None:
        for text in [self.newest, *reversed(self.earlier_user_texts)]:
            for match in _NAME.finditer(text):
                if match.group(1) not in _NOT_NAMES:
                    return match.group(1)
        return None

    @property
    def email(self) -> str | None:
        for text in [self.newest, *reversed(self.earlier_user_texts)]:
            match = _EMAIL.search(text)
            if match:
                return match.group(0)
        return None

    def customer(self) -> Any:
        for name in ("lookup_customer", "find_customer_by_email"):
            for call in self.called(name):
                if not call.failed:
                    return call.decoded
        return None

    def order(self) -> Any:
        for call in self.called("lookup_order"):
            if not call.failed:
                return call.decoded
        return None

    @property
    def tier(self) -> str | None:
        tier = _first(self.customer(), "tier") or _first(self.order(), "customer_tier")
        return str(tier).lower() if tier else None

    @property
    def known_name(self) -> str | None:
        """What the customer told us, else the first name on the customer record."""
        if self.name:
            return self.name
        full = _first(self.customer(), "name") or _first(self.order(), "customer_name")
        return str(full).split()[0] if full else None

    @property
    def issue(self) -> str:
        """The customer's problem in one line: this message, or the first complaint earlier."""
        text = self.newest
        if _HANDOFF.search(text) or _MEMORY.search(text) or _HUMAN.search(text):
            detail = re.split(r"\d{3,12}\s*[:,.-]*\s*", text, maxsplit=1)
            if len(detail) == 2 and len(detail[1].strip()) > 8:
                return detail[1].strip()
            for earlier in self.earlier_user_texts:
                if not (_HANDOFF.search(earlier) or _MEMORY.search(earlier)):
                    return earlier.strip()
        return text.strip()


def classify(convo: Conversation) -> str:
    """The request's intent, in precedence order."""
    text = convo.newest
    if _REFUND_ASK.search(text) and not _REFUND_STATUS.search(text):
        return "refund"
    if _HANDOFF.search(text):
        return "handoff"
    if _HUMAN.search(text):
        return "escalate"
    if _MEMORY.search(text):
        return "memory"
    if len(text.split()) <= 3 and not convo.order_id(remembered=False):
        return "greeting"
    return "complaint"


#: Every call's model input (instructions and items), when recording is on; see
#: :func:`record_inputs`. Off (None) in production: nothing is kept.
RECORDED: list[dict[str, Any]] | None = None


def record_inputs(on: bool = True) -> list[dict[str, Any]] | None:
    """Keep every model input this process's offline policy receives (tests check what the
    model saw, e.g. that run variables never reach it); ``False`` stops and forgets."""
    global RECORDED
    RECORDED = [] if on else None
    return RECORDED


def estimate_tokens(text: str) -> int:
    """An honest estimate of a text's tokens without a tokenizer: about 4 characters each
    (OpenAI's rule of thumb for English), at least 1 for a non-empty text."""
    return (len(text) + 3) // 4


def _usage(instructions: str | None, input: Any, output: list[Any]) -> Usage:
    """What this call would cost a real model, estimated: instructions and input items in,
    output items out (``FLEET_TOKEN_BUDGET`` and the token metrics see these numbers)."""
    seen = input if isinstance(input, str) else json.dumps(input, default=str)
    out = json.dumps([_as_dict(item) for item in output], default=str)
    input_tokens = estimate_tokens(instructions or "") + estimate_tokens(seen)
    output_tokens = estimate_tokens(out)
    return Usage(requests=1, input_tokens=input_tokens, output_tokens=output_tokens,
                 total_tokens=input_tokens + output_tokens)


class OfflineSupportPolicy(Model):
    """A rule-based support policy behind the SDK's ``Model`` interface (see the module doc)."""

    def __init__(self, *, latency: float = 0.0) -> None:
        self.latency = latency

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None = None,
        conversation_id: str | None = None,
        prompt: Any = None,
        **_: Any,
    ) -> ModelResponse:
        if self.latency:
            await asyncio.sleep(self.latency)
        if RECORDED is not None:
            RECORDED.append({"instructions": system_instructions, "input": input})
        convo = Conversation.read(system_instructions, input)
        available = {getattr(tool, "name", "") for tool in tools}
        output = decide(convo, available)
        return ModelResponse(output=output, usage=_usage(system_instructions, input, output),
                             response_id=None)

    async def stream_response(  # type: ignore[override]
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None = None,
        conversation_id: str | None = None,
        prompt: Any = None,
        **_: Any,
    ) -> AsyncIterator[TResponseStreamEvent]:
        response = await self.get_response(
            system_instructions,
            input,
            model_settings,
            tools,
            output_schema,
            handoffs,
            tracing,
            previous_response_id=previous_response_id,
            conversation_id=conversation_id,
            prompt=prompt,
        )
        yield ResponseCompletedEvent(
            type="response.completed",
            sequence_number=0,
            response=Response(
                id=_new_id("resp"),
                created_at=0,
                model="offline",
                object="response",
                output=response.output,
                parallel_tool_calls=True,
                tool_choice="auto",
                tools=[],
            ),
        )


# -- the policy -------------------------------------------------------------------------------


def _call(name: str, arguments: dict[str, Any]) -> ResponseFunctionToolCall:
    call_id = _new_id("call")
    return ResponseFunctionToolCall(
        id=_new_id("fc"),
        call_id=call_id,
        type="function_call",
        name=name,
        arguments=json.dumps(arguments, separators=(",", ":")),
    )


def _message(text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=_new_id("msg"),
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
    )


_DELEGATE = re.compile(r"^\s*Delegate:\s*(.+?)\s*->\s*([a-z][a-z0-9_-]*)\s*$",
                       re.MULTILINE | re.IGNORECASE)
_PREFIX = re.compile(r"^\s*Reply prefix:\s*(.+?)\s*$", re.MULTILINE | re.IGNORECASE)
_SIGN_OFF = re.compile(r"^\s*Sign off:\s*(.+?)\s*$", re.MULTILINE | re.IGNORECASE)


def decide(convo: Conversation, available: set[str]) -> list[Any]:
    """The next output items; a final reply follows the instructions' directives."""
    output = _delegation(convo, available)
    if output is None:
        output = _policy(convo, available)
    if len(output) == 1 and isinstance(output[0], ResponseOutputMessage):
        text = output[0].content[0].text  # type: ignore[union-attr]
        return [_message(_directed(convo.instructions, text))]
    return output


def _directed(instructions: str, reply: str) -> str:
    """``Reply prefix:`` / ``Sign off:`` lines of the instructions applied to a reply."""
    if match := _PREFIX.search(instructions):
        reply = f"{match.group(1)} {reply}"
    if match := _SIGN_OFF.search(instructions):
        reply = f"{reply}\n\n{match.group(1)}"
    return reply


def _delegation(convo: Conversation, available: set[str]) -> list[Any] | None:
    """``Delegate: <keyword> -> <agent>``: ask the sub-agent, then relay its answer."""
    for keyword, agent in _DELEGATE.findall(convo.instructions):
        tool = f"ask_{agent}"
        if tool not in available or keyword.lower() not in convo.newest.lower():
            continue
        calls = convo.called(tool)
        if not calls:
            return [_call(tool, {"request": convo.newest})]
        answer = (calls[-1].output or "").strip()
        if not answer or answer.startswith("error:"):
            detail = answer.removeprefix("error:").strip() or "no answer"
            return [_message(f"{_greeting(convo)} I couldn't get an answer from our {agent} "
                             f"specialist: {detail}")]
        return [_message(f"{_greeting(convo)} I asked our {agent} specialist. {answer}")]
    return None


def _policy(convo: Conversation, available: set[str]) -> list[Any]:
    """The next output items: tool calls still needed, else the final reply."""
    intent = classify(convo)
    if intent == "complaint" and convo.tier in ("pro", "enterprise") and _NEGATIVE.search(
        convo.newest
    ):
        intent = "escalate"
    skill = {
        "handoff": "summarize-ticket",
        "escalate": "escalate-with-context",
        "complaint": "find-similar-cases",
    }.get(intent)
    if skill and "load_skill" in available and not convo.skill_loaded(skill):
        if intent != "escalate" or convo.customer() is not None or not _lookups_pending(
            convo, intent, available
        ):
            return [_call("load_skill", {"name": skill})]

    pending = [
        _call(name, args)
        for name, args in _lookups(convo, intent)
        if name in available and not convo.called(name)
    ]
    if pending:
        return pending

    if intent == "refund" and "issue_refund" in available and not convo.called("issue_refund"):
        refund = _refund_arguments(convo)
        if refund is not None:
            return [_call("issue_refund", refund)]

    return [_message(_reply(convo, intent))]


def _lookups(convo: Conversation, intent: str) -> Iterable[tuple[str, dict[str, Any]]]:
    if intent in ("memory", "greeting"):
        return
    order_id = convo.order_id(remembered=intent != "complaint")
    if order_id:
        yield "lookup_order", {"order_id": order_id}
    if intent in ("complaint", "escalate", "refund"):
        if convo.customer_id:
            yield "lookup_customer", {"customer_id": convo.customer_id}
        elif convo.email:
            yield "find_customer_by_email", {"email": convo.email}
    if intent in ("complaint", "escalate"):
        yield "find_similar_resolved_tickets", {"description": convo.issue[:500], "limit": 5}


def _lookups_pending(convo: Conversation, intent: str, available: set[str]) -> bool:
    return any(name in available and not convo.called(name) for name, _ in _lookups(convo, intent))


def _refund_arguments(convo: Conversation) -> dict[str, Any] | None:
    order_id = convo.order_id()
    if not order_id:
        return None
    order = next((c.decoded for c in convo.called("lookup_order") if not c.failed), None)
    if convo.called("lookup_order") and order is None:
        return None  # the order does not exist: say so instead of refunding
    amount: int | None = None
    if match := _CENTS.search(convo.newest):
        amount = int(match.group(1))
    elif match := _DOLLARS.search(convo.newest):
        amount = round(float(match.group(1)) * 100)
    elif (cents := _first(order, "refundable_cents", "amount_cents")) is not None:
        amount = int(cents)
    if not amount:
        return None
    reason = "customer requested a refund"
    for pattern in (_REASON, _BECAUSE, _REASON_WORDS):
        if match := pattern.search(convo.newest):
            reason = match.group(1).strip()
            break
    return {"order_id": order_id, "amount_cents": amount, "reason": reason}


# -- replies ----------------------------------------------------------------------------------


def _cases(convo: Conversation) -> list[dict[str, Any]]:
    """The latest similar-case search of the conversation, closest first."""
    for call in reversed(convo.earlier_calls + convo.turn_calls):
        if call.name == "find_similar_resolved_tickets" and not call.failed:
            cases = _find_dicts(call.decoded, "distance")
            return sorted(cases, key=lambda c: float(c.get("distance", 9)))
    return []


def _case_label(case: dict[str, Any]) -> str:
    title = case.get("title") or case.get("subject") or "a past ticket"
    ident = case.get("ticket_id") or case.get("id")
    return f'"{title}"' + (f" (ticket {ident})" if ident else "")


def _resolution(case: dict[str, Any]) -> str:
    text = str(case.get("resolution") or case.get("body") or case.get("summary") or "").strip()
    return text.rstrip(".") + "." if text else "it was resolved by the team."


def _order_line(convo: Conversation) -> str:
    calls = convo.called("lookup_order")
    if not calls:
        return ""
    if calls[0].failed:
        return f"I couldn't find order #{calls[0].arguments.get('order_id')} in our system. "
    order = calls[0].decoded
    status = _first(order, "status")
    amount = _first(order, "amount_cents")
    parts = [f"order #{calls[0].arguments.get('order_id')}"]
    if amount is not None:
        parts.append(f"for {_money(amount)}")
    if status:
        parts.append(f"is currently marked {status}")
    return "I can see " + " ".join(parts) + ". "


def _greeting(convo: Conversation) -> str:
    name = convo.known_name
    return f"Hi {name}," if name else "Hi,"


def _precedent(convo: Conversation) -> tuple[str, dict[str, Any] | None]:
    cases = _cases(convo)
    if not cases:
        if convo.called("find_similar_resolved_tickets"):
            return "I searched our resolved cases and found no similar past case. ", None
        return "", None
    best = cases[0]
    distance = float(best.get("distance", 9))
    if distance > PRECEDENT_MAX_DISTANCE:
        return (
            "I found no strong prior precedent among our resolved cases (the closest, "
            f"{_case_label(best)}, is a weak match at distance {distance:.2f}), so a specialist "
            "will review this directly. ",
            None,
        )
    return (
        f"We have handled a case like this before: {_case_label(best)} (distance {distance:.2f}). "
        f"Resolution then: {_resolution(best)} ",
        best,
    )


def _reply(convo: Conversation, intent: str) -> str:
    if intent == "memory":
        return _memory_reply(convo)
    if intent == "greeting":
        return f"{_greeting(convo)} thanks for getting in touch. How can I help with your order?"
    if intent == "refund":
        return _refund_reply(convo)
    if intent == "handoff":
        return _sections_reply(convo, "summarize-ticket", SUMMARY_SECTIONS)
    if intent == "escalate":
        return _sections_reply(convo, "escalate-with-context", ESCALATION_SECTIONS)
    precedent, best = _precedent(convo)
    next_step = (
        "Based on that, I'm applying the same fix to your case and will confirm by email."
        if best
        else "I've noted everything above so nobody asks you to repeat it."
    )
    return f"{_greeting(convo)} thanks for reaching out. {_order_line(convo)}{precedent}{next_step}"


def _memory_reply(convo: Conversation) -> str:
    facts = []
    if convo.name:
        facts.append(f"your name is {convo.name}")
    if order_id := convo.order_id():
        facts.append(f"your order number is #{order_id}")
    if convo.email:
        facts.append(f"your email is {convo.email}")
    if not facts:
        return "You haven't told me your name or an order number in this conversation yet."
    return "From earlier in our conversation: " + " and ".join(facts) + "."


def _refund_reply(convo: Conversation) -> str:
    calls = convo.called("issue_refund")
    order_id = convo.order_id()
    if not calls:
        if not order_id:
            return "I can help with a refund. Which order number is it for?"
        if _first(convo.order(), "refundable_cents") == 0:
            return f"Order #{order_id} has already been refunded in full; nothing is left."
        if convo.called("lookup_order") and convo.called("lookup_order")[0].failed:
            return (
                f"I couldn't find order #{order_id}, so I can't refund it. "
                "Please check the number."
            )
        return f"I couldn't work out the amount to refund for order #{order_id}; how much was it?"
    call = calls[-1]
    amount = _money(call.arguments.get("amount_cents"))
    decoded = call.decoded
    refund_id = _first(decoded, "refund_id", "id")
    order_id = call.arguments.get("order_id")
    if isinstance(decoded, dict | list) and refund_id and not call.failed:
        return (
            f"{_greeting(convo)} your refund of {amount} for order #{order_id} "
            f"has been issued (refund {refund_id}). It usually reaches your card within 5-10 "
            "business days."
        )
    reason = (call.output or "no reason was given").strip()
    return (
        f"{_greeting(convo)} I'm sorry, but I can't issue the refund of {amount} for order "
        f"#{order_id}: {reason} If you think this is wrong, reply and a "
        "specialist will take another look."
    )


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".!?")
    return (text[:1].upper() + text[1:] + ".") if text else "Not stated."


def _section_names(body: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """The section headings the loaded skill's body prescribes (stage 2 drives the output)."""
    names = tuple(
        m.group(1).strip() for m in re.finditer(r"^##\s+(.+?)\s*$", body, re.MULTILINE)
    )
    return names if len(names) >= 3 else default


def _steps_taken(convo: Conversation) -> list[str]:
    """What was done so far in the conversation, once per distinct call."""
    steps: list[str] = []
    for call in convo.earlier_calls + convo.turn_calls:
        if call.name == "load_skill":
            continue
        args = ", ".join(f"{k}={v}" for k, v in call.arguments.items() if k != "description")
        step = f"{call.name}({args})" + (" failed" if call.failed else "")
        if step not in steps:
            steps.append(step)
    return steps


def _sections_reply(convo: Conversation, skill: str, default: tuple[str, ...]) -> str:
    sections = _section_names(convo.skill_body(skill), default)
    customer = convo.customer()
    who = [
        convo.name
        or _first(customer, "name")
        or _first(convo.order(), "customer_name")
        or "Customer (name not given)"
    ]
    customer_id = (
        convo.customer_id
        or _first(customer, "customer_id", "id")
        or _first(convo.order(), "customer_id")
    )
    if customer_id:
        who.append(f"customer id {customer_id}")
    if convo.tier:
        who.append(f"{convo.tier.title()} tier")
    if convo.ticket_id:
        who.append(f"ticket #{convo.ticket_id}")
    if order_id := convo.order_id():
        who.append(f"order #{order_id}")
    steps = _steps_taken(convo)
    precedent, best = _precedent(convo)
    awaiting = any(c.name == "issue_refund" and c.output is None for c in convo.earlier_calls)
    negative = _NEGATIVE.findall(" ".join([*convo.earlier_user_texts, convo.newest]))
    content = {
        "customer context": "; ".join(who) + ".",
        "issue": _sentence(convo.issue),
        "resolution steps taken": "; ".join(steps) + "." if steps else "None yet.",
        "attempted resolutions": "; ".join(steps) + "." if steps else "None yet.",
        "current status": "Waiting on refund approval." if awaiting else "Open, unresolved.",
        "recommended next action": (
            f"Apply the precedent {_case_label(best)}: {_resolution(best)}"
            if best
            else "Tier-2 billing confirms the refund's status with the payment processor today."
        ),
        "sentiment signals": (
            "Negative: " + ", ".join(sorted({n.lower() for n in negative})) + "."
            if negative
            else "Neutral; the customer asked for a person."
        ),
        "recommended team": "Billing (refunds and charges)."
        if re.search(
            r"refund|charge|billing|payment",
            " ".join([*convo.earlier_user_texts, convo.newest]),
            re.IGNORECASE,
        )
        else "Tier-2 general support.",
        "suggested sla": {
            "enterprise": "First response within 1 business hour.",
            "pro": "First response within 4 business hours.",
        }.get(convo.tier or "", "First response within 1 business day."),
    }
    lines = []
    for section in sections:
        lines.append(f"## {section}")
        lines.append(content.get(section.lower(), "Not available."))
        lines.append("")
    if precedent and skill == "summarize-ticket" and best:
        lines.append(f"(Closest precedent: {_case_label(best)}.)")
    if skill == "escalate-with-context":
        lines.append(
            "I've passed your case to a specialist with the full context above; you won't need "
            "to repeat yourself, and they will contact you within the time shown."
        )
    return "\n".join(lines).strip()
