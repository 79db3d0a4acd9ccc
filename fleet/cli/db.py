"""``fleet db ...`` (the embedded PostgreSQL) and ``fleet migrate``."""

from __future__ import annotations

import typer

from fleet.cli.app import JsonOption, app, emit_json, run, settings
from fleet.errors import ConfigurationError

db_app = typer.Typer(
    help="The embedded PostgreSQL (used when DATABASE_URL is unset).", no_args_is_help=True
)
app.add_typer(db_app, name="db")


def _embedded():
    from fleet.embedded import EmbeddedServer

    if not settings().embedded:
        raise ConfigurationError(
            "DATABASE_URL is set, so the embedded database is not in use; unset it to manage "
            "the embedded server"
        )
    return EmbeddedServer(settings())


@db_app.command("up")
def db_up(as_json: bool = JsonOption) -> None:
    """Start the embedded server (initialising it the first time); prints its URL."""
    server = _embedded()
    url = server.ensure_running()
    if as_json:
        emit_json({"running": True, "url": url, "pgdata": str(server.pgdata)})
    else:
        typer.echo(url)


@db_app.command("down")
def db_down(as_json: bool = JsonOption) -> None:
    """Stop the embedded server; its data stays in $FLEET_HOME/pgdata."""
    stopped = _embedded().stop()
    if as_json:
        emit_json({"stopped": stopped})
    else:
        typer.echo("stopped" if stopped else "not running")


@db_app.command("status")
def db_status(as_json: bool = JsonOption) -> None:
    """Whether the embedded server runs, where its data lives, its port and URL."""
    status = _embedded().status()
    data = {
        "running": status.running,
        "pgdata": str(status.pgdata),
        "port": status.port,
        "pid": status.pid,
        "url": status.url,
    }
    if as_json:
        emit_json(data)
    else:
        for key, value in data.items():
            typer.echo(f"{key:8} {value if value is not None else '-'}")
    if not status.running:
        raise typer.Exit(1)


@db_app.command("url")
def db_url() -> None:
    """Print a libpq URL usable by psql (starts the embedded server if needed)."""
    from fleet.database import resolve_url_sync

    typer.echo(resolve_url_sync(settings()))


@app.command("migrate")
def migrate_command(as_json: bool = JsonOption) -> None:
    """Apply migrations/ in order; idempotent and safe when many processes run it at once."""
    from fleet.database import connect
    from fleet.migrate import migrate

    async def go() -> list[str]:
        conn = await connect(settings(), "fleet-migrate")
        try:
            return await migrate(conn, settings())
        finally:
            await conn.close()

    applied = run(go)
    if as_json:
        emit_json({"applied": applied})
    elif applied:
        typer.echo(f"applied: {', '.join(applied)}")
    else:
        typer.echo("up to date")
