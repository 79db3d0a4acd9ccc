"""The five operations behind the tools, on an asyncpg pool; no MCP in here.

Every refusal is a :class:`~fleet.errors.FleetError` (``InvalidInput``/``NotFound``) whose one
sentence says what is wrong and that nothing was written; the server turns it into a tool error
the model can read and act on. Inputs are checked before any statement runs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from fleet.embeddings import ModelSpec, aembed_query
from fleet.embeddings.store import SQL as LIBRARY_SQL
from fleet.errors import FleetError, InvalidInput, NotFound
from fleet.search import EF_SEARCH, ensure_model
from fleet.settings import Settings
from fleet.sql import load
from mcp_customer_data.models import (
    CustomerInfo,
    CustomerWithOrders,
    OrderInfo,
    OrderSummary,
    RefundIssued,
    RefundRecord,
    SimilarTicket,
    SimilarTickets,
)

log = logging.getLogger(__name__)

SQL = load(Path(__file__).with_name("queries.sql"))
SEARCH_SETTINGS = LIBRARY_SQL["search_settings"]

#: find_similar_resolved_tickets returns at most this many cases, whatever the model asks for:
#: every result is tokens in the next model turn.
MAX_SIMILAR = 10
#: Longest description embedded (longer text is cut; the model reads ~256 word pieces anyway).
MAX_DESCRIPTION_CHARS = 4000
MAX_REASON_CHARS = 500
RECENT_ORDERS = 5

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class RefundFailed(FleetError):
    """The refund transaction failed for a reason other than a refusal; nothing was written."""


@dataclass(frozen=True)
class CallMeta:
    """What the worker's MCP client sends in the request ``_meta`` (never model-controlled)."""

    idempotency_key: str | None = None
    session_id: str | None = None
    message_id: int | None = None
    traceparent: str | None = None
    #: Run variables from ``fleet.enqueue(variables => ...)`` (tenant, user): the caller's,
    #: never the model's. Written into this server's audit rows.
    variables: dict[str, Any] | None = None

    @property
    def on_behalf_of_a_conversation(self) -> bool:
        """A worker's call for a turn (it names the session or carries run variables)."""
        return self.session_id is not None or bool(self.variables)

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> CallMeta:
        meta = meta or {}
        key = meta.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not key.strip() or len(key) > 200):
            raise InvalidInput("_meta.idempotency_key must be a non-empty string of at most 200 "
                               "characters; nothing was refunded")
        session = meta.get("session_id")
        message = meta.get("message_id")
        trace = meta.get("traceparent")
        variables = meta.get("variables")
        return cls(
            variables=variables if isinstance(variables, dict) and variables else None,
            idempotency_key=key,
            session_id=session if isinstance(session, str) and session else None,
            message_id=message if isinstance(message, int) and not isinstance(message, bool)
            else None,
            traceparent=trace if isinstance(trace, str) else None,
        )


def _shown(value: object, limit: int = 60) -> str:
    """A bad input as it appears in an error message: quoted, and cut short, so a 100 KB
    argument does not come back as a 100 KB error (into the model's context and the audit)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def _order_id(value: str) -> str:
    text = value.strip().lstrip("#").strip() if isinstance(value, str) else ""
    if not _ID.match(text):
        raise InvalidInput(f"order_id {_shown(value)} is not an order number (like '4429')")
    return text


def _customer_id(value: str) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not _ID.match(text):
        raise InvalidInput(f"customer_id {_shown(value)} is not a customer id (like 'cus-1001')")
    return text


def _read_audit(tool: str, arguments: dict[str, Any], meta: CallMeta | None
                ) -> dict[str, Any] | None:
    """The payload of a read's ``customer_data_read`` audit row: the tool, its arguments and the
    run variables the worker sent (tenant, user), for that conversation's trail. None for a call
    that names no conversation (an operator's own client): not audited here."""
    if meta is None or not meta.on_behalf_of_a_conversation:
        return None
    return {
        "tool": tool,
        "arguments": arguments,
        "session_id": meta.session_id,
        "message_id": meta.message_id,
        "variables": meta.variables or {},
        "traceparent": meta.traceparent,
    }


async def _audited_read(
    pool: asyncpg.Pool, statement: str, args: tuple[Any, ...], tool: str,
    arguments: dict[str, Any], meta: CallMeta | None,
) -> asyncpg.Record | None:
    """Run one of the reads of queries.sql: the record and its audit row in one statement (the
    statement's last two parameters: the conversation, the audit payload). A failure to write
    the audit row fails the read."""
    payload = _read_audit(tool, arguments, meta)
    conversation = meta.session_id if payload is not None and meta is not None else None
    try:
        return await pool.fetchrow(SQL[statement], *args, conversation, payload)
    except asyncpg.ForeignKeyViolationError:
        # The named conversation does not exist (not a worker's call): keep the row anyway.
        return await pool.fetchrow(SQL[statement], *args, None, payload)


_CUSTOMER = ("email", "name", "tier", "open_ticket_count")


async def lookup_customer(
    pool: asyncpg.Pool, customer_id: str, meta: CallMeta | None = None
) -> CustomerInfo:
    customer_id = _customer_id(customer_id)
    row = await _audited_read(pool, "customer_by_id", (customer_id,), "lookup_customer",
                              {"customer_id": customer_id}, meta)
    if row is None:
        raise NotFound(f"no customer has id {customer_id!r}")
    return CustomerInfo(customer_id=row["id"], **{k: row[k] for k in _CUSTOMER})


async def find_customer_by_email(
    pool: asyncpg.Pool, email: str, meta: CallMeta | None = None
) -> CustomerWithOrders:
    address = email.strip().lower() if isinstance(email, str) else ""
    if not _EMAIL.match(address):
        raise InvalidInput(f"{_shown(email)} is not an email address")
    row = await _audited_read(pool, "customer_by_email", (address, RECENT_ORDERS),
                              "find_customer_by_email", {"email": address}, meta)
    if row is None:
        raise NotFound(f"no customer has the email address {address}")
    return CustomerWithOrders(
        customer_id=row["id"],
        **{k: row[k] for k in _CUSTOMER},
        recent_orders=[OrderSummary(**dict(zip(OrderSummary.model_fields, order, strict=True)))
                       for order in row["recent_orders"]],
    )


async def lookup_order(
    pool: asyncpg.Pool, order_id: str, meta: CallMeta | None = None
) -> OrderInfo:
    order_id = _order_id(order_id)
    row = await _audited_read(pool, "order_by_id", (order_id,), "lookup_order",
                              {"order_id": order_id}, meta)
    if row is None:
        raise NotFound(f"no order has id {order_id!r}")
    return OrderInfo(
        **{k: v for k, v in row.items() if k != "refunds"},
        refundable_cents=row["amount_cents"] - row["refunded_cents"],
        refunds=[RefundRecord(**dict(zip(RefundRecord.model_fields, refund, strict=True)))
                 for refund in row["refunds"]],
    )


async def find_similar_resolved_tickets(
    pool: asyncpg.Pool, spec: ModelSpec, description: str, limit: int, settings: Settings
) -> SimilarTickets:
    text = description.strip() if isinstance(description, str) else ""
    if not text:
        raise InvalidInput("description is empty: describe the customer's problem in a sentence")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInput("limit must be a positive integer")
    limit = min(limit, MAX_SIMILAR)
    # The model first, with no connection held: under load a query waits for the batch ahead
    # of it, and the server's small pool is for the queries, not for waiting on the CPU.
    vector = await aembed_query(text[:MAX_DESCRIPTION_CHARS], settings)
    async with pool.acquire() as conn:
        await ensure_model(conn, spec)
        async with conn.transaction():
            await conn.execute(SEARCH_SETTINGS, str(max(EF_SEARCH, 3 * limit)))
            rows = await conn.fetch(SQL["similar_resolved_tickets"], vector, 3 * limit, limit)
    return SimilarTickets(
        matches=[SimilarTicket(**dict(r)) for r in rows], limit_applied=limit, model=spec.name
    )


def _check_refund(order_id: str, amount_cents: int, reason: str) -> tuple[str, int, str]:
    order_id = _order_id(order_id)
    if isinstance(amount_cents, bool) or not isinstance(amount_cents, int) or amount_cents <= 0:
        raise InvalidInput(
            f"amount_cents must be a positive integer number of cents (1250 = $12.50), got "
            f"{amount_cents!r}; nothing was refunded"
        )
    text = reason.strip() if isinstance(reason, str) else ""
    if not text:
        raise InvalidInput("reason is empty: say in plain words why the customer is refunded; "
                           "nothing was refunded")
    if len(text) > MAX_REASON_CHARS:
        raise InvalidInput(f"reason is longer than {MAX_REASON_CHARS} characters; "
                           "nothing was refunded")
    return order_id, amount_cents, text


def _status_after(amount: int, refunded: int, current: str) -> str:
    if refunded >= amount:
        return "refunded"
    return "partially_refunded" if refunded > 0 else current


async def issue_refund(
    pool: asyncpg.Pool, order_id: str, amount_cents: int, reason: str, meta: CallMeta
) -> RefundIssued:
    """Refund, order status and ``refund_issued`` audit row in ONE transaction.

    With an idempotency key, a repeat (sequential or concurrent) returns the first refund and
    writes nothing: the order row lock serialises calls on one order, and the key is looked up
    after the lock is taken, so the second caller sees the first one's committed refund.
    """
    order_id, amount_cents, reason = _check_refund(order_id, amount_cents, reason)
    key = meta.idempotency_key
    try:
        async with pool.acquire() as conn, conn.transaction():
            order = await conn.fetchrow(SQL["lock_order"], order_id)
            if order is None:
                raise NotFound(f"no order has id {order_id!r}; nothing was refunded")
            paid = order["amount_cents"]
            refunded = await conn.fetchval(SQL["refunded_so_far"], order_id)
            if key is not None:
                first = await conn.fetchrow(SQL["refund_by_key"], key)
                if first is not None:
                    return _replay(first, order_id, amount_cents, paid, refunded, order["status"])
            remaining = paid - refunded
            if amount_cents > remaining:
                raise InvalidInput(
                    f"amount_cents {amount_cents} is more than the {remaining} cents still "
                    f"refundable on order {order_id} (paid {paid}, already refunded {refunded}); "
                    "nothing was refunded"
                )
            refund = await conn.fetchrow(
                SQL["insert_refund"], order_id, amount_cents, reason, key, meta.session_id
            )
            if refund is None:  # the key was taken by a refund on another order meanwhile
                raise InvalidInput(
                    "this idempotency key was already used for a refund on another order; "
                    "nothing was refunded"
                )
            refunded += amount_cents
            status = _status_after(paid, refunded, order["status"])
            await conn.execute(SQL["set_order_status"], order_id, status)
            result = RefundIssued(
                **dict(refund), order_status=status, refunded_cents=refunded,
                refundable_cents=paid - refunded, replayed=False,
            )
            await conn.execute(
                SQL["insert_refund_audit"],
                meta.session_id,
                f"refunds:{refund['refund_id']}",
                {
                    "order_id": order_id,
                    "amount_cents": amount_cents,
                    "reason": reason,
                    "idempotency_key": key,
                    "session_id": meta.session_id,
                    "message_id": meta.message_id,
                    "traceparent": meta.traceparent,
                    "variables": meta.variables or {},
                },
                {
                    "refund_id": str(refund["refund_id"]),
                    "order_status": status,
                    "refunded_cents": refunded,
                    "refundable_cents": paid - refunded,
                },
            )
            return result
    except asyncpg.ForeignKeyViolationError as exc:
        raise RefundFailed(
            f"the conversation {meta.session_id!r} named in _meta.session_id has no "
            "conversations row (the worker writes it when the message is received); the "
            "transaction was rolled back and nothing was refunded"
        ) from exc
    except asyncpg.PostgresError as exc:
        log.error("issue_refund on order %s rolled back: %s (%s)", order_id, type(exc).__name__,
                  exc.sqlstate)
        raise RefundFailed(
            f"the refund on order {order_id} could not be recorded (database error "
            f"{exc.sqlstate}); the transaction was rolled back and nothing was refunded, so "
            "retrying is safe"
        ) from exc


def _replay(
    first: asyncpg.Record, order_id: str, amount_cents: int, paid: int, refunded: int,
    status: str,
) -> RefundIssued:
    if first["order_id"] != order_id or first["amount_cents"] != amount_cents:
        raise InvalidInput(
            f"this idempotency key already issued a refund of {first['amount_cents']} cents on "
            f"order {first['order_id']}; a different refund needs a new tool call"
        )
    return RefundIssued(
        **dict(first), order_status=status, refunded_cents=refunded,
        refundable_cents=paid - refunded, replayed=True,
    )
