"""Queue commands: ``worker``, ``up``, ``enqueue``, ``messages``, ``cancel``, ``prune``,
``status``."""

from __future__ import annotations

import signal
import time
from typing import Any

import typer

from fleet.cli.app import (
    MAX_LIST_LIMIT,
    JsonOption,
    app,
    check_retention_days,
    emit_json,
    emit_table,
    run,
    run_on_connection,
    settings,
    setup_logging,
)
from fleet.errors import InvalidInput
from fleet.handlers import HANDLER_NAMES

HandlerOption = typer.Option("agent", "--handler", help=f"One of: {', '.join(HANDLER_NAMES)}.")
ClaimBatchOption = typer.Option(
    None,
    "--claim-batch",
    min=1,
    help="Messages per claim at most (default: --concurrency). Half of it keeps the next"
    " claim running while the last batch's handlers do.",
)


def _check_handler(name: str) -> str:
    if name not in HANDLER_NAMES:
        raise InvalidInput(f"unknown handler {name!r}; expected one of: {', '.join(HANDLER_NAMES)}")
    return name


@app.command("worker")
def worker_command(
    concurrency: int = typer.Option(10, "--concurrency", min=1, help="Messages in flight at most."),
    claim_batch: int | None = ClaimBatchOption,
    handler: str = HandlerOption,
    work_delay: float = typer.Option(
        0.0, "--work-delay", min=0.0, help="noop handler: seconds per message."
    ),
    poll_only: bool = typer.Option(
        False, "--poll-only", help="No LISTEN (PgBouncer transaction pooling): poll only."
    ),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", min=1, max=65535,
        help="Serve this process's /metrics on this port."
    ),
    drain: bool = typer.Option(False, "--drain", help="Exit once the queue is empty."),
) -> None:
    """Run one worker process until SIGTERM/SIGINT (then drain gracefully)."""
    from fleet.database import resolve_url
    from fleet.handlers import build_handler
    from fleet.worker import Worker

    setup_logging()
    _check_handler(handler)
    cfg = settings()

    async def go() -> None:
        import asyncio

        from fleet import gc_policy

        worker = Worker(
            cfg,
            build_handler(handler, cfg, work_delay=work_delay, poll_only=poll_only),
            concurrency=concurrency,
            claim_batch=claim_batch,
            poll_only=poll_only,
            drain=drain,
            on_ready=lambda: gc_policy.settle(cfg.fleet_gc_young_threshold),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        if metrics_port is not None:
            from fleet.metrics_server import serve_process_metrics

            serve_process_metrics(metrics_port, cfg, await resolve_url(cfg))
        await worker.run()

    run(go)


@app.command("up")
def up_command(
    workers: int = typer.Option(2, "--workers", min=1, help="Worker processes."),
    concurrency: int = typer.Option(10, "--concurrency", min=1, help="In flight per worker."),
    claim_batch: int | None = ClaimBatchOption,
    handler: str = HandlerOption,
    work_delay: float = typer.Option(
        0.0, "--work-delay", min=0.0, help="noop handler: seconds per message."
    ),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", min=1, max=65535, help="One /metrics endpoint for all processes."
    ),
    poll_only: bool = typer.Option(False, "--poll-only", help="Workers poll instead of LISTEN."),
) -> None:
    """Supervise the MCP server and N workers; restart crashed children; SIGTERM drains."""
    from fleet.supervisor import Supervisor

    setup_logging()
    _check_handler(handler)
    code = Supervisor(
        settings(),
        workers=workers,
        concurrency=concurrency,
        claim_batch=claim_batch,
        handler=handler,
        work_delay=work_delay,
        metrics_port=metrics_port,
        poll_only=poll_only,
    ).run()
    raise typer.Exit(code)


def _reply_data(reply: Any) -> dict[str, Any]:
    return reply.model_dump(mode="json")


@app.command("enqueue")
def enqueue_command(
    session: str = typer.Argument(..., help="Conversation id."),
    text: str = typer.Argument(..., help="The customer's message."),
    customer_id: str | None = typer.Option(None, "--customer-id"),
    dedupe_key: str | None = typer.Option(
        None, "--dedupe-key", help="Enqueue at most once per key."
    ),
    agent: str | None = typer.Option(None, "--agent", help="Agent name (default: support)."),
    wait: bool = typer.Option(False, "--wait", help="Wait and print the reply."),
    timeout: float = typer.Option(60.0, "--timeout", min=0.0, help="Seconds to wait."),
    as_json: bool = JsonOption,
) -> None:
    """Enqueue a message; prints its id (with --wait, the reply or the approval it waits on)."""
    from fleet.client import Client

    async def go() -> tuple[int, Any]:
        async with Client(settings=settings()) as client:
            message_id = await client.enqueue(
                session, text, customer_id=customer_id, dedupe_key=dedupe_key, agent=agent
            )
            reply = await client.wait_for_reply(message_id, timeout) if wait else None
            return message_id, reply

    message_id, reply = run(go)
    if reply is None:
        if as_json:
            emit_json({"id": message_id})
        else:
            typer.echo(message_id)
        return
    # One exit code per outcome, whatever the format: 1 dead or cancelled, 4 no reply in time.
    code = {"done": 0, "awaiting_approval": 0, "dead": 1, "cancelled": 1}.get(reply.state, 4)
    if as_json:
        emit_json(_reply_data(reply))
    elif reply.state == "done":
        typer.echo(reply.reply)
    elif reply.state == "awaiting_approval":
        typer.echo(
            f"message {message_id} is waiting for approval {reply.approval_id}: "
            f"decide with 'fleet approve {reply.approval_id} --by NAME' or "
            f"'fleet reject {reply.approval_id} --by NAME --reason TEXT'"
        )
    elif code == 1:
        typer.echo(f"error: message {message_id} is {reply.state}: {reply.error}", err=True)
    else:
        typer.echo(
            f"error: no reply within {timeout:g}s; message {message_id} is {reply.state}", err=True
        )
    if code:
        raise typer.Exit(code)


MESSAGE_COLUMNS = [
    "id",
    "session_id",
    "state",
    "attempts",
    "enqueued_at",
    "claimed_at",
    "finished_at",
    "reply",
    "error",
]


@app.command("messages")
def messages_command(
    session: str | None = typer.Option(None, "--session", help="Only this session."),
    state: str | None = typer.Option(
        None, "--state", help="queued, running, awaiting_approval, done, dead or cancelled."
    ),
    limit: int = typer.Option(50, "--limit", min=1, max=MAX_LIST_LIMIT,
                              help="At most this many, newest first."),
    as_json: bool = JsonOption,
) -> None:
    """List messages, newest first."""
    from fleet.client import Client
    from fleet.queue import validate_state

    validate_state(state)

    async def go() -> list[Any]:
        async with Client(settings=settings()) as client:
            return await client.list_messages(session_id=session, state=state, limit=limit)

    messages = run(go)
    rows = [m.model_dump(mode="json") for m in messages]
    if as_json:
        emit_json(rows)
    else:
        emit_table([m.model_dump() for m in messages], MESSAGE_COLUMNS,
                   labels={"session_id": "session"})


@app.command("cancel")
def cancel_command(
    message_id: int = typer.Argument(..., help="The message to cancel."),
    reason: str | None = typer.Option(
        None, "--reason", help="Kept in the audit trail and the message's error."
    ),
    by: str | None = typer.Option(None, "--by", help="Who cancels (audited)."),
    wait: float = typer.Option(
        0.0, "--wait", min=0.0, help="A running message: seconds to wait for it to stop."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Cancel a message: queued at once; parked: its approval is rejected; running: it stops
    at its next step. Audited in the session's trail."""
    from fleet.client import Client

    async def go() -> Any:
        async with Client(settings=settings()) as client:
            return await client.cancel(message_id, reason=reason, by=by, wait=wait)

    reply = run(go)
    if as_json:
        emit_json(_reply_data(reply))
    elif reply.state == "cancelled":
        typer.echo(f"message {message_id} cancelled")
    elif reply.finished:
        typer.echo(f"message {message_id} finished as {reply.state} before it could stop")
    else:
        typer.echo(
            f"message {message_id} is {reply.state}: asked to stop at its next step "
            f"(see 'fleet messages' or 'fleet trace')"
        )


@app.command("prune")
def prune_command(
    older_than: int = typer.Option(..., "--older-than", metavar="DAYS",
                                   help="Delete messages finished more than DAYS days ago."),
    batch: int = typer.Option(10_000, "--batch", min=1, max=100_000,
                              help="Messages per transaction."),
    as_json: bool = JsonOption,
) -> None:
    """Retention: delete finished messages (done, dead, cancelled) older than DAYS days, a
    batch per transaction. Live messages stay, and so do those an approval refers to. A
    pruned message's dedupe key can be enqueued again. Run it as the schema's owner (the
    role that runs fleet migrate); the audit log has its own: fleet audit prune."""
    check_retention_days(older_than)
    from datetime import timedelta

    from fleet import queue

    pruned = run_on_connection(
        lambda c: queue.prune_finished(c, timedelta(days=older_than), batch=batch), "fleet-prune"
    )
    if as_json:
        emit_json({"pruned": pruned, "older_than_days": older_than})
    else:
        days = "1 day" if older_than == 1 else f"{older_than} days"
        typer.echo(f"pruned {pruned} messages finished more than {days} ago")


async def read_status() -> dict[str, Any]:
    """The same snapshot the metrics endpoint exports (fleet.metrics_server.read_snapshot)."""
    from fleet.database import connect
    from fleet.metrics_server import read_snapshot

    conn = await connect(settings(), "fleet-status")
    try:
        snap = await read_snapshot(conn)
    finally:
        await conn.close()
    return {
        "counts": {state: entry.count for state, entry in snap.states.items()},
        "oldest_queued_age_seconds": snap.oldest_ready_age_seconds,
        "oldest_age_seconds": {
            state: entry.oldest_age_seconds for state, entry in snap.states.items()
        },
        "live_workers": snap.live_workers,
        "awaiting_approvals": snap.approvals_pending,
        "oldest_awaiting_approval_age_seconds": snap.approvals_oldest_pending_age_seconds,
        "approvals_decided": {kind: d.count for kind, d in snap.approvals_decided.items()},
    }


@app.command("status")
def status_command(
    as_json: bool = JsonOption,
    watch: float | None = typer.Option(
        None, "--watch", min=0.2, help="Refresh every N seconds until Ctrl-C."
    ),
) -> None:
    """Counts per state, oldest queued age, live workers, awaiting approvals. With --watch
    and --json: one compact JSON document per line (NDJSON), one line per refresh."""
    while True:
        status = run(read_status)
        if as_json:
            emit_json(status, line=bool(watch))
        else:
            if watch:
                typer.echo("\x1b[2J\x1b[H", nl=False)
            counts = "  ".join(f"{k}={v}" for k, v in status["counts"].items())
            typer.echo(f"messages   {counts}")
            typer.echo(f"oldest queued age   {status['oldest_queued_age_seconds']:.1f}s")
            typer.echo(f"live workers        {len(status['live_workers'])}")
            for w in status["live_workers"]:
                typer.echo(
                    f"  {w['worker_id']}  handler={w['handler']}  concurrency={w['concurrency']}"
                )
            typer.echo(
                f"awaiting approvals  {status['awaiting_approvals']}"
                f"  (oldest {status['oldest_awaiting_approval_age_seconds']:.0f}s)"
            )
        if not watch:
            return
        time.sleep(watch)
