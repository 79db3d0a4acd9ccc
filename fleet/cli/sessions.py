"""``fleet sessions list``: conversations and their metadata (set at first enqueue)."""

from __future__ import annotations

import json
from typing import Any

import typer

from fleet.cli.app import MAX_LIST_LIMIT, JsonOption, app, emit_json, emit_table, run, settings
from fleet.errors import InvalidInput

sessions_app = typer.Typer(help="Sessions (conversations) and their metadata.",
                           no_args_is_help=True)
app.add_typer(sessions_app, name="sessions")


def parse_where(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` filters as a JSON containment object; VALUE is JSON when it parses
    (``tier=3``, ``vip=true``) and a string otherwise."""
    where: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--where expects KEY=VALUE, got {pair!r}")
        try:
            where[key] = json.loads(value)
        except json.JSONDecodeError:
            where[key] = value
    return where


@sessions_app.command("list")
def sessions_list(
    where: list[str] = typer.Option([], "--where", help="KEY=VALUE metadata filter; repeatable."),
    limit: int = typer.Option(50, "--limit", min=1, max=MAX_LIST_LIMIT),
    as_json: bool = JsonOption,
) -> None:
    """Sessions, newest first, filtered by metadata."""
    from fleet.database import connect
    from fleet.sql import queries

    filters = parse_where(where)

    async def go() -> list[dict[str, Any]]:
        conn = await connect(settings(), "fleet-cli")
        try:
            rows = await conn.fetch(queries("queries.sql")["list_sessions"], filters, limit)
            return [dict(r) for r in rows]
        finally:
            await conn.close()

    rows = run(go)
    if as_json:
        emit_json(rows)
    else:
        emit_table(rows, ["session_id", "metadata", "messages", "created_at", "last_message_at"],
                   width=60)
