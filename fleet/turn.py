"""The agent turn: each claimed message becomes one OpenAI Agents SDK turn.

``fleet worker --handler agent`` runs :class:`AgentHandler`. For one message:

1. If the message comes back after a human decided its parked refund
   (:func:`fleet.approvals.take_decided_run`), restore the saved ``RunState``, apply the
   decision to every pending tool call (a rejection tells the model why) and resume; otherwise
   start a fresh run with the message as input.
2. Open the turn in one round trip: upsert the ``conversations`` row (before any audit row
   points at it), drop what a failed earlier attempt of this turn wrote, read the history
   (:class:`fleet.memory.PostgresSession`).
3. ``Runner.run`` the message's agent, built from its ``fleet.agents`` row (cached by version,
   :mod:`fleet.agent_builder`): its model (offline policy or an OpenAI-compatible server,
   :mod:`fleet.models`), ``load_skill`` for its skills (:mod:`fleet.skills`), the
   ``customer-data`` MCP server restricted to its tools, through a client pool
   (:mod:`fleet.mcp_client`), one ``ask_<name>`` tool per sub-agent (:mod:`fleet.delegation`),
   the input guardrail (:mod:`fleet.guardrails`). Hooks record every tool and skill call for
   the audit. A resumed run is rebuilt from the agent versions it was parked with.
4. End the turn:
   * a reply: save the turn's items and the conversation summary (one statement, fenced by the
     lease), write its audit rows (:mod:`fleet.audit`), return :class:`~fleet.handlers.Reply`;
   * tool approvals pending: save the items, serialise the run and park it
     (:func:`fleet.approvals.park_run`), return :class:`~fleet.handlers.Parked`;
   * the guardrail tripped: audit ``guardrail_tripped``, reply with a refusal, remember nothing;
   * anything failed (the MCP server down or slow, the model failing): audit the calls that did
     not finish as ``error``/``timeout`` and raise, so the queue retries the whole turn; nothing
     of the failed attempt enters the conversation's memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from agents import (
    InputGuardrailTripwireTriggered,
    MaxTurnsExceeded,
    RunConfig,
    RunHooks,
    Runner,
    RunState,
    Tool,
)

from fleet import agents as agent_rows
from fleet import approvals, metrics
from fleet.agent_builder import AgentBuilder, BuiltAgent
from fleet.agents import ASK_PREFIX
from fleet.audit import AuditWriter, TurnAudit, clip, now
from fleet.database import close_pool, create_pool, resolve_url
from fleet.delegation import Delegator, delegation_depth
from fleet.errors import ConfigurationError, FleetError, HandlerError, TurnCancelled
from fleet.guardrails import REFUSAL
from fleet.handlers import HandlerResult, Lease, Parked, Reply
from fleet.limits import TurnLimitExceeded, TurnLimits
from fleet.mcp_client import CustomerDataUnavailable, MCPClientPool
from fleet.memory import PostgresSession
from fleet.models import OFFLINE, build_model
from fleet.offline_model import Conversation
from fleet.queue import ClaimedMessage
from fleet.settings import Settings
from fleet.skills import LOAD_SKILL, SkillLibrary

log = logging.getLogger("fleet.turn")


@dataclass
class _Started:
    name: str
    arguments: dict[str, Any]
    at: datetime
    clock: float


@dataclass
class TurnContext:
    """What a turn's hooks, tools and MCP ``_meta`` need; the SDK carries it as run context."""

    session_id: str
    message_id: int
    customer_id: str | None
    variables: dict[str, Any]
    audit: TurnAudit
    #: The worker's lease on the message (a delegation runs its child turn through it).
    lease: Any = None
    #: How deep this turn is in a chain of delegations (0: a customer's message).
    depth: int = 0
    #: ``{agent name: version}`` of the agent graph this turn runs (parked with the run).
    agent_graph: dict[str, int] = field(default_factory=dict)
    tool_errors: set[str] = field(default_factory=set)
    started: dict[str, _Started] = field(default_factory=dict)
    model_calls: int = 0
    tool_calls: int = 0
    tokens: tuple[int, int] = (0, 0)
    #: This turn's limits (the settings', or its agent's); the hooks enforce them.
    limits: TurnLimits = field(default_factory=TurnLimits)
    #: Set by the worker when someone cancels the message; the hooks stop at the next step.
    cancel: asyncio.Event | None = None

    def check_cancelled(self, step: str) -> None:
        """Raise :class:`TurnCancelled` when the message was cancelled: called before each
        model call and each tool call, so a cancelled turn takes no further step."""
        if self.cancel is not None and self.cancel.is_set():
            raise TurnCancelled(f"message {self.message_id} was cancelled before {step}")

    def serialize(self) -> dict[str, Any]:
        """What a parked RunState keeps of the context (never the run variables): who, and the
        turn's counts so far, so its limits hold across the park (:meth:`restore_counts`)."""
        return {
            "session_id": self.session_id,
            "message_id": self.message_id,
            "customer_id": self.customer_id,
            "tool_calls": self.tool_calls,
            "tokens": list(self.tokens),
        }

    def restore_counts(self, state_json: str) -> None:
        """Go on from the counts a parked run kept: a turn that parks for an approval and
        resumes is one turn, so ``FLEET_MAX_TOOL_CALLS`` and ``FLEET_TOKEN_BUDGET`` count both
        parts (model calls already do: the SDK's ``max_turns`` counts across the resume)."""
        try:
            parked = json.loads(state_json).get("context", {}).get("context") or {}
            self.tool_calls = int(parked.get("tool_calls", 0))
            input_tokens, output_tokens = parked.get("tokens", (0, 0))
            self.tokens = (int(input_tokens), int(output_tokens))
        except (ValueError, TypeError, AttributeError):
            return  # a run parked before the counts were kept: count from here


def _arguments(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return {"raw": (raw or "")[:1000]}
    return value if isinstance(value, dict) else {"value": value}


class AuditHooks(RunHooks[TurnContext]):
    """Tool and skill calls -> audit rows, and the turn's limits and cancellation.

    A hook that raises kills the turn: only the deliberate stops raise (:class:`TurnCancelled`
    before a step of a cancelled message, :class:`TurnLimitExceeded` past a limit); the audit
    bodies are guarded, so an audit bug never aborts the customer's turn (course Decision 7).
    """

    async def on_llm_start(self, context: Any, agent: Any, system_prompt: Any, items: Any) -> None:
        turn: TurnContext = context.context
        turn.check_cancelled(f"model call {turn.model_calls + 1}")
        turn.model_calls += 1  # the limit is the SDK's max_turns (MaxTurnsExceeded, below)

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        turn: TurnContext = context.context
        usage = getattr(response, "usage", None)
        if usage is not None:
            turn.tokens = (
                turn.tokens[0] + (usage.input_tokens or 0),
                turn.tokens[1] + (usage.output_tokens or 0),
            )
        turn.limits.check_tokens(sum(turn.tokens))

    async def on_tool_start(self, context: Any, agent: Any, tool: Tool) -> None:
        turn: TurnContext = context.context
        turn.check_cancelled(f"tool call {turn.tool_calls + 1} ({tool.name})")
        turn.tool_calls += 1
        try:
            turn.limits.check_tool_calls(turn.tool_calls)
        except TurnLimitExceeded as exc:
            # The call over the limit never runs; its row says so.
            arguments = _arguments(getattr(context, "tool_arguments", None))
            turn.audit.capability(
                _capability(tool.name, arguments),
                action="skill_activated" if tool.name == LOAD_SKILL else "capability_invoked",
                arguments=arguments,
                result={"blocked": str(exc)},
                status="blocked",
                latency_ms=None,
                payload={"call_id": getattr(context, "tool_call_id", None)},
            )
            raise
        try:
            call_id = getattr(context, "tool_call_id", None)
            if call_id:
                context.context.started[call_id] = _Started(
                    tool.name,
                    _arguments(getattr(context, "tool_arguments", None)),
                    now(),
                    time.monotonic(),
                )
        except Exception:
            log.exception("audit hook on_tool_start failed")

    async def on_tool_end(self, context: Any, agent: Any, tool: Tool, result: Any) -> None:
        try:
            turn: TurnContext = context.context
            call_id = getattr(context, "tool_call_id", None) or ""
            started = turn.started.pop(call_id, None)
            if started is None:
                started = _Started(tool.name, {}, now(), time.monotonic())
            latency = int((time.monotonic() - started.clock) * 1000)
            if tool.name.startswith(ASK_PREFIX):
                return  # a delegation: audited as `delegated` by fleet.delegation
            if tool.name == LOAD_SKILL:
                text = str(result)
                skill = str(started.arguments.get("name", ""))
                failed = text.startswith("error:")
                turn.audit.capability(
                    f"skill:{skill}",
                    action="skill_activated",
                    arguments=started.arguments,
                    result=text if failed else {"chars": len(text)},
                    status="error" if failed else "ok",
                    latency_ms=latency,
                    payload={
                        "call_id": call_id,
                        "stage": "reference" if started.arguments.get("reference") else "body",
                    },
                    at=started.at,
                )
                if not failed:
                    metrics.SKILL_ACTIVATIONS.labels(skill).inc()
                return
            turn.audit.capability(
                f"mcp:{tool.name}",
                action="capability_invoked",
                arguments=started.arguments,
                result=_output_text(result),
                status="error" if call_id in turn.tool_errors else "ok",
                latency_ms=latency,
                payload={"call_id": call_id},
                at=started.at,
            )
        except Exception:
            log.exception("audit hook on_tool_end failed")


def _capability(tool_name: str, arguments: dict[str, Any]) -> str:
    return f"skill:{arguments.get('name')}" if tool_name == LOAD_SKILL else f"mcp:{tool_name}"


def _output_text(result: Any) -> Any:
    """An MCP tool output (text, or a list of content parts) as audit JSON."""
    if isinstance(result, dict) and "text" in result:
        return clip(result["text"])
    if isinstance(result, list):
        texts = [p.get("text") for p in result if isinstance(p, dict) and "text" in p]
        if texts:
            return clip("\n".join(texts))
    return clip(result)


def _failure_status(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError) or "timed out" in str(seen).lower():
            return "timeout"
        seen = seen.__cause__ or seen.__context__
    return "error"


def _root_cause(exc: BaseException) -> BaseException:
    """The fleet error behind an SDK wrapper (the SDK re-raises tool failures wrapped)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FleetError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc



class AgentHandler:
    """The ``agent`` handler: one Agents SDK turn per claimed message (module docstring)."""

    name = "agent"
    #: A cancelled message stops before its next model or tool call (AuditHooks), so a tool
    #: call in flight (a refund, after its approval) is never cut off halfway.
    stops_on_cancel_request = True

    def __init__(
        self,
        settings: Settings,
        *,
        pool_size: int = 6,
        skills: SkillLibrary | None = None,
        model: Any = None,
        listen: bool = True,
    ) -> None:
        """``listen=False`` for a ``--poll-only`` worker: its delegations poll for their
        children's outcomes instead of LISTENing (PgBouncer's transaction pooling)."""
        self.settings = settings
        self.pool_size = pool_size
        self.skills = skills or SkillLibrary.from_settings(settings)
        self.model = model or build_model(settings)
        self.pool: asyncpg.Pool | None = None
        self.audit: AuditWriter | None = None
        self.mcp = MCPClientPool(settings)
        self.delegator = Delegator(settings, lambda: self.pool, listen=listen)
        #: Builds each turn's agent from its row, cached by the versions of its graph.
        self.builder = AgentBuilder(
            settings, model=self.model, skills=self.skills, mcp=self.mcp, delegate=self.delegator
        )
        #: The shipped ``support`` definition, built without the database (introspection);
        #: turns run the agent built from their message's row.
        self.agent = self.builder.default_agent()
        self.run_config = RunConfig(
            tracing_disabled=self._tracing_disabled(),
            trace_include_sensitive_data=False,
            workflow_name="pgfleet support turn",
        )
        self.hooks = AuditHooks()
        self.limits = TurnLimits.from_settings(settings)
        self._background: set[asyncio.Future[Any]] = set()

    def _tracing_disabled(self) -> bool:
        """The SDK's own tracing exports to the OpenAI platform: only with the real API."""
        s = self.settings
        return s.model_name == OFFLINE or not s.openai_api_key or bool(s.openai_base_url)

    def capabilities(self) -> tuple[list[str], list[str]]:
        """The MCP tools and skills this worker has: it claims only messages for agents
        (and sub-agents) within them."""
        return self.builder.capabilities()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """The agent and audit pools, the MCP client's tool list, the default agent. A start
        that fails (the database went away meanwhile) closes what it opened before raising,
        so the worker can wait and call it again."""
        # One INFO line per MCP request from the HTTP client is noise (and CPU) in a worker.
        for name in ("httpx2", "httpx", "mcp.client"):
            logging.getLogger(name).setLevel(max(logging.WARNING, log.getEffectiveLevel()))
        try:
            await self._open()
        except BaseException:
            if self.audit is not None:
                await self.audit.close()
            if self.pool is not None:
                await close_pool(self.pool)
            self.pool = self.audit = None
            raise

    async def _open(self) -> None:
        url = await resolve_url(self.settings)
        self.pool = await create_pool(  # no session state left behind: skip the reset
            self.settings, "fleet-agent", url=url, min_size=1, max_size=self.pool_size,
            reset_sessions=False, command_timeout=self.settings.fleet_lease_seconds,
        )
        audit = AuditWriter(self.settings, url=url)
        await audit.start()
        self.audit = audit
        # Before the first claim: a server started beside this worker may still be loading.
        await self.mcp.warm(wait=self.settings.fleet_mcp_startup_wait_seconds)
        # The default agent exists even on a database migrated before agents were rows.
        try:
            await agent_rows.ensure_default(self.pool, self.skills.skills)
        except asyncpg.InsufficientPrivilegeError as exc:  # a fleet_worker role may only read
            raise ConfigurationError(
                "the default agent 'support' is missing and this role may not create it; "
                "run `fleet migrate` (as the schema owner)"
            ) from exc

    async def close(self) -> None:
        await self.mcp.close()
        await self.delegator.close()
        if self.audit is not None:
            await self.audit.close()
        if self.pool is not None:
            await close_pool(self.pool)
        await self.model.close()

    # -- one message ---------------------------------------------------------------------------

    async def handle(self, message: ClaimedMessage, lease: Lease) -> HandlerResult:
        assert self.pool is not None and self.audit is not None, "start() was not called"
        turn = TurnContext(
            session_id=message.session_id,
            message_id=message.id,
            customer_id=message.customer_id,
            variables=message.variables,
            audit=TurnAudit(message.session_id, actor=f"agent:{message.agent}"),
            limits=self.limits,
            cancel=lease.cancel_requested,
        )
        turn.lease = lease
        turn.depth = delegation_depth(message.metadata)
        # A message on its first claim cannot have a parked run: skip the lookup.
        decided = None
        if message.attempts > 1 or message.takeovers > 0:
            decided = await approvals.take_decided_run(lease)
        try:
            if decided is not None:
                return await self._resume(message, lease, turn, decided)
            return await self._fresh(message, lease, turn)
        except asyncio.CancelledError:
            if lease.cancel_requested.is_set():
                # Cancelled by request, and the step did not end in time: stopped mid-step.
                await asyncio.shield(self._cancelled(message, turn, "interrupted mid-step"))
                raise
            self._record_unfinished(turn, "error", "the turn was cancelled")
            # Cancelled (lease lost, shutdown): the trail is still written, in the background.
            task = asyncio.ensure_future(self.audit.write(turn.audit))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            raise
        except InputGuardrailTripwireTriggered:
            raise  # handled in _fresh; never reaches here
        except Exception as exc:
            cause = _root_cause(exc)
            if isinstance(exc, MaxTurnsExceeded):
                # The SDK refuses model call N+1 itself (counting across park and resume).
                cause = TurnLimitExceeded(
                    "model_calls", turn.limits.max_model_calls + 1,
                    turn.limits.max_model_calls, turn.limits.origin,
                )
            if isinstance(cause, TurnCancelled):
                await self._cancelled(message, turn, str(cause))
                raise cause from None
            if isinstance(cause, TurnLimitExceeded):
                await self._limit_exceeded(message, turn, cause)
                raise cause from exc
            status = _failure_status(exc)
            self._record_unfinished(turn, status, str(cause))
            turn.audit.event(
                "turn_failed",
                f"message:{message.id}",
                {
                    "message_id": message.id,
                    "attempt": message.attempts,
                    "max_attempts": message.max_attempts,
                    "error": f"{type(cause).__name__}: {cause}"[:1000],
                },
                {"status": status, "retried": message.attempts < message.max_attempts},
            )
            await self.audit.write(turn.audit)
            if isinstance(cause, FleetError):
                raise cause from exc
            raise HandlerError(f"agent turn failed: {type(exc).__name__}: {exc}") from exc

    async def _cancelled(self, message: ClaimedMessage, turn: TurnContext, how: str) -> None:
        """A cancelled turn's trail: calls in flight audited as cancelled, ``message_cancelled``
        with how far it got, written (committed) before the worker finishes the message."""
        assert self.audit is not None
        self._record_unfinished(turn, "error", "the message was cancelled during this call")
        turn.audit.event(
            "message_cancelled",
            f"message:{message.id}",
            {
                "message_id": message.id,
                "was": "running",
                "attempt": message.attempts,
                "stopped": how,
                "model_calls": turn.model_calls,
                "tool_calls": turn.tool_calls,
            },
            {"status": "cancelled"},
        )
        await self.audit.write(turn.audit)

    async def _limit_exceeded(
        self, message: ClaimedMessage, turn: TurnContext, exc: TurnLimitExceeded
    ) -> None:
        """A turn past its limits: calls in flight audited as failed, ``turn_limit_exceeded``
        with the limit and the counts; the message goes dead (no retry)."""
        assert self.audit is not None
        self._record_unfinished(turn, "error", str(exc))
        turn.audit.event(
            "turn_limit_exceeded",
            f"message:{message.id}",
            {
                "message_id": message.id,
                "attempt": message.attempts,
                **exc.audit_payload(),
                "model_calls": turn.model_calls,
                "tool_calls": turn.tool_calls,
                "input_tokens": turn.tokens[0],
                "output_tokens": turn.tokens[1],
                "error": str(exc),
            },
            {"status": "error", "retried": False},
        )
        await self.audit.write(turn.audit)

    def _record_unfinished(self, turn: TurnContext, status: str, error: str) -> None:
        """Tool calls that started but never ended (the run raised): audited as failed."""
        for call_id, started in list(turn.started.items()):
            latency = int((time.monotonic() - started.clock) * 1000)
            turn.audit.capability(
                f"skill:{started.arguments.get('name')}"
                if started.name == LOAD_SKILL
                else f"mcp:{started.name}",
                action="skill_activated" if started.name == LOAD_SKILL else "capability_invoked",
                arguments=started.arguments,
                result={"error": error[:1000]},
                status=status,  # type: ignore[arg-type]
                latency_ms=latency,
                payload={"call_id": call_id},
                at=started.at,
            )
        turn.started.clear()

    async def _fresh(
        self, message: ClaimedMessage, lease: Lease, turn: TurnContext
    ) -> HandlerResult:
        assert self.pool is not None and self.audit is not None
        received_at = now()
        built = await self.builder.for_message(self.pool, message.agent)
        self._use(turn, built)
        session = await PostgresSession.open_turn(
            self.pool,
            message.session_id,
            message_id=message.id,
            user_id=message.customer_id or "anonymous",
            metadata={"agent": message.agent},
        )
        turn.audit.event(
            "message_received",
            f"conversation:{message.session_id}",
            {
                "message_id": message.id,
                "attempt": message.attempts,
                "chars": len(message.body),
                "excerpt": message.body[:200],
                "history_items": len(session._history or []),
            },
            {"status": "ok"},
            at=received_at,
        )
        try:
            result = await Runner.run(
                built.agent,
                message.body,
                session=session,
                context=turn,
                hooks=self.hooks,
                run_config=self.run_config,
                max_turns=turn.limits.max_model_calls,
            )
        except InputGuardrailTripwireTriggered as exc:
            info = exc.guardrail_result.output.output_info or {}
            turn.audit.event(
                "guardrail_tripped",
                f"guardrail:{exc.guardrail_result.guardrail.get_name()}",
                {"message_id": message.id, **info},
                {"status": "blocked"},
            )
            return await self._reply(message, lease, turn, session, REFUSAL, save=False)
        return await self._finish(message, lease, turn, session, result, resume_of=None)

    async def _resume(
        self,
        message: ClaimedMessage,
        lease: Lease,
        turn: TurnContext,
        decided: approvals.DecidedRun,
    ) -> HandlerResult:
        assert self.pool is not None
        session = await PostgresSession.open_turn(
            self.pool,
            message.session_id,
            message_id=message.id,
            user_id=message.customer_id or "anonymous",
            resume_of=decided.approval_id,
        )
        graph = getattr(decided, "agent_graph", None)
        built = (
            await self.builder.for_versions(self.pool, message.agent, graph)
            if graph
            else await self.builder.for_message(self.pool, message.agent)
        )
        self._use(turn, built)
        turn.restore_counts(decided.state_json)
        state = await RunState.from_string(
            built.agent, decided.state_json, context_override=turn
        )
        reason = decided.reason or "the approver rejected it"
        for item in state.get_interruptions():
            if decided.decision == "approved":
                state.approve(item)
                continue
            state.reject(item, rejection_message=reason)
            turn.audit.capability(
                f"mcp:{item.name}",
                action="capability_invoked",
                arguments=_arguments(item.arguments),
                result={"rejected": reason},
                status="blocked",
                latency_ms=None,
                payload={"call_id": item.call_id, "approval_id": decided.approval_id},
            )
        result = await Runner.run(
            built.agent,
            state,
            session=session,
            hooks=self.hooks,
            run_config=self.run_config,
            max_turns=turn.limits.max_model_calls,
        )
        return await self._finish(
            message, lease, turn, session, result, resume_of=decided.approval_id
        )

    def _use(self, turn: TurnContext, built: BuiltAgent) -> None:
        """The turn runs ``built``: remember its graph (parked with the run) and apply the
        row's own limits (``metadata.limits``: max_model_calls, max_tool_calls, token_budget)
        over the settings'."""
        turn.agent_graph = built.graph
        overrides = built.row.metadata.get("limits")
        if isinstance(overrides, dict):
            turn.limits = turn.limits.override(overrides, origin=f"agent {built.row.name}")

    async def _finish(
        self,
        message: ClaimedMessage,
        lease: Lease,
        turn: TurnContext,
        session: PostgresSession,
        result: Any,
        *,
        resume_of: str | None,
    ) -> HandlerResult:
        assert self.audit is not None
        # Cancelled while the last step ran: neither park nor reply (nothing more happens).
        turn.check_cancelled("the turn's end")
        if result.interruptions:
            pending = [
                {"tool": i.name, "arguments": _arguments(i.arguments), "call_id": i.call_id}
                for i in result.interruptions
            ]
            state_json = result.to_state().to_string(context_serializer=TurnContext.serialize)
            # The items so far are part of the paused run: saved before it is parked.
            await session.flush(lease.token, summary=None)
            await self.audit.write(turn.audit)
            approval_id = await approvals.park_run(
                lease,
                agent_graph=turn.agent_graph,
                session_id=message.session_id,
                interruptions=pending,
                state_json=state_json,
                ttl_seconds=self.settings.fleet_approval_ttl_seconds,
            )
            log.info("message %d parked for approval %s", message.id, approval_id)
            return Parked(approval_id)
        reply = str(result.final_output or "").strip() or "Sorry, I have no answer to that yet."
        return await self._reply(message, lease, turn, session, reply, save=True)

    async def _reply(
        self,
        message: ClaimedMessage,
        lease: Lease,
        turn: TurnContext,
        session: PostgresSession,
        reply: str,
        *,
        save: bool,
    ) -> Reply:
        assert self.audit is not None
        # The reply's own row goes with the reply: the worker commits it in the transaction that
        # stores the reply (fleet.audit). The turn's other rows are durable before that.
        sent = TurnAudit(turn.audit.session_id, turn.audit.actor)
        sent.event(
            "message_sent",
            f"conversation:{message.session_id}",
            {
                "message_id": message.id,
                "chars": len(reply),
                "excerpt": reply[:500],
                "model": self.settings.model_name,
                "model_calls": turn.model_calls,
                "tool_calls": turn.tool_calls,
                "input_tokens": turn.tokens[0],
                "output_tokens": turn.tokens[1],
            },
            {"status": "ok"},
        )
        writes: list[Any] = [self.audit.write(turn.audit)]
        if save:
            writes.append(session.flush(lease.token, summary=summarize(session, message, reply)))
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return Reply(reply, trail=sent)


def summarize(session: PostgresSession, message: ClaimedMessage, reply: str) -> str:
    """The conversation's one-line summary after this turn (``conversations.summary``)."""
    items = (session._history or [])[-60:] + session.pending
    convo = Conversation.read(None, items)
    facts = []
    if convo.name:
        facts.append(f"customer {convo.name}")
    if order_id := convo.order_id():
        facts.append(f"order #{order_id}")
    turns = len(convo.earlier_user_texts) + 1
    head = ", ".join(facts) + "; " if facts else ""
    return (
        f"{head}{turns} customer message(s); last asked: {message.body[:160]!r}; "
        f"last reply: {reply[:200]!r}"
    )


__all__ = ["AgentHandler", "CustomerDataUnavailable", "TurnContext"]
