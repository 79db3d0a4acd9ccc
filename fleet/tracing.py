"""OpenTelemetry tracing: one trace per turn, across the MCP boundary.

A turn's trace has the worker's spans (``fleet.turn`` -> ``fleet.model_call`` / ``fleet.tool_call``)
and, in the ``customer-data`` MCP server, a ``customer_data.<tool>`` span per request with a
``db.query`` span per statement, so a slow tool shows the slow query behind it. The trace context
crosses the MCP boundary in the request's ``_meta`` under ``traceparent`` (W3C Trace Context):
the client adds it with :func:`inject_meta` (or :func:`tool_call`), the server continues it with
:func:`server_span`.

Tracing is on when an exporter is configured: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) sends spans over OTLP/HTTP (``pip install
'pgfleet[otlp]'``); tests pass an in-memory exporter to :func:`configure`. Otherwise every helper
here returns before touching OpenTelemetry: no span objects, no context switches, no ``_meta`` key.
Standard ``OTEL_*`` variables (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, headers,
sampling) work as documented by OpenTelemetry.

Where to call what:

* worker: :func:`span` around a turn (``fleet.worker`` does it for every handler);
* agent turn: wrap the model in :class:`TracedModel`; in the MCP client's ``call_tool`` use
  ``with tool_call(name, meta) as call:`` and send ``call.meta``;
* MCP server: ``trace_mcp_server(server)`` once (a server span per tool call); every
  connection ``fleet.database`` opens calls :func:`trace_queries` (``db.query`` spans).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fleet import metrics

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("fleet.tracing")

TRACEPARENT = "traceparent"
_PROPAGATOR = TraceContextTextMapPropagator()
_LOCK = threading.Lock()


class _State:
    configured = False
    tracer: trace.Tracer | None = None
    provider: TracerProvider | None = None


_state = _State()

# -- set-up -----------------------------------------------------------------------------------


def _default_service_name() -> str:
    """``pgfleet-worker``, ``pgfleet-customer-data`` or ``pgfleet``, from the command line."""
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    if args[:2] == ["mcp", "serve"]:
        return "pgfleet-customer-data"
    if args[:1] in (["worker"], ["up"]):
        return "pgfleet-worker"
    return "pgfleet"


def _otlp_endpoint() -> str | None:
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )


def configure(service_name: str | None = None, *, exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on or leave it off; returns whether it is on.

    ``exporter`` (tests) receives every span synchronously. Without it, spans go over OTLP/HTTP
    when an endpoint is set in the environment, batched in a background thread and flushed at
    exit. Calling again replaces the previous set-up (tests swap exporters).
    """
    with _LOCK:
        return _configure(service_name, exporter)


def _configure(service_name: str | None, exporter: SpanExporter | None) -> bool:
    if _state.provider is not None:
        _state.provider.shutdown()
    _state.configured = True
    _state.tracer = None
    _state.provider = None
    processor: Any
    if exporter is not None:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        processor = SimpleSpanProcessor(exporter)
    elif _otlp_endpoint():
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed "
                "(pip install 'pgfleet[otlp]'); tracing stays off"
            )
            return False
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processor = BatchSpanProcessor(OTLPSpanExporter())
    else:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    attributes: dict[str, Any] = {}
    if service_name or not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name or _default_service_name()
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(processor)
    _state.provider = provider
    _state.tracer = provider.get_tracer("fleet")
    return True


def enabled() -> bool:
    """Whether spans are recorded (configures from the environment on first use)."""
    if not _state.configured:
        with _LOCK:
            if not _state.configured:
                _configure(None, None)
    return _state.tracer is not None


def shutdown() -> None:
    """Flush and stop the exporter (also done at interpreter exit)."""
    with _LOCK:
        if _state.provider is not None:
            _state.provider.shutdown()
        _state.provider = None
        _state.tracer = None


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry attribute values: str, bool, int, float; None dropped, the rest as text."""
    clean: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        clean[key] = value if isinstance(value, str | bool | int | float) else str(value)
    return clean


# -- spans ------------------------------------------------------------------------------------


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Context | None = None,
    **attributes: Any,
) -> Iterator[trace.Span | None]:
    """A span around the block, current while it runs (None when tracing is off).

    An exception escaping the block is recorded on the span and marks it as an error.
    """
    if not enabled():
        yield None
        return
    assert _state.tracer is not None
    with _state.tracer.start_as_current_span(
        name, context=parent, kind=kind, attributes=_clean(attributes)
    ) as current:
        yield current


def inject_meta(meta: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """``meta`` plus the current span's ``traceparent`` (a new dict; unchanged when off)."""
    if not enabled():
        return dict(meta) if meta is not None else None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    if not carrier:
        return dict(meta) if meta is not None else None
    return {**(meta or {}), **carrier}


def extract_meta(meta: Any) -> Context | None:
    """The trace context a request's ``_meta`` carries, or None.

    ``meta`` is whatever the MCP server hands over (``ctx.request_context.meta``: a dict in mcp
    2.x, a pydantic model in 1.x) or None.
    """
    if meta is None or not enabled():
        return None
    if not isinstance(meta, Mapping):
        extra = getattr(meta, "model_extra", None) or {}
        meta = {k: v for k, v in {**extra, **vars(meta)}.items() if isinstance(v, str)}
    carrier = {k: meta[k] for k in (TRACEPARENT, "tracestate") if isinstance(meta.get(k), str)}
    if TRACEPARENT not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


@contextmanager
def server_span(name: str, meta: Any, **attributes: Any) -> Iterator[trace.Span | None]:
    """A SERVER span continuing the caller's trace from its request ``_meta``.

    Without a ``traceparent`` in ``meta`` it starts a new trace (a request from a client that
    does not trace is still worth seeing).
    """
    if not enabled():
        yield None
        return
    with span(name, kind=SpanKind.SERVER, parent=extract_meta(meta), **attributes) as current:
        yield current


def _request_meta(context: Any) -> Any:
    """The request ``_meta`` of an MCP tool call's context, or None (in-process calls)."""
    try:
        return context.request_context.meta
    except (AttributeError, LookupError, ValueError):
        return None


def trace_mcp_server(server: Any, prefix: str = "customer_data") -> Any:
    """Give every tool call of an ``mcp`` ``MCPServer`` a SERVER span continuing the caller's
    trace from the request ``_meta`` (``prefix.tool_name``); a tool error marks it as failed.

    One line where the server is built: ``tracing.trace_mcp_server(server)``. Together with the
    ``db.query`` spans of :func:`trace_queries` a slow tool shows the slow statement behind it.
    No-op when tracing is off.
    """
    if not enabled():
        return server
    inner = server.call_tool

    async def call_tool(name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        with server_span(
            f"{prefix}.{name}", _request_meta(context), **{"rpc.system": "mcp", "rpc.method": name}
        ) as current:
            result = await inner(name, arguments, context)
            if current is not None and getattr(result, "is_error", False):
                current.set_status(Status(StatusCode.ERROR, "tool error"))
            return result

    server.call_tool = call_tool
    return server


class ToolCall:
    """One MCP tool call in progress: send :attr:`meta`; set :attr:`outcome` if not ``ok``."""

    def __init__(self, tool: str, meta: dict[str, Any] | None) -> None:
        self.tool = tool
        self.meta = meta
        self.outcome = "ok"

    def result(self, result: Any) -> Any:
        """Note an MCP ``CallToolResult``: a result flagged as an error counts as ``error``."""
        if getattr(result, "is_error", None) or getattr(result, "isError", None):
            self.outcome = "error"
        return result


@contextmanager
def tool_call(tool: str, meta: Mapping[str, Any] | None = None) -> Iterator[ToolCall]:
    """A CLIENT span for one MCP tool call, its ``traceparent`` in ``call.meta``, and the
    ``fleet_tool_calls_total`` / ``fleet_tool_call_duration_seconds`` metrics.

    ``async def call_tool(self, name, arguments, meta=None):``
    ``    with tool_call(name, meta) as call:``
    ``        return call.result(await super().call_tool(name, arguments, call.meta))``

    An exception counts as ``timeout`` (TimeoutError) or ``error``; a result with ``is_error`` as
    ``error``. Set ``call.outcome = "blocked"`` when the server refused by policy.
    """
    started = time.monotonic()
    with span(f"fleet.tool_call {tool}", kind=SpanKind.CLIENT, **{"fleet.tool": tool}) as current:
        call = ToolCall(tool, inject_meta(meta))
        try:
            yield call
        except TimeoutError:
            call.outcome = "timeout"
            raise
        except BaseException:
            call.outcome = "error"
            raise
        finally:
            metrics.record_tool_call(tool, call.outcome, time.monotonic() - started)
            if current is not None:
                current.set_attribute("fleet.tool.outcome", call.outcome)
                if call.outcome != "ok":
                    current.set_status(Status(StatusCode.ERROR, call.outcome))


# -- the model --------------------------------------------------------------------------------


def _usage_tokens(usage: Any) -> tuple[int, int]:
    if usage is None:
        return 0, 0
    return int(getattr(usage, "input_tokens", 0) or 0), int(getattr(usage, "output_tokens", 0) or 0)


@cache
def _traced_model_class() -> type:
    from agents.models.interface import Model

    class TracedModel(Model):
        """Any ``agents.Model`` with a span, latency, tokens and estimated cost per request."""

        def __init__(
            self, inner: Model, name: str, prices: tuple[float, float] | None = None
        ) -> None:
            self.inner = inner
            self.name = name
            self.prices = prices if prices is not None else (0.0, 0.0)

        def _record(self, started: float, ok: bool, usage: Any, current: Any) -> None:
            input_tokens, output_tokens = _usage_tokens(usage)
            metrics.record_model_call(
                seconds=time.monotonic() - started,
                ok=ok,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                prices=self.prices,
            )
            if current is not None:
                current.set_attribute("gen_ai.usage.input_tokens", input_tokens)
                current.set_attribute("gen_ai.usage.output_tokens", output_tokens)

        async def get_response(self, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            with span("fleet.model_call", **{"gen_ai.request.model": self.name}) as current:
                try:
                    response = await self.inner.get_response(*args, **kwargs)
                except BaseException:
                    self._record(started, False, None, current)
                    raise
                self._record(started, True, getattr(response, "usage", None), current)
                return response

        async def stream_response(self, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            usage = None
            with span("fleet.model_call", **{"gen_ai.request.model": self.name}) as current:
                try:
                    async for event in self.inner.stream_response(*args, **kwargs):
                        response = getattr(event, "response", None)
                        if getattr(event, "type", "") == "response.completed" and response:
                            usage = getattr(response, "usage", None)
                        yield event
                except BaseException:
                    self._record(started, False, usage, current)
                    raise
                self._record(started, True, usage, current)

        def get_retry_advice(self, request: Any) -> Any:
            return self.inner.get_retry_advice(request)

        async def _cleanup_on_run_end(self, owner: object) -> None:
            await self.inner._cleanup_on_run_end(owner)

        async def close(self) -> None:
            await self.inner.close()

    return TracedModel


def traced_model(inner: Any, name: str, prices: tuple[float, float] | None = None) -> Any:
    """Wrap an ``agents.Model``: one ``fleet.model_call`` span and the model metrics per request.

    ``prices``: dollars per million (input, output) tokens; default ``FLEET_MODEL_PRICES`` or the
    table in :func:`fleet.metrics.model_prices`. (The class is built on first use so that a
    worker that never runs a model never imports the agents SDK.)
    """
    if prices is None:
        from fleet.settings import get_settings

        prices = metrics.model_prices(name, get_settings().fleet_model_prices)
    return _traced_model_class()(inner, name, prices)


# -- the database -----------------------------------------------------------------------------

_MAX_STATEMENT = 2000


def _query_span(record: Any) -> None:
    """asyncpg query logger: a ``db.query`` span for a statement that just ran.

    asyncpg calls loggers with ``loop.call_soon`` from the task that ran the query, so the
    current span here is that task's (the tool's server span). The span is recorded after the
    fact with the measured start and end; the statement's text goes in, its arguments never do.
    """
    if _state.tracer is None or not trace.get_current_span().get_span_context().is_valid:
        return  # only queries made on behalf of a traced request
    end = time.time_ns()
    start = end - int(record.elapsed * 1e9)
    text = " ".join(str(record.query).split())
    current = _state.tracer.start_span(
        "db.query",
        kind=SpanKind.CLIENT,
        start_time=start,
        attributes={"db.system": "postgresql", "db.statement": text[:_MAX_STATEMENT]},
    )
    if record.exception is not None:
        current.record_exception(record.exception)
        current.set_status(Status(StatusCode.ERROR, type(record.exception).__name__))
    current.end(end_time=end)


def trace_queries(conn: Any) -> None:
    """Record a ``db.query`` span for every statement ``conn`` runs (no-op when tracing is off).

    Call it right after connecting (for a pool: in its ``init`` callback). Statements run
    outside any span (pool upkeep, migrations) make no spans.
    """
    if enabled():
        conn.add_query_logger(_query_span)
