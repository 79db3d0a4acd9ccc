"""The ``customer-data`` MCP server: five narrow tools over the system of record.

Why a server and not function tools in the worker (course Concept 14): scope (the agent can
do exactly these five things to the database, and no tool takes SQL), isolation (its own
process and its own connection pool the agent cannot exhaust) and reuse (any worker, or a
person's coding agent, talks to the same server).

* Transport: streamable HTTP, stateless, JSON responses: every call is an independent POST,
  so copies of the server can run side by side behind one URL.
* Auth: a bearer token (``CUSTOMER_DATA_TOKEN``) on every request, compared in constant time;
  a missing or wrong token is answered 401 by the middleware before any tool code runs.
* Lifespan: one asyncpg pool (``statement_cache_size`` from the settings, 0 behind PgBouncer)
  and the embedding model, loaded before the port opens, so the first search is not a
  ten-second model load inside a client's 5-second timeout.
* ``issue_refund`` is the only write; the worker puts a human approval in front of it. It is
  idempotent on the ``idempotency_key`` the worker's client sends in the request ``_meta``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlparse

import asyncpg
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field, StrictInt
from starlette.applications import Starlette

from fleet import gc_policy, tracing
from fleet.database import close_pool, create_pool
from fleet.embeddings import ModelSpec, aembed, model_spec, prepare_for_queries
from fleet.errors import ConfigurationError, FleetError
from fleet.settings import Settings
from mcp_customer_data import data
from mcp_customer_data.limits import RateLimitMiddleware
from mcp_customer_data.models import (
    CustomerInfo,
    CustomerWithOrders,
    OrderInfo,
    RefundIssued,
    SimilarTickets,
)

log = logging.getLogger(__name__)

#: The whole surface, in the order the tools are registered. Nothing else is exposed.
TOOL_NAMES = (
    "lookup_customer",
    "find_customer_by_email",
    "lookup_order",
    "find_similar_resolved_tickets",
    "issue_refund",
)


class BearerTokenVerifier:
    """Accepts exactly one token, compared in constant time (``hmac.compare_digest``)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigurationError("CUSTOMER_DATA_TOKEN is empty")
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if not hmac.compare_digest(token.encode(), self._token):
            return None
        # The token itself is not kept on the principal: nothing downstream needs it.
        return AccessToken(token="<redacted>", client_id="fleet", scopes=[])


@dataclass
class AppState:
    pool: asyncpg.Pool
    settings: Settings
    spec: ModelSpec


def _state(ctx: Context) -> AppState:
    return ctx.request_context.lifespan_context


def _meta(ctx: Context) -> dict[str, Any]:
    meta = ctx.request_context.meta
    return dict(meta) if meta else {}


def _call_meta(ctx: Context) -> data.CallMeta | None:
    """The request ``_meta`` of a read (for its audit row); a malformed one audits nothing
    rather than failing a read (only issue_refund insists on a well-formed key)."""
    try:
        return data.CallMeta.from_meta(_meta(ctx))
    except FleetError:
        return None


async def _run(call: Any) -> Any:
    """Await a data-layer call; a deliberate refusal becomes a tool error the model reads."""
    try:
        return await call
    except FleetError as exc:
        raise ToolError(str(exc)) from exc


def _one_thread_per_query() -> None:
    """Run the local model's forward pass on one intra-op thread.

    The server only embeds queries: one short description per search. Split over torch's
    default thread pool (one thread per core), a 20-token forward pass gains nothing, and when
    the cores are busy (the worker, PostgreSQL and other searches share them) the pool's threads
    spin waiting for each other: measured in-process on this 2-core machine at load ~3, one
    query took 210-230 ms of CPU and 460-560 ms wall with 2 threads, 19-21 ms of CPU and
    44-66 ms wall with 1. Concurrent searches still run one after another (the embedder's
    lock), so one thread is also all they could use. Bulk embedding (``fleet seed``,
    ``fleet reembed``) runs in other processes and keeps the default.
    """
    import torch

    torch.set_num_threads(1)


def build_server(settings: Settings, *, own_process: bool = False) -> MCPServer:
    """The MCP server with its five tools (no transport yet: see :func:`create_app`).

    ``own_process``: the server is the process (``fleet mcp serve``), so once ready it may
    settle the process's garbage collector (:mod:`fleet.gc_policy`); not when a test or an
    application hosts it."""
    token = settings.customer_data_token
    if token is None or not token.get_secret_value():
        raise ConfigurationError(
            "CUSTOMER_DATA_TOKEN is not set: the customer-data server always requires a bearer "
            "token (`fleet up` and `fleet demo` generate one)"
        )

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[AppState]:
        # Its settings are per transaction (set_config(..., true)): no per-release reset.
        pool = await create_pool(  # no statement outlives the call a client waits on
            settings, "fleet-mcp", min_size=1, max_size=settings.customer_data_pool_size,
            vector=True, reset_sessions=False,
            command_timeout=settings.fleet_mcp_call_timeout_seconds,
        )
        try:
            if settings.fleet_embeddings == "local":
                _one_thread_per_query()
            await aembed(["warm-up"], settings)  # load the model before the port opens
            await asyncio.to_thread(prepare_for_queries, settings)  # queries all day
            if own_process:
                gc_policy.settle(settings.fleet_gc_young_threshold)
            log.info("customer-data ready (embeddings: %s)", model_spec(settings).name)
            yield AppState(pool=pool, settings=settings, spec=model_spec(settings))
        finally:
            await close_pool(pool)

    url = urlparse(settings.customer_data_url)
    server = MCPServer(
        name="customer-data",
        instructions=(
            "Business data for customer support: customers, orders, past resolved tickets, "
            "and refunds. Read tools are free to call; issue_refund moves money."
        ),
        token_verifier=BearerTokenVerifier(token.get_secret_value()),
        auth=AuthSettings(
            issuer_url=f"{url.scheme or 'http'}://{url.netloc or '127.0.0.1'}",
            resource_server_url=None,
            required_scopes=[],
        ),
        lifespan=lifespan,
        log_level=settings.fleet_log_level.upper(),  # type: ignore[arg-type]
    )
    read_only = ToolAnnotations(readOnlyHint=True, openWorldHint=False)

    @server.tool(annotations=read_only)
    async def lookup_customer(
        customer_id: Annotated[str, Field(description="The customer's id, e.g. 'cus-1001'.")],
        ctx: Context,
    ) -> CustomerInfo:
        """Look up a customer by id: email, name, tier (standard, pro or enterprise) and how many
        tickets they have open. Call it when you know the customer id (from the conversation's
        context or from lookup_order) and need their tier or history size, e.g. to decide
        whether to escalate a pro or enterprise customer."""
        return await _run(data.lookup_customer(_state(ctx).pool, customer_id, _call_meta(ctx)))

    @server.tool(annotations=read_only)
    async def find_customer_by_email(
        email: Annotated[str, Field(description="The customer's email address.")],
        ctx: Context,
    ) -> CustomerWithOrders:
        """Find a customer by email address: id, name, tier, open ticket count and their five
        most recent orders. Call it when a customer identifies themselves by email, or says
        "my order" without a number, to find which order they mean."""
        return await _run(data.find_customer_by_email(_state(ctx).pool, email, _call_meta(ctx)))

    @server.tool(annotations=read_only)
    async def lookup_order(
        order_id: Annotated[str, Field(description="The order number, e.g. '4429' (a leading "
                                       "'#' is ignored).")],
        ctx: Context,
    ) -> OrderInfo:
        """Look up an order by number: its customer (id, email, tier), amount in cents, status,
        and every refund issued on it so far with the amount still refundable. Call it whenever
        a message mentions an order number ("order #4429"), and always before issue_refund, to
        check what was paid and what is left to refund."""
        return await _run(data.lookup_order(_state(ctx).pool, order_id, _call_meta(ctx)))

    @server.tool(annotations=read_only)
    async def find_similar_resolved_tickets(
        description: Annotated[str, Field(description="The customer's problem in their own words "
                                          "or a one-sentence summary of it.")],
        ctx: Context,
        limit: Annotated[int, Field(description=f"How many cases to return (at most "
                                    f"{data.MAX_SIMILAR}).")] = 5,
    ) -> SimilarTickets:
        """Search past resolved support tickets for the ones most similar in meaning to a
        customer's problem, nearest first, each with how it was resolved and its cosine
        distance (lower is closer; a case far behind the first is a weak precedent). Call it
        BEFORE drafting a
        reply to any complaint, question or problem, so the reply can follow how the team
        resolved similar cases instead of inventing a new approach."""
        state = _state(ctx)
        return await _run(data.find_similar_resolved_tickets(
            state.pool, state.spec, description, limit, state.settings
        ))

    @server.tool(annotations=ToolAnnotations(
        readOnlyHint=False, destructiveHint=True, idempotentHint=True, openWorldHint=False
    ))
    async def issue_refund(
        order_id: Annotated[str, Field(description="The order number to refund, e.g. '4429'.")],
        amount_cents: Annotated[StrictInt, Field(description="Amount to refund in integer cents "
                                                 "(1250 means $12.50); at most what "
                                                 "lookup_order reports as refundable.")],
        reason: Annotated[str, Field(description="Why the customer is refunded, in plain words; "
                                     "shown to the human approver and kept in the audit log.")],
        ctx: Context,
    ) -> RefundIssued:
        """Refund (part of) an order to the customer's original payment method. Records the
        refund, updates the order's status and writes the refund_issued audit entry together,
        or does nothing at all. Call it only when a refund is justified by policy and the
        amount is confirmed with lookup_order; a human must approve every call. It refuses
        unknown orders, amounts that are not positive whole cents or exceed what is still
        refundable, and empty reasons."""
        state = _state(ctx)
        try:
            meta = data.CallMeta.from_meta(_meta(ctx))
        except FleetError as exc:
            raise ToolError(str(exc)) from exc
        return await _run(data.issue_refund(state.pool, order_id, amount_cents, reason, meta))

    # One SERVER span per tool call, joined to the worker's trace by `traceparent` in `_meta`.
    return tracing.trace_mcp_server(server)


def create_app(
    settings: Settings, *, host: str = "127.0.0.1", own_process: bool = False
) -> Starlette:
    """The ASGI app: stateless streamable HTTP with JSON responses, bearer auth on every call."""
    path = urlparse(settings.customer_data_url).path or "/mcp"
    app = build_server(settings, own_process=own_process).streamable_http_app(
        streamable_http_path=path, stateless_http=True, json_response=True, host=host
    )
    # Outermost: per-token rate and concurrency limits (429 + Retry-After), see limits.py.
    app.add_middleware(
        RateLimitMiddleware,
        rate=settings.customer_data_rate_limit,
        burst=settings.customer_data_rate_burst,
        concurrency=settings.customer_data_max_concurrency,
    )
    return app


def listen_address(settings: Settings, host: str | None, port: int | None) -> tuple[str, int]:
    """Where to listen: the arguments, else the host and port of ``CUSTOMER_DATA_URL``."""
    url = urlparse(settings.customer_data_url)
    return host or url.hostname or "127.0.0.1", port or url.port or 8765


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Run the server until SIGINT/SIGTERM (``fleet mcp serve``).

    The port is bound and the database reached before uvicorn starts, so that either failing
    is one sentence (``ConfigurationError``, or the CLI's "cannot reach the database") instead
    of uvicorn's traceback and its exit code 3."""
    import uvicorn

    bind_host, bind_port = listen_address(settings, host, port)
    listener = _bind(bind_host, bind_port)
    try:
        asyncio.run(_reach_database(settings))
        app = create_app(settings, host=bind_host, own_process=True)
        config = uvicorn.Config(
            app, host=bind_host, port=bind_port, log_level=settings.fleet_log_level.lower(),
            access_log=False, lifespan="on",
        )
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound as uvicorn binds its own (SO_REUSEADDR)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError:
            listener.close()
            raise
    except OSError as exc:  # socket.gaierror included: a host that is no address
        raise ConfigurationError(
            f"the customer-data server cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    return listener


async def _reach_database(settings: Settings) -> None:
    from fleet.database import connect

    conn = await connect(settings, "fleet-mcp-start")
    await conn.close()
