"""System-of-record commands: ``seed``, ``search``, ``reembed`` and ``mcp serve``."""

from __future__ import annotations

import typer

from fleet.cli.app import (
    MAX_LIST_LIMIT,
    JsonOption,
    app,
    emit_json,
    emit_table,
    run,
    settings,
    setup_logging,
)

mcp_app = typer.Typer(help="The customer-data MCP server.", no_args_is_help=True)
app.add_typer(mcp_app, name="mcp")


@app.command("seed")
def seed_command(as_json: bool = JsonOption) -> None:
    """Customers, orders (order #4429 among them), policies and 40+ resolved past cases,
    embedded with the configured model; idempotent (a second run adds nothing)."""
    from fleet.seed import seed

    cfg = settings()
    report = run(lambda: seed(cfg))
    if as_json:
        emit_json(report)
        return
    added = {k: v for k, v in report.added.items() if v}
    typer.echo(f"seeded with {report.model}: " + (
        ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in added.items()) or "nothing new"
    ))
    typer.echo("totals: " + ", ".join(f"{k} {v}" for k, v in report.totals.items()))


@app.command("search")
def search_command(
    text: str = typer.Argument(..., help="What to look for, in plain words."),
    source: str | None = typer.Option(
        None, "--source", help="Only this kind of document: past_case or policy_library."
    ),
    limit: int = typer.Option(5, "--limit", min=1, max=MAX_LIST_LIMIT,
                              help="How many results (at most 50; more is refused)."),
    as_json: bool = JsonOption,
) -> None:
    """Semantic search over the library: nearest first, with cosine distances."""
    from fleet.database import connect
    from fleet.search import search

    cfg = settings()

    async def go():
        conn = await connect(cfg, "fleet-cli", vector=True)
        try:
            return await search(conn, text, cfg, source=source, limit=limit)
        finally:
            await conn.close()

    hits = run(go)
    if as_json:
        emit_json([hit.model_dump(mode="json") for hit in hits])
        return
    emit_table(
        [
            {
                "rank": rank,
                "distance": f"{hit.distance:.3f}",
                "source": hit.source,
                "ref": hit.metadata.get("ticket_id") or hit.metadata.get("slug") or "-",
                "title": hit.title,
                "chunk": hit.chunk_index,
                "text": hit.chunk_text,
            }
            for rank, hit in enumerate(hits, start=1)
        ],
        ["rank", "distance", "source", "ref", "title", "chunk", "text"],
        width=60,
    )


@app.command("reembed")
def reembed_command(
    batch: int = typer.Option(32, "--batch", min=1, help="Documents per transaction."),
    as_json: bool = JsonOption,
) -> None:
    """Re-embed everything with the configured model (FLEET_EMBEDDINGS), rechunking documents;
    resumable: an interrupted run continues where it stopped."""
    from fleet.database import connect
    from fleet.embeddings.store import reembed

    cfg = settings()

    def say(message: str) -> None:
        if not as_json:
            typer.echo(message, err=True)

    async def go():
        conn = await connect(cfg, "fleet-reembed", vector=True)
        try:
            return await reembed(conn, cfg, batch=batch, progress=say)
        finally:
            await conn.close()

    report = run(go)
    if as_json:
        emit_json(report)
    else:
        typer.echo(
            f"all embeddings now use {report.model} ({report.dimensions} dims): "
            f"{report.documents} documents ({report.chunks} chunks) and "
            f"{report.conversation_chunks} conversation chunks re-embedded"
        )


@mcp_app.command("serve")
def mcp_serve_command(
    host: str | None = typer.Option(
        None, "--host", help="Interface to listen on (default: the host of CUSTOMER_DATA_URL)."
    ),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port (default: the port of CUSTOMER_DATA_URL)."
    ),
) -> None:
    """Run the customer-data MCP server (streamable HTTP, stateless, bearer token required)."""
    from mcp_customer_data import serve

    setup_logging()
    serve(settings(), host=host, port=port)
