"""``fleet demo``: the course's whole story on the embedded default, in one command.

1. the embedded PostgreSQL (or ``DATABASE_URL``), migrated and seeded;
2. ``fleet up`` as a subprocess (the customer-data MCP server and two agent workers) with a
   freshly generated bearer token;
3. the course's scenario messages: the refund complaint that cites a past case (Decision 8),
   the memory check (Decision 3), the handoff note that fires ``summarize-ticket``
   (Decision 4), and a refund that parks for a human (Decision 9), which the demo approves
   through :func:`fleet.approvals.approve`, the same code path as ``fleet approve``;
4. every reply, the refund row, and each session's trace from the audit log;
5. a clean shutdown (SIGTERM, the workers drain).

The model is the offline support policy (a rule-based policy, not an LLM) unless
``FLEET_MODEL``/``OPENAI_API_KEY`` say otherwise.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import typer

from fleet.cli.app import app, run, settings
from fleet.errors import FleetError
from fleet.settings import PROJECT_ROOT

SCENARIO = [
    ("story", "Hi, I'm Sam. I haven't received my refund from order #4429, it's been two weeks."),
    ("story", "What's my name and order number?"),
    ("handoff", "write a handoff note for ticket #4471, refund delayed two weeks, customer Sam."),
    (
        "refund",
        "Supervisor approved the refund for order #4429. Call issue_refund now: 2999 cents, "
        "reason 'arrived damaged'.",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _server_location(url: str) -> str:
    """Where a libpq URL points, for the reader: its host, or a Unix socket's folder."""
    from fleet.database import server_address

    host, _ = server_address(url)
    return f"{host} (Unix socket)" if host.startswith("/") else host


def _step(text: str) -> None:
    typer.secho(f"\n== {text}", bold=True)


def _fleet(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "fleet", *args], env=env, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise FleetError(f"`fleet {' '.join(args)}` failed with exit code {done.returncode}")


@app.command("demo")
def demo_command(
    timeout: float = typer.Option(180.0, "--timeout", min=1, help="Seconds to wait per reply."),
    workers: int = typer.Option(2, "--workers", min=1, help="Worker processes of `fleet up`."),
) -> None:
    """The whole story on the embedded default, start to finish, in one command."""
    from fleet.database import resolve_url_sync

    base = settings()
    env = dict(os.environ)
    _step("database")
    env["DATABASE_URL"] = resolve_url_sync(base)
    typer.echo(f"PostgreSQL at {_server_location(env['DATABASE_URL'])}"
               f"{' (embedded, data in ' + str(base.fleet_home) + ')' if base.embedded else ''}")
    _step("fleet migrate")
    _fleet("migrate", env=env)
    _step("fleet seed")
    _fleet("seed", env=env)

    # A token of our own, and a free port when the configured one is taken.
    env["CUSTOMER_DATA_TOKEN"] = secrets.token_urlsafe(32)
    url = urlparse(base.customer_data_url)
    host, port = url.hostname or "127.0.0.1", url.port or 8765
    if _port_in_use(host, port):
        port = _free_port()
    env["CUSTOMER_DATA_URL"] = f"{url.scheme or 'http'}://{host}:{port}{url.path or '/mcp'}"
    _step(f"fleet up --workers {workers} --handler agent (MCP server on port {port})")
    up = subprocess.Popen(
        [sys.executable, "-m", "fleet", "up", "--workers", str(workers), "--handler", "agent"],
        env=env,
        cwd=PROJECT_ROOT,
        start_new_session=True,
    )
    try:
        run(lambda: _story(env["DATABASE_URL"], timeout, up))
    finally:
        _step("shutting down (SIGTERM: the workers drain, then the MCP server stops)")
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=90)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        typer.echo(f"fleet up exited with {up.returncode}")


async def _story(database_url: str, timeout: float, up: subprocess.Popen[bytes]) -> None:
    from fleet import approvals
    from fleet.cli.trace import load_trace, render
    from fleet.client import Client
    from fleet.database import connect

    suffix = uuid.uuid4().hex[:6]
    sessions = {name: f"demo-{name}-{suffix}" for name, _ in SCENARIO}
    async with Client(database_url) as client:
        conn = await connect(settings(), "fleet-demo", url=database_url)
        try:
            for name, body in SCENARIO:
                session = sessions[name]
                _step(f"[{session}] customer: {body}")
                message_id = await client.enqueue(session, body)
                reply = await _wait(client, message_id, timeout, up)
                if reply.state == "awaiting_approval" and reply.approval_id:
                    detail = await approvals.show_approval(conn, reply.approval_id)
                    typer.echo(
                        f"parked for approval {reply.approval_id}: {detail.tool} "
                        f"{detail.arguments} (requested {detail.requested_at:%H:%M:%S})"
                    )
                    _step(f"approver: fleet approve {reply.approval_id} --by demo-approver")
                    await approvals.approve(
                        conn, reply.approval_id, by="demo-approver", note="fleet demo"
                    )
                    reply = await _wait(client, message_id, timeout, up)
                typer.echo(f"agent ({reply.state}):\n{reply.reply or reply.error}")
            refunds = await conn.fetch(
                "SELECT id::text, order_id, amount_cents, reason, created_at FROM refunds "
                "WHERE conversation_id = $1 ORDER BY created_at",
                sessions["refund"],
            )
            _step("refunds written by this demo")
            for row in refunds:
                typer.echo(
                    f"refund {row['id']}: order #{row['order_id']}, {row['amount_cents']} cents, "
                    f"{row['reason']!r}"
                )
            for session in dict.fromkeys(sessions.values()):
                _step(f"fleet trace {session}")
                render(await load_trace(conn, session))
            if not refunds:  # after the traces, which show why
                raise FleetError(
                    "the story's refund was not issued (see the refund session's trace above); "
                    "on a FLEET_HOME where earlier runs refunded order #4429 in full, start "
                    "from a fresh one (fleet db down, then remove $FLEET_HOME)"
                )
        finally:
            await conn.close()


async def _wait(client: Any, message_id: int, timeout: float, up: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if up.poll() is not None:
            raise FleetError(f"fleet up exited with {up.returncode} during the demo")
        reply = await client.wait_for_reply(message_id, timeout=2.0)
        if reply.finished or reply.state == "awaiting_approval":
            return reply
        if time.monotonic() > deadline:
            raise FleetError(f"no reply to message {message_id} within {timeout:.0f}s")
