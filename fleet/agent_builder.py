"""Building the SDK agent a turn runs from its ``fleet.agents`` row (and its sub-agents' rows).

Per turn the worker reads the agent's graph (the agent and every agent it can delegate to: one
indexed recursive read, :func:`fleet.agents.load_graph`) and looks the built agent up by the
graph's ``(name, version)`` pairs. Building happens only when a version changed, so an update
reaches the next turn of every worker, without a restart, for the price of one small read.

What comes from the row:

* **instructions**: the row's text, then the index of the agent's skills, then the customer id;
* **model**: the row's model, or the worker's configured model when the row has none;
* **skills**: ``load_skill`` restricted to the row's skills (no tool at all without skills);
* **tools**: the ``customer-data`` server restricted to the row's tools (the refund still behind
  the approval gate); the server is left out entirely when the row has no tools;
* **sub-agents**: one function tool ``ask_<name>`` each; calling it is a delegation
  (:mod:`fleet.delegation`): a child turn in the same queue.

A parked run is resumed against the versions it was parked with (``run_states.agent_graph``,
read back from ``fleet.agent_versions``), never against a definition updated while it waited:
the SDK restores a run only onto the same agent, tools and MCP server it was paused on, and the
approver approved what that version was about to do.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from agents import Agent, FunctionTool, ModelSettings, RunContextWrapper, Tool

from fleet import agents as agent_rows
from fleet.agents import ASK_PREFIX, AgentRow
from fleet.errors import PermanentHandlerError
from fleet.guardrails import input_guardrail
from fleet.mcp_client import CustomerDataServer, MCPClientPool
from fleet.models import build_model
from fleet.settings import Settings
from fleet.skills import SkillLibrary

#: Built agents kept per worker (each graph version is one entry).
CACHE_SIZE = 64

Graph = tuple[tuple[str, int], ...]


class ScopedCustomerData(CustomerDataServer):
    """The ``customer-data`` server as one agent sees it: only the tools its row allows. A call
    to any other tool is refused here too, whatever the model asks for."""

    def __init__(self, pool: MCPClientPool, allowed: frozenset[str]) -> None:
        super().__init__(pool)
        self.allowed = allowed

    async def list_tools(self, run_context: Any = None, agent: Any = None) -> list[Any]:
        return [t for t in await self.pool.tools() if t.name in self.allowed]

    async def call_tool(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None = None
    ) -> Any:
        if tool_name not in self.allowed:
            raise PermanentHandlerError(f"this agent may not call {tool_name!r}")
        return await super().call_tool(tool_name, arguments, meta)


class RowAgent(Agent[Any]):
    """An agent built from a row, with its MCP tools converted once (the tool list of one
    version never changes; see ``fleet bench turns`` for what the conversion costs per step)."""

    async def get_mcp_tools(self, run_context: RunContextWrapper[Any]) -> list[Tool]:
        cached = self.__dict__.get("_mcp_tools_cache")
        if cached is None:
            cached = await super().get_mcp_tools(run_context)
            self.__dict__["_mcp_tools_cache"] = cached
        return list(cached)


@dataclass(frozen=True)
class BuiltAgent:
    """One agent graph, built: the SDK agent and the versions it was built from."""

    agent: RowAgent
    row: AgentRow
    graph: dict[str, int]


def graph_key(rows: Mapping[str, AgentRow]) -> Graph:
    return tuple(sorted((name, row.version) for name, row in rows.items()))


class AgentBuilder:
    """Builds and caches the agents of one worker (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        model: Any,
        skills: SkillLibrary,
        mcp: MCPClientPool,
        delegate: Any,
    ) -> None:
        self.settings = settings
        self.default_model = model
        self.skills = skills
        self.mcp = mcp
        #: ``async delegate(context, child, request, call_id) -> str``: runs a sub-agent.
        self.delegate = delegate
        self._models: dict[str, Any] = {}
        self._built: OrderedDict[tuple[str, Graph], BuiltAgent] = OrderedDict()
        self._guardrail = input_guardrail(settings.fleet_max_input_chars)

    # -- what a worker can serve ---------------------------------------------------------------

    def capabilities(self) -> tuple[list[str], list[str]]:
        """The MCP tools this worker's server exposes (the five it is specified to have until
        the list was fetched) and the skills on its disk: the claim's agent filter."""
        names = self.mcp.tool_names()
        if names is None:
            names = list(agent_rows.CUSTOMER_DATA_TOOLS)
        return names, sorted(self.skills.skills)

    # -- lookups -------------------------------------------------------------------------------

    async def for_message(self, db: asyncpg.Pool | asyncpg.Connection, name: str) -> BuiltAgent:
        """The agent ``name`` as its rows say now (one read; built only when a version moved)."""
        rows = await agent_rows.load_graph(db, name)
        if name not in rows:
            raise PermanentHandlerError(
                f"no agent named {name!r}; define it with `fleet agents create`"
            )
        return self._get(name, rows)

    async def for_versions(
        self, db: asyncpg.Pool | asyncpg.Connection, name: str, graph: Mapping[str, int]
    ) -> BuiltAgent:
        """The agent ``name`` exactly as the versions in ``graph`` defined it (a parked run)."""
        rows = await agent_rows.load_versions(db, graph)
        if name not in rows or set(rows) != set(graph):
            raise PermanentHandlerError(
                f"the versions {json.dumps(dict(graph))} this run was parked with are gone"
            )
        return self._get(name, rows)

    def _get(self, name: str, rows: Mapping[str, AgentRow]) -> BuiltAgent:
        key = (name, graph_key(rows))
        built = self._built.get(key)
        if built is None:
            built = BuiltAgent(self._build(rows[name]), rows[name], dict(key[1]))
            self._built[key] = built
            while len(self._built) > CACHE_SIZE:
                self._built.popitem(last=False)
        else:
            self._built.move_to_end(key)
        return built

    # -- building ------------------------------------------------------------------------------

    def _model(self, name: str | None) -> Any:
        if not name:
            return self.default_model
        model = self._models.get(name)
        if model is None:
            model = build_model(self.settings.model_copy(update={"fleet_model": name}))
            self._models[name] = model
        return model

    def default_agent(self) -> RowAgent:
        """The shipped ``support`` definition, built without the database (introspection)."""
        from datetime import UTC, datetime

        spec = agent_rows.default_spec(self.skills.skills)
        at = datetime.now(UTC)
        return self._build(AgentRow(**spec.model_dump(), id="", version=0, created_at=at,
                                    updated_at=at))

    def _build(self, row: AgentRow) -> RowAgent:
        skills = self.skills.subset(row.skills)
        index = skills.index() if row.skills else ""
        base = row.instructions.rstrip() + ("\n\n" + index if index else "")

        def instructions(ctx: RunContextWrapper[Any], _agent: Agent[Any]) -> str:
            customer = getattr(ctx.context, "customer_id", None) if ctx.context else None
            return f"{base}\n\nCustomer id: {customer}" if customer else base

        tools: list[Tool] = []
        if row.skills:
            tools.append(skills.tool())
        tools.extend(self._ask_tool(row.name, child) for child in row.sub_agents)
        servers = (
            [ScopedCustomerData(self.mcp, frozenset(row.tools))] if row.tools else []
        )
        return RowAgent(
            name=row.name,
            instructions=instructions,
            model=self._model(row.model),
            tools=tools,
            mcp_servers=servers,
            input_guardrails=[self._guardrail],
            model_settings=ModelSettings(parallel_tool_calls=True),
        )

    def _ask_tool(self, parent: str, child: str) -> FunctionTool:
        delegate = self.delegate

        async def invoke(ctx: Any, raw: str) -> str:
            try:
                args = json.loads(raw or "{}")
            except ValueError:
                args = {}
            request = str(args.get("request") or "").strip() if isinstance(args, dict) else ""
            if not request:
                return f"error: {ASK_PREFIX}{child} takes a JSON object with a 'request' text"
            call_id = getattr(ctx, "tool_call_id", None) or ""
            return await delegate(ctx.context, parent, child, request, call_id)

        return FunctionTool(
            name=f"{ASK_PREFIX}{child}",
            description=(
                f"Ask the {child!r} agent (a specialist) to handle a request; returns its reply. "
                "Give the whole request: it does not see this conversation."
            ),
            params_json_schema={
                "type": "object",
                "properties": {"request": {"type": "string",
                                           "description": "What the specialist should do."}},
                "required": ["request"],
                "additionalProperties": False,
            },
            on_invoke_tool=invoke,
            strict_json_schema=True,
        )


__all__ = ["AgentBuilder", "BuiltAgent", "ScopedCustomerData"]
