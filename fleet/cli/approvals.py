"""Approver commands: ``fleet approvals list|show``, ``fleet approve``, ``fleet reject``.

They run in any process, on any machine that reaches the database: the decision is a row
update (compare-and-set) plus a NOTIFY, and whichever worker claims the message resumes it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import typer

from fleet.cli.app import (
    MAX_LIST_LIMIT,
    JsonOption,
    app,
    emit_json,
    emit_table,
    run_on_connection,
)

approvals_app = typer.Typer(
    name="approvals",
    help="Parked runs waiting for a human (decide with 'fleet approve' / 'fleet reject').",
    no_args_is_help=True,
)
app.add_typer(approvals_app, name="approvals")

LIST_COLUMNS = [
    "id",
    "session_id",
    "tool",
    "arguments",
    "status",
    "requested_at",
    "expires_at",
    "decision",
    "decided_by",
]

#: application_name of the commands' connections (pg_stat_activity)
APPLICATION = "fleet-approvals"


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = (moment - datetime.now(UTC)).total_seconds()
    span = abs(int(seconds))
    hours, rest = divmod(span, 3600)
    text = f"{hours}h {rest // 60}m" if hours else f"{rest // 60}m {rest % 60}s"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


@approvals_app.command("list")
def list_command(
    status: str = typer.Option(
        "awaiting", "--status", help="awaiting, approved, rejected, resumed, or all."
    ),
    limit: int = typer.Option(50, "--limit", min=1, max=MAX_LIST_LIMIT,
                              help="At most this many, newest first."),
    as_json: bool = JsonOption,
) -> None:
    """Parked runs: id, session, tool, arguments, requested_at, expires_at, status."""
    from fleet import approvals

    wanted = None if status == "all" else approvals.validate_status(status)
    found = run_on_connection(
        lambda c: approvals.list_approvals(c, status=wanted, limit=limit), APPLICATION
    )
    if as_json:
        emit_json([a.model_dump(mode="json") for a in found])
        return
    emit_table([a.model_dump() for a in found], LIST_COLUMNS, width=48,
               labels={"session_id": "session"})


@approvals_app.command("show")
def show_command(
    approval_id: str = typer.Argument(..., help="The approval id (from 'fleet approvals list')."),
    as_json: bool = JsonOption,
) -> None:
    """One parked run with the facts to decide on: order, amount, reason, customer, tier."""
    from fleet import approvals

    detail = run_on_connection(lambda c: approvals.show_approval(c, approval_id), APPLICATION)
    if as_json:
        emit_json(detail.model_dump(mode="json"))
        return
    _print_detail(detail)


def _print_detail(detail: Any) -> None:
    from fleet.approvals import money

    state = detail.status + (" (expired)" if detail.expired else "")
    line = typer.echo
    line(f"approval    {detail.id}")
    line(f"status      {state}")
    line(f"session     {detail.session_id}   message {detail.message_id}")
    if detail.message_body:
        line(f"customer said  {detail.message_body!r}")
    line(f"requested   {detail.requested_at:%Y-%m-%d %H:%M:%S %Z}")
    line(f"expires     {detail.expires_at:%Y-%m-%d %H:%M:%S %Z} ({_ago(detail.expires_at)})")
    for item in detail.interruptions:
        line(f"tool call   {item.tool}({_args(item.arguments)})  call {item.call_id}")
    for refund in detail.refunds:
        line(
            f"refund      {money(refund.amount_cents)} on order #{refund.order_id}: "
            f"{refund.reason!r}"
        )
        if not refund.order_found:
            line("  order     NOT FOUND in orders")
            continue
        line(
            f"  order     #{refund.order_id}  {money(refund.order_amount_cents)}  "
            f"status {refund.order_status}  already refunded "
            f"{money(refund.already_refunded_cents)}"
        )
        line(
            f"  customer  {refund.customer_name} <{refund.customer_email}> "
            f"({refund.customer_id})  tier {refund.customer_tier or '-'}"
        )
    if detail.decided_at is not None:
        line(
            f"decided     {detail.decision} by {detail.decided_by} at "
            f"{detail.decided_at:%Y-%m-%d %H:%M:%S %Z}"
            + (f": {detail.decision_note}" if detail.decision_note else "")
        )
    if detail.resumed_at is not None:
        line(f"resumed     {detail.resumed_at:%Y-%m-%d %H:%M:%S %Z}")
    if detail.status == "awaiting" and not detail.expired:
        line(f"decide:     fleet approve {detail.id} --by NAME [--note TEXT]")
        line(f"            fleet reject {detail.id} --by NAME --reason TEXT")


def _args(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items())


def _decide(
    approval_id: str, approve: bool, by: str | None, note: str | None, as_json: bool
) -> None:
    """Options are validated by :func:`fleet.approvals.decide` (one clear sentence each), not
    by click, so a missing ``--by`` reads like every other refusal."""
    from fleet import approvals

    decided = run_on_connection(
        lambda c: approvals.decide(c, approval_id, approve=approve, by=by or "", note=note),
        APPLICATION,
    )
    if as_json:
        emit_json(decided.model_dump(mode="json"))
        return
    typer.echo(
        f"{decided.status} {decided.id} by {decided.decided_by}; message {decided.message_id} "
        "resumes in whichever worker claims it next"
    )


@app.command("approve")
def approve_command(
    approval_id: str = typer.Argument(..., help="The approval id."),
    by: str | None = typer.Option(
        None, "--by", help="Required: who approves (recorded in the audit trail)."
    ),
    note: str | None = typer.Option(None, "--note", help="Why, for the record."),
    as_json: bool = JsonOption,
) -> None:
    """Approve a parked run; it resumes in whichever worker claims it. Deciding twice fails."""
    _decide(approval_id, True, by, note, as_json)


@app.command("reject")
def reject_command(
    approval_id: str = typer.Argument(..., help="The approval id."),
    by: str | None = typer.Option(
        None, "--by", help="Required: who rejects (recorded in the audit trail)."
    ),
    reason: str | None = typer.Option(
        None, "--reason", help="Required: why; the model tells the customer."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Reject a parked run: no refund; the customer is told why. Deciding twice fails."""
    _decide(approval_id, False, by, reason, as_json)
