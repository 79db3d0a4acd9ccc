"""The worker's client for the ``customer-data`` MCP server: a pool of connected clients.

Why a pool, measured (``../shared/NOTES.md``, BENCHMARKS.md): a new
``MCPServerStreamableHttp`` per turn costs about 40 ms of CPU and 0.9 MiB (a new HTTP client,
SSL context and CA bundle, plus ``server/discover`` and ``tools/list`` round trips); one client
shared by concurrent turns serialises every request behind its lock. So the agent sees ONE
logical server, :class:`CustomerDataServer`, and each tool call checks a connection out of
:class:`MCPClientPool` for the duration of that call only: a connection is never used by two
calls (let alone two turns) at once, and the number of connections follows the number of tool
calls in flight, not the number of turns waiting on their model (which, at 1 s per model call,
is what keeps a hundred in-flight turns small). The pool lists the tools once and compiles
each output schema once; every result is parsed into ``mcp.types.CallToolResult`` and its
structured content checked against the tool's schema, as the MCP SDK's client does. The
requests themselves go through :mod:`fleet.mcp_wire` (plain JSON-RPC POSTs on kept-alive
connections), not the SDK's client session: that was most of a turn's MCP cost (why, measured,
in that module).

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

from agents.mcp import MCPServer
from agents.mcp.util import MCPToolCustomDataContext, MCPToolMetaContext
from mcp import types
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import mcp_param_headers, x_mcp_header_map
from mcp_types.version import (
    HANDSHAKE_PROTOCOL_VERSIONS,
    LATEST_HANDSHAKE_VERSION,
    LATEST_MODERN_VERSION,
)
from pydantic import ValidationError

from fleet import tracing
from fleet.errors import HandlerError
from fleet.mcp_wire import CLIENT_INFO, Connection, Endpoint, HTTPStatusError
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


class MCPClientPool:
    """Connections to the customer-data server, each used by one call at a time."""

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
        tls = _shared_ssl_context() if self.url.startswith("https:") else None
        self.endpoint = Endpoint(self.url, self.headers, tls)
        self._idle: deque[Connection] = deque()
        self._tools: list[types.Tool] | None = None
        self._tools_lock = asyncio.Lock()
        self._closing = False
        self._quiet = False
        #: each listed tool's compiled output-schema validator (None: the tool declares none)
        self._validators: dict[str, Any] = {}
        #: arguments a listed tool wants mirrored in ``Mcp-Param-*`` headers (2026 revision)
        self._param_headers: dict[str, dict[tuple[str, ...], str]] = {}
        self.created = 0

    async def _connect(self) -> Connection:
        client = Connection(self.endpoint, self.connect_timeout)
        await client.connect()
        self.created += 1
        return client

    async def _checkout(self) -> Connection:
        while self._idle:
            client = self._idle.pop()
            if client.usable:
                return client
            client.close()  # idle too long: the server may be closing it
        return await self._connect()

    def _release(self, client: Connection) -> None:
        if self._closing or len(self._idle) >= self.max_clients or not client.usable:
            self._discard(client)
        else:
            self._idle.append(client)

    def _discard(self, client: Connection) -> None:
        client.close()

    async def _with_client(self, what: str, fn: Callable[[Connection], Any]) -> Any:
        """Run ``fn(client)`` on a checked-out connection; retry on a fresh one when it fails."""
        delay = self.backoff
        last: BaseException | None = None
        attempt = throttled = 0
        throttled_since: float | None = None
        unreachable_since: float | None = None
        while attempt < self.attempts:
            client: Connection | None = None
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
                now = asyncio.get_running_loop().time()
                if wait is not None and throttled_since is None:
                    throttled_since = now
                if wait is not None and now - (throttled_since or now) < MAX_THROTTLED_SECONDS:
                    # 429 from the server's per-token limit: not a failure (the client is
                    # fine, no attempt is used); wait as told, with jitter that widens with
                    # each refusal, so a burst of calls racing for the same token's next free
                    # slot spreads out instead of coming back in the same instant. Bounded by
                    # time, not by count: under a burst the server's waits are tiny (10 ms)
                    # and many calls compete, so a call may hear "wait" dozens of times.
                    throttled += 1
                    wait *= 1 + min(throttled, 20) / 4
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

    def tool_names(self) -> list[str] | None:
        """The names of the tools the server listed; None before the first listing."""
        return None if self._tools is None else [t.name for t in self._tools]

    async def tools(self) -> list[types.Tool]:
        """The server's tool list, fetched once (with each output schema compiled once)."""
        if self._tools is None:
            async with self._tools_lock:
                if self._tools is None:
                    self._tools = await self._with_client("tools/list", self._list_tools)
        return list(self._tools)

    async def _list_tools(self, client: Connection) -> list[types.Tool]:
        if self.endpoint.protocol_version is None:
            # Stateless server: nothing to set up, but agree on the protocol once.
            await self._agree_protocol(client)
        tools: list[types.Tool] = []
        cursor: str | None = None
        while True:
            page = types.ListToolsResult.model_validate(
                await client.request("tools/list", {"cursor": cursor} if cursor else None)
            )
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        self._validators = {t.name: _compile(t.name, t.output_schema) for t in tools}
        self._param_headers = {
            t.name: header_map for t in tools if (header_map := x_mcp_header_map(t.input_schema))
        }
        return tools

    async def _agree_protocol(self, client: Connection) -> None:
        """The SDK client's ``mode="auto"`` policy (``mcp.client._probe``), for one endpoint:
        probe ``server/discover`` at the 2026 revision; a server that answers it and lists
        that revision is spoken to with per-request envelopes from then on. Anything else that
        is an answer (an error, a 4xx, a result that is not a discover result) means a
        handshake-era server: ``initialize`` as before. A 429 or an outage is no answer: it
        propagates and the pool retries it like any call."""
        probe = Endpoint(self.url, self.headers, self.endpoint.ssl)
        probe.adopt(LATEST_MODERN_VERSION)
        prober = Connection(probe, self.connect_timeout)
        try:
            answer: Any = await prober.request("server/discover")
        except (MCPError, HTTPStatusError) as exc:
            if retry_after(exc) is not None or (
                isinstance(exc, HTTPStatusError) and exc.status_code >= 500
            ):
                raise
            answer = None
        finally:
            prober.close()
        try:
            discovered = types.DiscoverResult.model_validate(answer) if answer else None
        except ValidationError:
            discovered = None
        if discovered is not None and LATEST_MODERN_VERSION in discovered.supported_versions:
            self.endpoint.adopt(LATEST_MODERN_VERSION)
            return
        init = types.InitializeResult.model_validate(await client.request("initialize", {
            "protocolVersion": LATEST_HANDSHAKE_VERSION,
            "capabilities": {},
            "clientInfo": CLIENT_INFO,
        }))
        if init.protocol_version not in HANDSHAKE_PROTOCOL_VERSIONS:
            raise RuntimeError(
                f"Unsupported protocol version from the server: {init.protocol_version}"
            )
        self.endpoint.adopt(init.protocol_version)

    async def call_tool(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None
    ) -> types.CallToolResult:
        await self.tools()
        params: dict[str, Any] = {"name": tool_name, "arguments": arguments or {}}
        if meta:
            params["_meta"] = meta

        header_map = self._param_headers.get(tool_name)
        # A 2026-revision tool may ask for arguments mirrored in Mcp-Param-* headers.
        mirrored = "".join(
            f"{name}: {value}\r\n"
            for name, value in mcp_param_headers(header_map, arguments or {}).items()
        ) if header_map and self.endpoint.modern else ""

        async def call(client: Connection) -> types.CallToolResult:
            result = types.CallToolResult.model_validate(
                await client.request("tools/call", params, mirrored)
            )
            if not result.is_error:
                self.validate(tool_name, result)
            return result

        return await self._with_client(f"call to {tool_name}", call)

    def validate(self, name: str, result: types.CallToolResult) -> None:
        """Check a result's structured content against the tool's output schema (the MCP SDK
        client's check, with its messages). Raises RuntimeError."""
        if name not in self._validators:
            log.warning("Tool %s not listed by server, cannot validate any structured content",
                        name)
            return
        validator = self._validators[name]
        if validator is None:
            return
        if result.structured_content is None:
            raise RuntimeError(
                f"Tool {name} has an output schema but did not return structured content"
            )
        from jsonschema.exceptions import best_match

        error = best_match(validator.iter_errors(result.structured_content))
        if error is not None:
            raise RuntimeError(
                f"Invalid structured content returned by tool {name}: {error}"
            ) from error

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


def _compile(name: str, schema: dict[str, Any] | None) -> Any:
    """A tool's output-schema validator, compiled once (compiling costs ~60 validations)."""
    if schema is None:
        return None
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for
    from referencing import Registry

    cls = validator_for(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise RuntimeError(f"Invalid schema for tool {name}: {exc}") from exc
    # An empty registry: $refs resolve within the schema document only (as the SDK client does).
    return cls(schema, registry=Registry())


#: How long one call may keep waiting out 429 answers before it counts as failed.
MAX_THROTTLED_SECONDS = 60.0


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, what caused it, and the members of any exception group on the way."""
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
    ``data.retry_after``, or the HTTP ``Retry-After`` header of a plain HTTP 429."""
    for current in _chain(exc):
        data = getattr(getattr(current, "error", None), "data", None)
        if isinstance(data, dict) and isinstance(data.get("retry_after"), int | float):
            return float(data["retry_after"])
        if isinstance(current, HTTPStatusError) and current.status_code == 429:
            try:
                return float(current.retry_after or "1")
            except ValueError:
                return 1.0
    return None


def _is_unreachable(exc: BaseException | None) -> bool:
    """True when the server could not be connected to at all (the request never left)."""
    # One address refused: ConnectionRefusedError; several (a name with many addresses), all
    # refused: asyncio's OSError "Multiple exceptions: [Errno 111] Connect call failed ...".
    return any(
        isinstance(current, ConnectionRefusedError)
        or (isinstance(current, OSError) and "Connect call failed" in str(current))
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
        await self.pool.tools()
        return types.ListPromptsResult.model_validate(
            await self.pool._with_client("prompts/list", lambda c: c.request("prompts/list"))
        )

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        await self.pool.tools()
        params = {"name": name, "arguments": arguments or {}}
        return types.GetPromptResult.model_validate(
            await self.pool._with_client("prompts/get", lambda c: c.request("prompts/get", params))
        )
