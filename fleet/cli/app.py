"""The typer application and the helpers every command module shares."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from pydantic import BaseModel

from fleet.errors import InvalidInput
from fleet.settings import Settings, get_settings

if TYPE_CHECKING:
    import asyncpg

app = typer.Typer(
    name="fleet",
    help="pgfleet: AI customer-support workers on PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

JsonOption = typer.Option(False, "--json", help="Print one JSON document on stdout.")
#: The most rows a listing prints (a bigger --limit is refused by the option parser, not
#: passed on to PostgreSQL as a number it cannot hold).
MAX_LIST_LIMIT = 100_000
#: The longest retention a prune command takes (a hundred years), a guard against a typo
MAX_RETENTION_DAYS = 36_500


def settings() -> Settings:
    return get_settings()


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or settings().fleet_log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a fresh event loop (uvloop when available)."""
    try:
        import uvloop

        return uvloop.run(factory())
    except ImportError:  # pragma: no cover
        return asyncio.run(factory())


def run_on_connection(
    action: Callable[[asyncpg.Connection], Awaitable[T]], application_name: str = "fleet-cli"
) -> T:
    """Run ``action`` on one database connection, opened for it and closed after (commands
    that make a few reads or one write; a worker or client keeps a pool instead)."""
    from fleet.database import connect

    async def go() -> T:
        conn = await connect(settings(), application_name)
        try:
            return await action(conn)
        finally:
            await conn.close()

    return run(go)


def check_retention_days(days: int) -> None:
    """``--older-than DAYS`` of the prune commands (messages, audit log): 1 to 36500."""
    if not 1 <= days <= MAX_RETENTION_DAYS:
        raise InvalidInput(f"--older-than must be between 1 and {MAX_RETENTION_DAYS} days")


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def emit_json(data: Any, *, line: bool = False) -> None:
    """One JSON document on stdout; ``line``: compact, on one line (NDJSON, for --watch)."""
    typer.echo(json.dumps(_plain(data), default=str, indent=None if line else 2))


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, datetime):
        text = value.strftime("%Y-%m-%d %H:%M:%S")
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def emit_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    width: int = 40,
    labels: Mapping[str, str] | None = None,
) -> None:
    """A plain aligned table; cells are cut at ``width`` characters. ``labels`` heads a column
    otherwise than its field (``session_id`` as ``session``, the contract's word)."""
    if not rows:
        typer.echo("(none)")
        return
    heads = [(labels or {}).get(c, c) for c in columns]
    cells = [[_cell(row.get(c), width) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(heads)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)))
    for r in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
