"""``fleet trace SESSION``: replay a conversation from the audit trail, without the model.

Course Decision 8, step 2: given a conversation, reconstruct line by line what the worker did
and why from ``audit_log`` alone (plus ``run_states`` for parked refunds: who decided, when,
why). Nothing is re-run: the rows are the record. ``--json`` prints the session's conversation
row, its audit rows, its parked runs (never their serialized state) and its messages with the
replies.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import typer

from fleet.cli.app import JsonOption, app, emit_json, emit_table, run, settings
from fleet.errors import NotFound
from fleet.sql import queries

#: How deep `fleet trace` follows delegations into child sessions (FLEET_MAX_DELEGATION_DEPTH: 3).
MAX_NESTED_TRACES = 8
SQL = queries("agent_runtime.sql")


async def load_trace(conn: Any, session_id: str, _depth: int = 0) -> dict[str, Any]:
    """Everything ``fleet trace`` shows for one session, and (under ``delegations``) the trace
    of every child session its turns delegated to, recursively."""
    conversation = await conn.fetchrow(SQL["trace_conversation"], session_id)
    audit = [dict(r) for r in await conn.fetch(SQL["trace_audit"], session_id)]
    run_states = [dict(r) for r in await conn.fetch(SQL["trace_run_states"], session_id)]
    messages = [dict(r) for r in await conn.fetch(SQL["trace_messages"], session_id)]
    if conversation is None and not audit and not messages:
        raise NotFound(f"no session {session_id!r}: no conversation, audit rows or messages")
    delegations: list[dict[str, Any]] = []
    children = dict.fromkeys(
        (r.get("payload") or {}).get("child_session")
        for r in audit if r["action"] == "delegated"
    )
    for child in children:
        if child and _depth < MAX_NESTED_TRACES:
            try:
                delegations.append(await load_trace(conn, child, _depth + 1))
            except NotFound:  # pragma: no cover - enqueued, but not yet seen by a worker
                continue
    return {
        "session_id": session_id,
        "conversation": dict(conversation) if conversation else None,
        "audit": audit,
        "run_states": run_states,
        "messages": messages,
        "delegations": delegations,
    }


def _short(value: Any, width: int = 70) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"


def _payload_summary(row: dict[str, Any]) -> str:
    payload = row.get("payload") or {}
    action = row["action"]
    if action in ("capability_invoked", "skill_activated"):
        return _short(payload.get("arguments"))
    if action in ("message_received", "message_sent"):
        return _short(payload.get("excerpt") or payload)
    return _short(payload)


def _result_summary(row: dict[str, Any]) -> str:
    result = row.get("result")
    if isinstance(result, dict) and "status" in result:
        rest = {k: v for k, v in result.items() if k not in ("status",)}
        latency = rest.pop("latency_ms", None)
        head = result["status"] + (f" {latency}ms" if latency is not None else "")
        output = rest.get("output")
        return head + (f" {_short(output, 50)}" if output is not None else "")
    return _short(result)


@app.command("trace")
def trace_command(
    session: str = typer.Argument(..., help="The session (conversation) id."),
    as_json: bool = JsonOption,
) -> None:
    """A session's audit trail in order: created_at, action, target, payload, result."""
    from fleet.database import connect

    async def go() -> dict[str, Any]:
        conn = await connect(settings(), "fleet-cli")
        try:
            return await load_trace(conn, session)
        finally:
            await conn.close()

    data = run(go)
    if as_json:
        emit_json(data)
        return
    render(data)


def _stamps(audit: list[dict[str, Any]]) -> list[str]:
    """Each row's time to the millisecond, with the date on the first row and wherever the
    date changes (a run parked overnight and approved the next day reads as such)."""
    stamps: list[str] = []
    day: date | None = None
    for row in audit:
        at = row["created_at"]
        shown = at.strftime("%H:%M:%S.%f")[:-3]
        stamps.append(shown if at.date() == day else f"{at:%Y-%m-%d} {shown}")
        day = at.date()
    return stamps


def render(data: dict[str, Any]) -> None:
    """The trace as tables (``fleet trace`` and ``fleet demo``)."""
    rows = [
        {
            "created_at": stamp,
            "action": r["action"],
            "target": r["target"],
            "payload": _payload_summary(r),
            "result": _result_summary(r),
        }
        for stamp, r in zip(_stamps(data["audit"]), data["audit"], strict=True)
    ]
    typer.echo(f"session {data['session_id']}: {len(rows)} audit rows")
    emit_table(rows, ["created_at", "action", "target", "payload", "result"], width=70)
    if data["run_states"]:
        typer.echo("\nparked runs:")
        emit_table(
            [
                {
                    **r,
                    "arguments": _short(r["arguments"], 60),
                    "decided": (f"{r['decision']} by {r['decided_by']} "
                                f"{_short(r['decision_note'], 40)}" if r["decision"] else "-"),
                }
                for r in data["run_states"]
            ],
            ["id", "tool", "arguments", "status", "requested_at", "decided", "resumed_at"],
            width=60,
        )
    conversation = data["conversation"]
    if conversation and conversation.get("summary"):
        typer.echo(f"\nsummary: {conversation['summary']}")
    for child in data.get("delegations", []):
        typer.echo(f"\ndelegated turn(s) of session {data['session_id']}:")
        render(child)
