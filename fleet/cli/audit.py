"""``fleet audit prune``: the one way audit rows leave the database (retention).

``audit_log`` is append-only in the database itself (migration 0005: a trigger refuses UPDATE,
DELETE and TRUNCATE for every role, the owner included). Retention is the maintenance function
``fleet.prune_audit_log(older_than interval)``, which lifts that guard for its own DELETE only.
Run it as the role that owns the schema (the one that runs ``fleet migrate``); the application
roles have no EXECUTE on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from fleet.cli.app import JsonOption, app, check_retention_days, emit_json, run_on_connection

if TYPE_CHECKING:
    import asyncpg

audit_app = typer.Typer(name="audit", help="Audit-log maintenance (retention).",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")

#: The statement behind the command (the function is defined in migrations/0005_roles.sql).
PRUNE = "SELECT fleet.prune_audit_log(make_interval(days => $1))"


@audit_app.command("prune")
def prune_command(
    older_than: int = typer.Option(..., "--older-than", metavar="DAYS",
                                   help="Delete audit rows older than DAYS days (at least 1)."),
    as_json: bool = JsonOption,
) -> None:
    """Delete audit rows older than DAYS days; prints how many were deleted."""
    check_retention_days(older_than)

    async def prune(conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval(PRUNE, older_than))

    pruned = run_on_connection(prune, "fleet-audit")
    if as_json:
        emit_json({"pruned": pruned, "older_than_days": older_than})
    else:
        typer.echo(f"pruned {pruned} audit rows older than {older_than} days")
