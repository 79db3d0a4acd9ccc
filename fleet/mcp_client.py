"""The worker's client for the ``customer-data`` MCP server: a pool of connected clients.

Why a pool, measured (``../shared/NOTES.md``, BENCHMARKS.md): a new
``MCPServerStreamableHttp`` per turn costs about 40 ms of CPU and 0.9 MiB (a new HTTP client,
SSL context and CA bundle, plus ``server/discover`` and ``tools/list`` round trips); one client
shared by concurrent turns serialises every request behind its lock. So the agent sees ONE
logical server, :class:`CustomerDataServer`, and each tool call checks a connected client out
of :class:`MCPClientPool` for the duration of that call only: a client is never used by two
calls (let alone two turns) at once, and the number of clients follows the number of tool calls
in flight, not the number of turns waiting on their model (which, at 1 s per model call, is
what keeps a hundred in-flight turns small). All clients share one SSL context and one cached
tool list.

The registration is the course's (Decisions 6 and 9): ``issue_refund`` requires human approval,
the read tools do not. Every request carries ``_meta``: ``idempotency_key`` (derived from the
tool call id, so a resumed or retried refund is written once), ``session_id``, ``message_id``,
``variables`` (run variables from ``fleet.enqueue``; they never enter the model's context) and,
when tracing is on, ``traceparent``.

A server that is down or slow never hangs a turn: connecting and each call have deadlines; a
failed call is retried on a fresh client with backoff, then raises
:class:`CustomerDataUnavailable`, which fails the turn cleanly so the queue retries it later.
A tool that runs and reports an error (``isError``) is not a transport failure: the model sees
the error, and the audit records the call as ``error``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
from agents.mcp import MCPServer, MCPServerStreamableHttp
from agents.mcp.util import MCPToolCustomDataContext, MCPToolMetaContext

from fleet import tracing
from fleet.errors import HandlerError
from fleet.settings import Settings

log = logging.getLogger("fleet.mcp_client")

SERVER_NAME = "customer-data"
#: The only tool that moves money; everything else runs without a human.
APPROVAL_REQUIRED = {"issue_refund": "always"}


class CustomerDataUnavailable(HandlerError):
    """The customer-data MCP server could not be reached or did not answer in time."""


_SSL_CONTEXT: ssl.SSLContext | None = None


def _shared_ssl_context() -> ssl.SSLContext:
    """One SSL context for every client (building one loads the CA bundle: ~40 ms CPU)."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


def _http_client_factory(
    headers: dict[str, str] | None = None, timeout: Any = None, auth: Any = None
) -> Any:
    import httpx2

    kwargs: dict[str, Any] = {
        "follow_redirects": False,
        "verify": _shared_ssl_context(),
        "trust_env": False,  # a proxy from the environment must not sit between us and the server
    }
    if headers is not None:
        kwargs["headers"] = headers
    if timeout is not None:
        kwargs["timeout"] = timeout
    if auth is not None:
        kwargs["auth"] = auth
    return httpx2.AsyncClient(**kwargs)


class MCPClientPool:
    """Connected ``MCPServerStreamableHttp`` clients, each used by one call at a time."""

    def __init__(
        self,
        settings: Settings,
        *,
        max_clients: int = 32,
        attempts: int = 3,
        backoff: float = 0.2,
    ) -> None:
        token = settings.customer_data_token
        self.url = settings.customer_data_url
        self.headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self.connect_timeout = settings.fleet_mcp_connect_timeout_seconds
        self.call_timeout = settings.fleet_mcp_call_timeout_seconds
        #: how long a call waits for a server that refuses connections (restarting)
        self.outage_wait = settings.fleet_mcp_startup_wait_seconds
        self.max_clients = max_clients
        # At most this many calls in flight (and clients alive): a burst of turns waits for a
        # free client instead of building hundreds (each costs CPU and memory to create).
        self._slots = asyncio.Semaphore(max_clients)
        self.attempts = attempts
        self.backoff = backoff
        self._idle: deque[MCPServerStreamableHttp] = deque()
        self._tools: list[Any] | None = None
        self._tools_lock = asyncio.Lock()
        self._closing = False
        self._quiet = False
        self._cleanups: set[asyncio.Task[None]] = set()
        #: compiled output-schema validators, shared by every client's session (see _prime)
        self._validators: dict[str, Any] = {}
        self.created = 0

    def _new_client(self) -> MCPServerStreamableHttp:
        return MCPServerStreamableHttp(
            params={
                "url": self.url,
                "headers": self.headers,
                "timeout": self.connect_timeout,
                "sse_read_timeout": self.call_timeout,
                "httpx_client_factory": _http_client_factory,
            },
            cache_tools_list=True,
            name=SERVER_NAME,
            client_session_timeout_seconds=self.call_timeout,
            max_retry_attempts=0,  # retries happen here, on a fresh client
        )

    async def _connect(self) -> MCPServerStreamableHttp:
        client = self._new_client()
        try:
            await asyncio.wait_for(client.connect(), timeout=self.connect_timeout)
        except BaseException:
            self._discard(client)
            raise
        self.created += 1
        self._prime(client)
        return client

    def _prime(self, client: MCPServerStreamableHttp) -> None:
        """Give a new client's session the tool listing and the compiled output-schema
        validators the pool already has.

        The MCP ``ClientSession`` validates every structured tool result against the tool's
        output schema, and keeps the schemas and the compiled validators per session: each new
        pooled client would re-list the tools on its first call of each tool and compile each
        schema again (``jsonschema`` ``check_schema``, about 60 validations' worth of CPU).
        Profiled with ``fleet bench turns``, that was the largest single cost of a warming
        worker. The results are still validated; the work is done once per worker instead of
        once per client. The attributes are mcp 2.x's own (``tests/test_mcp_client_pool.py``
        fails if they move); without them this does nothing.
        """
        session = getattr(client, "session", None)
        absorb = getattr(session, "_absorb_tool_listing", None)
        if self._tools is None or absorb is None or not hasattr(session, "_tool_output_validators"):
            return
        from mcp import types

        absorb(types.ListToolsResult(tools=list(self._tools)), complete=True)
        session._tool_output_validators = self._validators  # one dict, filled by any session

    async def _checkout(self) -> MCPServerStreamableHttp:
        if self._idle:
            return self._idle.pop()
        return await self._connect()

    def _release(self, client: MCPServerStreamableHttp) -> None:
        if self._closing or len(self._idle) >= self.max_clients:
            self._discard(client)
        else:
            self._idle.append(client)

    def _discard(self, client: MCPServerStreamableHttp) -> None:
        async def cleanup() -> None:
            try:
                await asyncio.wait_for(client.cleanup(), timeout=5)
            except BaseException as exc:  # a broken client's cleanup may fail in any way
                log.debug("cleanup of a discarded MCP client failed: %s", exc)

        task = asyncio.ensure_future(cleanup())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _with_client(self, what: str, fn: Callable[[MCPServerStreamableHttp], Any]) -> Any:
        """Run ``fn(client)`` on a checked-out client; retry on a fresh one when it fails."""
        delay = self.backoff
        last: BaseException | None = None
        attempt = throttled = 0
        unreachable_since: float | None = None
        while attempt < self.attempts:
            client: MCPServerStreamableHttp | None = None
            try:
                async with self._slots:
                    client = await self._checkout()
                    result = await asyncio.wait_for(fn(client), timeout=self.call_timeout)
            except asyncio.CancelledError:
                if client is not None:
                    self._discard(client)
                raise
            except Exception as exc:
                last = exc
                wait = retry_after(exc)
                if wait is not None and throttled < MAX_THROTTLED_WAITS:
                    # 429 from the server's per-token limit: not a failure (the client is
                    # fine, no attempt is used); wait as told, with jitter so the fleet's
                    # throttled calls do not all come back in the same instant.
                    throttled += 1
                    if client is not None:
                        self._release(client)
                    log.info("customer-data %s rate limited; waiting %.2fs", what, wait)
                    await asyncio.sleep(max(wait, 0.01) * random.uniform(1.0, 1.5))
                    continue
                if client is not None:
                    self._discard(client)  # its session may be broken: never reuse it
                if _is_unreachable(exc) and not self._quiet:
                    # Nothing listens (the server is restarting: it loads its embedding model
                    # first). The request never reached it, so waiting and trying again is
                    # safe and costs the turn no attempt: the message's retry budget is for
                    # failures, not for an outage of a few seconds.
                    loop = asyncio.get_running_loop()
                    if unreachable_since is None:
                        unreachable_since = loop.time()
                        log.warning("customer-data MCP server unreachable; waiting up to %.0fs",
                                    self.outage_wait)
                    if loop.time() - unreachable_since < self.outage_wait:
                        await asyncio.sleep(min(1.0, self.outage_wait) * random.uniform(0.5, 1.0))
                        continue
                attempt += 1
                if attempt < self.attempts:
                    (log.debug if self._quiet else log.warning)(
                        "customer-data %s failed (%s); retry %d in %.1fs",
                        what,
                        _describe(exc),
                        attempt,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay *= 2
                continue
            self._release(client)
            return result
        kind = "timed out" if _is_timeout(last) else "failed"
        raise CustomerDataUnavailable(
            f"customer-data MCP server at {self.url}: {what} {kind} after {self.attempts} "
            f"attempts ({_describe(last)})"
        ) from last

    async def tools(self) -> list[Any]:
        """The server's tool list, fetched once and shared by every client."""
        if self._tools is None:
            async with self._tools_lock:
                if self._tools is None:
                    self._tools = await self._with_client("tools/list", lambda c: c.list_tools())
        return list(self._tools)

    async def call_tool(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None
    ) -> Any:
        return await self._with_client(
            f"call to {tool_name}", lambda c: c.call_tool(tool_name, arguments, meta=meta)
        )

    async def warm(self, clients: int = 1, wait: float = 0.0) -> bool:
        """Fetch the tool list and connect ``clients`` clients now, waiting up to ``wait``
        seconds for a server that is still starting (``fleet up`` starts it beside the
        workers). Best effort: False when the server is still unreachable (calls retry)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                self._quiet = True
                await self.tools()
                extra = [await self._connect() for _ in range(max(clients - len(self._idle), 0))]
                for client in extra:
                    self._release(client)
                return True
            except Exception as exc:
                if loop.time() >= deadline:
                    log.warning("customer-data MCP server not reachable yet: %s", _describe(exc))
                    return False
                await asyncio.sleep(min(1.0, max(deadline - loop.time(), 0)))
            finally:
                self._quiet = False

    async def close(self) -> None:
        self._closing = True
        while self._idle:
            self._discard(self._idle.pop())
        if self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)


#: 429 answers one call may wait out before it counts as failed (at ~0.1-1 s each).
MAX_THROTTLED_WAITS = 50


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, what caused it, and the members of exception groups on the way: a failure
    inside the MCP client's task group (a 429 while connecting, say) arrives wrapped in one."""
    seen: set[int] = set()
    pending = [exc] if exc is not None else []
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)


def retry_after(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait, if it answered 429: the JSON-RPC error's
    ``data.retry_after``, or the HTTP ``Retry-After`` header when the answer came back as a
    plain HTTP status error (during the connect handshake)."""
    for current in _chain(exc):
        data = getattr(getattr(current, "error", None), "data", None)
        if isinstance(data, dict) and isinstance(data.get("retry_after"), int | float):
            return float(data["retry_after"])
        response = getattr(current, "response", None)
        if getattr(response, "status_code", None) == 429:
            try:
                return float(response.headers.get("retry-after", "1"))
            except (TypeError, ValueError):
                return 1.0
    return None


def _is_unreachable(exc: BaseException | None) -> bool:
    """True when the server could not be connected to at all (the request never left)."""
    return any(
        isinstance(current, ConnectionRefusedError)
        or isinstance(current, httpx2.ConnectError)
        or "Could not reach the server" in str(current)
        for current in _chain(exc)
    )


def _is_timeout(exc: BaseException | None) -> bool:
    return any(
        isinstance(current, TimeoutError) or "timeout" in str(current).lower()
        for current in _chain(exc)
    )


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # "unhandled errors in a TaskGroup" says nothing; its member does
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def _meta(ctx: MCPToolMetaContext) -> dict[str, Any]:
    """The request ``_meta`` of one tool call (keys fixed by the cross-team interface)."""
    turn = ctx.run_context.context
    call_id = getattr(ctx.run_context, "tool_call_id", None) or ""
    meta: dict[str, Any] = {"idempotency_key": f"{getattr(turn, 'session_id', '')}:{call_id}"}
    for key in ("session_id", "message_id", "variables"):
        value = getattr(turn, key, None)
        if value is not None:
            meta[key] = value
    return meta


def _note_error(ctx: MCPToolCustomDataContext) -> None:
    """Remember which calls the server answered with ``isError`` (audited as ``error``)."""
    if ctx.is_error:
        errors = getattr(ctx.run_context.context, "tool_errors", None)
        call_id = getattr(ctx.run_context, "tool_call_id", None)
        if errors is not None and call_id:
            errors.add(call_id)
    return None


class CustomerDataServer(MCPServer):
    """The ``customer-data`` server as the agent registers it: approvals, ``_meta``, and each
    call on its own pooled client (see the module docstring)."""

    def __init__(self, pool: MCPClientPool) -> None:
        super().__init__(
            # The tools return typed results: hand the model their JSON as one plain string,
            # which every chat-completions server accepts as a tool message (not a parts list).
            use_structured_content=True,
            require_approval=APPROVAL_REQUIRED,
            # A transport failure raises out of the run (the turn fails and is retried); a tool
            # that reports isError still reaches the model as a result.
            failure_error_function=None,
            tool_meta_resolver=_meta,
            custom_data_extractor=_note_error,
        )
        self.pool = pool

    @property
    def name(self) -> str:
        return SERVER_NAME

    async def connect(self) -> None:
        await self.pool.tools()

    async def cleanup(self) -> None:
        return None

    async def list_tools(self, run_context: Any = None, agent: Any = None) -> list[Any]:
        return await self.pool.tools()

    async def call_tool(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None = None
    ) -> Any:
        with tracing.tool_call(tool_name, meta) as call:
            return call.result(await self.pool.call_tool(tool_name, arguments, call.meta))

    async def list_prompts(self) -> Any:
        return await self.pool._with_client("prompts/list", lambda c: c.list_prompts())

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.pool._with_client(
            "prompts/get", lambda c: c.get_prompt(name, arguments)
        )
