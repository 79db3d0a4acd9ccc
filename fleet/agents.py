"""Agents as database rows: ``fleet.agents`` (current definitions) and ``fleet.agent_versions``.

A message names its agent (``fleet.messages.agent``, default ``support``); the worker builds that
agent from its row for every turn (:mod:`fleet.turn`), caching the built agent by the versions
of its graph, so an update changes the next turn of every worker without a restart or deploy.

Why definitions are validated here, at write time, and not when a turn runs: a bad definition
(a tool the customer-data server does not have, a skill nobody installed, a sub-agent that does
not exist, a cycle of sub-agents) would otherwise surface as failed turns in production. Every
create and update takes a table lock first, so two concurrent updates cannot each add half of a
cycle, and writes the version's snapshot to ``fleet.agent_versions`` in the same transaction (a
parked run resumes against the exact versions it was parked with).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel, Field, field_validator

from fleet.errors import InvalidInput, NotFound
from fleet.sql import queries

SQL = queries("agents.sql")

#: The agent a message gets when it names none.
DEFAULT_AGENT = "support"

#: The customer-data MCP server's whole surface (AGENTS.md: a new ability is a new narrow tool).
CUSTOMER_DATA_TOOLS: tuple[str, ...] = (
    "lookup_customer",
    "find_customer_by_email",
    "lookup_order",
    "find_similar_resolved_tickets",
    "issue_refund",
)

#: A sub-agent ``x`` appears to its parent as the tool ``ask_x``.
ASK_PREFIX = "ask_"

DEFAULT_INSTRUCTIONS = """\
You are the customer-support agent of an online shop. Answer the customer's newest message.
- Reach business data ONLY through the customer-data tools (lookup_customer,
  find_customer_by_email, lookup_order, find_similar_resolved_tickets, issue_refund); never
  guess an order's amount or status.
- Before drafting an answer to a described problem, search similar resolved tickets and cite
  the closest resolution; say plainly when there is no strong precedent.
- Issue a refund only with issue_refund (a human approves it); never promise one otherwise.
- Use what the customer told you earlier in the conversation (name, order number).
- Be brief, concrete and polite."""

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

Executor = asyncpg.Connection | asyncpg.Pool


class AgentSpec(BaseModel):
    """What defines an agent (the input of ``create``; ``update`` changes any of it)."""

    name: str
    model: str | None = None
    """None: the fleet's ``FLEET_MODEL``."""
    instructions: str
    tools: list[str] = Field(default_factory=list)
    skills: list[str] = Field(default_factory=list)
    sub_agents: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "an agent name is 1 to 63 characters: a lower-case letter, then lower-case "
                "letters, digits, '-' or '_'"
            )
        return value

    @field_validator("instructions")
    @classmethod
    def _instructions(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("instructions must not be empty")
        if len(value.encode()) > 65536:
            raise ValueError("instructions are limited to 65536 bytes")
        return value

    @field_validator("tools", "skills", "sub_agents")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class AgentRow(AgentSpec):
    """An agent as stored: its definition plus identity and version."""

    id: str
    version: int
    created_at: datetime
    updated_at: datetime

    def spec(self) -> AgentSpec:
        return AgentSpec(**self.model_dump(include=set(AgentSpec.model_fields)))


def spec_from(**fields: Any) -> AgentSpec:
    """An :class:`AgentSpec` from user input; a validation failure is one clear sentence."""
    try:
        return AgentSpec(**fields)
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        if errors:
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "agent"
            raise InvalidInput(f"{where}: {first['msg'].removeprefix('Value error, ')}") from exc
        raise InvalidInput(str(exc)) from exc


def _row(record: asyncpg.Record | Mapping[str, Any]) -> AgentRow:
    data = dict(record)
    data["tools"] = list(data.get("tools") or [])
    data["skills"] = list(data.get("skills") or [])
    data["sub_agents"] = list(data.get("sub_agents") or [])
    return AgentRow(**data)


# -- validation ----------------------------------------------------------------------------------


def _cycle(start: str, edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A path start -> ... -> start through ``edges``, if one exists."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for child in edges.get(node, ()):
            if child == start:
                return [*path, start]
            if child not in seen:
                seen.add(child)
                stack.append((child, [*path, child]))
    return None


def validate(
    spec: AgentSpec, existing: Mapping[str, AgentSpec], known_skills: Iterable[str]
) -> None:
    """Refuse a definition that cannot run: unknown tool, skill or sub-agent, or a cycle."""
    unknown_tools = [t for t in spec.tools if t not in CUSTOMER_DATA_TOOLS]
    if unknown_tools:
        raise InvalidInput(
            f"agent {spec.name!r}: unknown tool {unknown_tools[0]!r}; the customer-data tools "
            f"are {', '.join(CUSTOMER_DATA_TOOLS)}"
        )
    skills = set(known_skills)
    unknown_skills = [s for s in spec.skills if s not in skills]
    if unknown_skills:
        raise InvalidInput(
            f"agent {spec.name!r}: unknown skill {unknown_skills[0]!r}; the skills on disk are "
            f"{', '.join(sorted(skills)) or 'none'}"
        )
    if "limits" in spec.metadata:
        from fleet.limits import TurnLimits

        limits = spec.metadata["limits"]
        try:
            if not isinstance(limits, dict):
                raise ValueError("it must be a JSON object")
            TurnLimits().override(limits)
        except ValueError as exc:
            raise InvalidInput(
                f"agent {spec.name!r}: metadata.limits overrides max_model_calls, "
                f"max_tool_calls and token_budget (whole numbers >= 1, budget >= 0): {exc}"
                .splitlines()[0]
            ) from exc
    if spec.name in spec.sub_agents:
        raise InvalidInput(f"agent {spec.name!r} cannot be its own sub-agent")
    missing = [s for s in spec.sub_agents if s not in existing]
    if missing:
        raise InvalidInput(
            f"agent {spec.name!r}: unknown sub-agent {missing[0]!r}; create it first"
        )
    edges = {name: list(other.sub_agents) for name, other in existing.items()}
    edges[spec.name] = list(spec.sub_agents)
    cycle = _cycle(spec.name, edges)
    if cycle:
        raise InvalidInput(
            f"agent {spec.name!r}: sub-agents would form a cycle ({' -> '.join(cycle)})"
        )


# -- reads ---------------------------------------------------------------------------------------


async def find(db: Executor, name: str) -> AgentRow | None:
    record = await db.fetchrow(SQL["agent_get"], name)
    return _row(record) if record else None


async def get(db: Executor, name: str) -> AgentRow:
    row = await find(db, name)
    if row is None:
        raise NotFound(f"no agent named {name!r}")
    return row


async def list_agents(db: Executor) -> list[AgentRow]:
    return [_row(r) for r in await db.fetch(SQL["agents_all"])]


async def load_graph(db: Executor, name: str) -> dict[str, AgentRow]:
    """The agent ``name`` and every agent it can reach, current rows (one statement)."""
    return {row.name: row for row in map(_row, await db.fetch(SQL["agent_graph"], name))}


async def load_versions(db: Executor, graph: Mapping[str, int]) -> dict[str, AgentRow]:
    """The snapshots of the given ``{name: version}`` (what a parked run was built from)."""
    names = list(graph)
    records = await db.fetch(SQL["agent_versions_get"], names, [graph[n] for n in names])
    rows: dict[str, AgentRow] = {}
    for record in records:
        row = AgentRow(**record["spec"])  # jsonb arrives decoded (fleet.database's codec)
        rows[row.name] = row
    return rows


# -- writes --------------------------------------------------------------------------------------


def _params(spec: AgentSpec) -> tuple[Any, ...]:
    return (
        spec.name,
        spec.model,
        spec.instructions,
        spec.tools,
        spec.skills,
        spec.sub_agents,
        spec.metadata,
    )


async def _snapshot(conn: asyncpg.Connection, row: AgentRow) -> None:
    await conn.execute(
        SQL["agent_version_insert"], row.name, row.version, row.model_dump(mode="json")
    )


async def _existing(conn: asyncpg.Connection) -> dict[str, AgentSpec]:
    await conn.execute(SQL["agents_lock"])
    return {row.name: row for row in map(_row, await conn.fetch(SQL["agents_all"]))}


async def _in_transaction(db: Executor, fn: Any) -> Any:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            return await fn(conn)
    async with db.transaction():
        return await fn(db)


async def create(db: Executor, spec: AgentSpec, *, known_skills: Iterable[str]) -> AgentRow:
    """A new agent (version 1); an existing name is an error."""
    skills = list(known_skills)

    async def go(conn: asyncpg.Connection) -> AgentRow:
        existing = await _existing(conn)
        if spec.name in existing:
            raise InvalidInput(f"an agent named {spec.name!r} already exists; use update")
        validate(spec, existing, skills)
        row = _row(await conn.fetchrow(SQL["agent_insert"], *_params(spec)))
        await _snapshot(conn, row)
        return row

    return await _in_transaction(db, go)


async def get_or_create(
    db: Executor, spec: AgentSpec, *, known_skills: Iterable[str]
) -> tuple[AgentRow, bool]:
    """The agent named ``spec.name`` as stored (untouched), or a new one from ``spec``;
    the flag says whether it was created."""
    found = await find(db, spec.name)
    if found is not None:
        return found, False
    skills = list(known_skills)

    async def go(conn: asyncpg.Connection) -> tuple[AgentRow, bool]:
        existing = await _existing(conn)
        if spec.name in existing:  # created meanwhile: the row read under the lock
            return existing[spec.name], False
        validate(spec, existing, skills)
        row = _row(await conn.fetchrow(SQL["agent_insert"], *_params(spec)))
        await _snapshot(conn, row)
        return row, True

    return await _in_transaction(db, go)


async def update(
    db: Executor,
    name: str,
    changes: Mapping[str, Any],
    *,
    known_skills: Iterable[str],
    merge_metadata: Mapping[str, Any] | None = None,
) -> AgentRow:
    """Change some fields of an agent; the version goes up by one. ``changes`` keys are
    :class:`AgentSpec` fields (not ``name``); a None ``model`` means the fleet's model.
    ``merge_metadata`` keys are merged into the stored metadata under the same lock as the
    write, so two concurrent merges both land."""
    bad = set(changes) - (set(AgentSpec.model_fields) - {"name"})
    if bad:
        raise InvalidInput(f"cannot update {', '.join(sorted(bad))} of an agent")
    skills = list(known_skills)

    async def go(conn: asyncpg.Connection) -> AgentRow:
        existing = await _existing(conn)
        current = existing.get(name)
        if current is None:
            raise NotFound(f"no agent named {name!r}")
        fields = {**current.spec().model_dump(), **dict(changes)}
        if merge_metadata:
            fields["metadata"] = {**fields["metadata"], **merge_metadata}
        merged = spec_from(**fields)
        others = {k: v for k, v in existing.items() if k != name}
        others[name] = current
        validate(merged, others, skills)
        row = _row(await conn.fetchrow(SQL["agent_update"], *_params(merged)))
        await _snapshot(conn, row)
        return row

    return await _in_transaction(db, go)


def default_spec(known_skills: Iterable[str]) -> AgentSpec:
    """The ``support`` agent the fleet ships: every customer-data tool, every skill."""
    return AgentSpec(
        name=DEFAULT_AGENT,
        instructions=DEFAULT_INSTRUCTIONS,
        tools=list(CUSTOMER_DATA_TOOLS),
        skills=sorted(known_skills),
        metadata={"created_by": "fleet"},
    )


async def ensure_default(db: Executor, known_skills: Iterable[str]) -> AgentRow:
    """get_or_create the default ``support`` agent (``fleet migrate`` and worker start)."""
    skills = list(known_skills)
    row, _ = await get_or_create(db, default_spec(skills), known_skills=skills)
    return row


__all__ = [
    "ASK_PREFIX",
    "CUSTOMER_DATA_TOOLS",
    "DEFAULT_AGENT",
    "DEFAULT_INSTRUCTIONS",
    "AgentRow",
    "AgentSpec",
    "create",
    "ensure_default",
    "get",
    "get_or_create",
    "list_agents",
    "load_graph",
    "load_versions",
    "update",
    "validate",
]
