"""OpenTelemetry across the MCP boundary.

Off by default (no exporter configured: no spans, no ``_meta`` key); with an exporter, the
helpers nest, carry ``traceparent`` through a request's ``_meta`` and record ``db.query`` spans
from asyncpg; spans go over OTLP/HTTP when an endpoint is set. Acceptance: one agent turn that
calls a tool is one trace with spans from the worker and from the customer-data MCP server, over
real streamable HTTP.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fleet import metrics, tracing

OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def spans(no_otel_env: None) -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, into memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    assert tracing.configure("pgfleet-test", exporter=exporter)
    yield exporter
    tracing.shutdown()


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def test_off_without_an_exporter_and_then_free(no_otel_env: None):
    assert tracing.configure() is False
    assert not tracing.enabled()
    with tracing.span("fleet.turn", message_id=1) as current:
        assert current is None
    assert tracing.inject_meta({"session_id": "s"}) == {"session_id": "s"}
    assert tracing.inject_meta(None) is None
    assert tracing.extract_meta({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None

    class Server:
        async def call_tool(self, *args: Any) -> None:
            return None

    server = Server()
    original = server.call_tool
    assert tracing.trace_mcp_server(server).call_tool == original  # not wrapped

    # "No cost": a disabled span is a flag check and a generator, well under 20 µs.
    started = time.perf_counter()
    for _ in range(10_000):
        with tracing.span("x"):
            pass
    assert (time.perf_counter() - started) / 10_000 < 20e-6


def test_traceparent_carries_the_trace_to_another_thread(spans: InMemorySpanExporter):
    received: dict[str, Any] = {}

    def server(meta: dict[str, Any]) -> None:
        # A new thread starts with an empty context: only the _meta can link the spans.
        with tracing.server_span("customer_data.lookup_order", meta, tool="lookup_order"):
            received["ok"] = True

    with tracing.span("fleet.turn") as turn, tracing.span("fleet.tool_call") as call:
        meta = tracing.inject_meta({"idempotency_key": "k"})
        assert meta is not None and meta["idempotency_key"] == "k"
        ctx = call.get_span_context()
        assert meta["traceparent"].startswith(
            f"00-{_hex(ctx.trace_id, 32)}-{_hex(ctx.span_id, 16)}-"
        )
        worker = threading.Thread(target=server, args=(meta,))
        worker.start()
        worker.join()
    assert received["ok"]
    finished = {s.name: s for s in spans.get_finished_spans()}
    server_span = finished["customer_data.lookup_order"]
    assert server_span.kind == SpanKind.SERVER
    assert server_span.context.trace_id == turn.get_span_context().trace_id
    assert server_span.parent.span_id == call.get_span_context().span_id
    assert server_span.resource.attributes["service.name"] == "pgfleet-test"


def test_server_span_without_traceparent_starts_a_new_trace(spans: InMemorySpanExporter):
    with tracing.server_span("customer_data.lookup_order", {"session_id": "s"}):
        pass
    with tracing.server_span("customer_data.lookup_order", None):
        pass
    for span in spans.get_finished_spans():
        assert span.parent is None


def test_tool_call_counts_outcomes_and_marks_failures(spans: InMemorySpanExporter):
    def count(outcome: str) -> float:
        return metrics.TOOL_CALLS.labels("lookup_order", outcome)._value.get()

    before = {o: count(o) for o in ("ok", "error", "timeout")}
    with tracing.tool_call("lookup_order", {"session_id": "s"}) as call:
        assert call.meta["session_id"] == "s" and "traceparent" in call.meta

    class Result:
        is_error = True

    with tracing.tool_call("lookup_order") as call:
        call.result(Result())
    with pytest.raises(TimeoutError), tracing.tool_call("lookup_order"):
        raise TimeoutError
    assert count("ok") == before["ok"] + 1
    assert count("error") == before["error"] + 1
    assert count("timeout") == before["timeout"] + 1
    statuses = [s.status.status_code for s in spans.get_finished_spans()]
    assert statuses == [StatusCode.UNSET, StatusCode.ERROR, StatusCode.ERROR]


async def test_db_query_spans_from_asyncpg_inside_traced_work_only(
    spans: InMemorySpanExporter, settings
):
    from fleet.database import connect

    conn = await connect(settings, "fleet-tracing-test")  # after configure: logger attached
    try:
        await conn.fetchval("SELECT 1")  # outside any span: nothing recorded
        with tracing.span("customer_data.lookup_order") as parent:
            await conn.fetchval("SELECT pg_sleep(0.05), $1::text", "secret-argument")
            await asyncio.sleep(0)  # asyncpg reports the query with call_soon
    finally:
        await conn.close()
    queries = [s for s in spans.get_finished_spans() if s.name == "db.query"]
    assert len(queries) == 1
    query = queries[0]
    assert query.parent.span_id == parent.get_span_context().span_id
    assert "pg_sleep" in query.attributes["db.statement"]
    assert "secret-argument" not in str(dict(query.attributes))
    assert (query.end_time - query.start_time) / 1e9 >= 0.05


async def test_traced_model_records_a_span_tokens_and_cost(spans: InMemorySpanExporter):
    from agents import ModelResponse, Usage

    from fleet.offline_model import OfflineSupportPolicy

    class Fixed(OfflineSupportPolicy):
        async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
            return ModelResponse(
                output=[], usage=Usage(requests=1, input_tokens=1200, output_tokens=300),
                response_id=None,
            )  # fmt: skip

    model = tracing.traced_model(Fixed(), "gpt-4.1-mini")
    tokens_in = metrics.MODEL_TOKENS.labels("input")._value.get()
    cost = metrics.MODEL_COST._value.get()
    with tracing.span("fleet.turn"):
        await model.get_response(
            None, "hi", None, [], None, [], None,
            previous_response_id=None, conversation_id=None, prompt=None,
        )  # fmt: skip
    assert metrics.MODEL_TOKENS.labels("input")._value.get() - tokens_in == 1200
    assert metrics.MODEL_COST._value.get() - cost == pytest.approx((1200 * 0.40 + 300 * 1.60) / 1e6)
    call = next(s for s in spans.get_finished_spans() if s.name == "fleet.model_call")
    assert call.attributes["gen_ai.usage.output_tokens"] == 300
    assert call.attributes["gen_ai.request.model"] == "gpt-4.1-mini"


# -- OTLP over HTTP -----------------------------------------------------------------------------


class _Collector:
    """A minimal OTLP/HTTP trace receiver: decodes what exporters POST to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                    ExportTraceServiceRequest,
                )

                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = next(
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    )
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            collector.spans.append(
                                {
                                    "service": service,
                                    "name": span.name,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent_id": span.parent_span_id.hex(),
                                }
                            )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[_Collector]:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    receiver = _Collector()
    yield receiver
    receiver.close()


def test_spans_go_over_otlp_when_an_endpoint_is_set(
    monkeypatch: pytest.MonkeyPatch, collector: _Collector
):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "pgfleet-otlp-test")
    try:
        assert tracing.configure()
        with tracing.span("fleet.turn"), tracing.span("fleet.tool_call"):
            pass
    finally:
        tracing.shutdown()  # flushes the batch
    names = {(s["service"], s["name"]) for s in collector.spans}
    assert names == {("pgfleet-otlp-test", "fleet.turn"), ("pgfleet-otlp-test", "fleet.tool_call")}


def _by_name(finished: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


# -- acceptance: one turn, one trace, worker and MCP server ---------------------------------------


class _McpServerThread:
    """The real customer-data server (streamable HTTP, bearer auth) in its own thread and event
    loop: nothing but the request's ``_meta`` can carry the worker's trace context into it."""

    def __init__(self, settings: Any, port: int) -> None:
        import uvicorn

        from mcp_customer_data.server import create_app

        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning",
            lifespan="on",
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="mcp-server", daemon=True)

    async def __aenter__(self) -> _McpServerThread:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive(), "the MCP server thread died"
            assert time.monotonic() < deadline, "the MCP server did not start"
            await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await asyncio.to_thread(self.thread.join, 30)


async def test_one_turn_calling_a_tool_is_one_trace_across_worker_and_mcp_server(
    spans: InMemorySpanExporter, settings, conn
):
    from pydantic import SecretStr

    from fleet.database import connect
    from fleet.seed import seed_database
    from fleet.seed_corpus import build_corpus
    from fleet.turn import AgentHandler
    from fleet.worker import Worker
    from tests.scrape import free_port

    port = free_port()
    cfg = settings.model_copy(
        update={
            "customer_data_url": f"http://127.0.0.1:{port}/mcp",
            "customer_data_token": SecretStr("trace-test-token"),
        }
    )
    corpus = build_corpus()  # every customer and order, a few cases to search (fast to embed)
    seed_conn = await connect(cfg, "fleet-seed", vector=True)
    try:
        await seed_database(
            seed_conn, cfg, corpus.model_copy(update={"tickets": corpus.tickets[:6]})
        )
    finally:
        await seed_conn.close()
    spans.clear()  # seeding is not part of the turn
    async with _McpServerThread(cfg, port):
        message_id = await conn.fetchval(
            "SELECT fleet.enqueue(session_id => 'trace-1', customer_id => 'cus-1001', "
            "body => 'My order #4429 arrived damaged and the box was crushed. What can you do?')"
        )
        worker = Worker(cfg, AgentHandler(cfg), concurrency=1, drain=True)
        await asyncio.wait_for(worker.run(), timeout=120)
    row = await conn.fetchrow("SELECT state, reply, error FROM fleet.messages WHERE id = $1",
                              message_id)  # fmt: skip
    assert row["state"] == "done", row["error"]

    finished = spans.get_finished_spans()
    turns = _by_name(finished, "fleet.turn")
    assert len(turns) == 1
    turn = turns[0]
    assert turn.attributes["fleet.message_id"] == message_id
    trace = [s for s in finished if s.context.trace_id == turn.context.trace_id]
    by_id = {s.context.span_id: s for s in trace}

    # Worker side: model calls and the tool call, under the turn.
    assert _by_name(trace, "fleet.model_call")
    tool_calls = [s for s in trace if s.name == "fleet.tool_call lookup_order"]
    assert len(tool_calls) == 1 and tool_calls[0].kind == SpanKind.CLIENT

    # Server side: its span's parent is the worker's tool-call span (via _meta), and the
    # server's database work hangs under it.
    served = _by_name(trace, "customer_data.lookup_order")
    assert len(served) == 1
    server_span = served[0]
    assert server_span.kind == SpanKind.SERVER
    assert server_span.parent.span_id == tool_calls[0].context.span_id
    assert server_span.parent.is_remote  # extracted from the request, not inherited
    queries = [s for s in trace if s.name == "db.query" and s.parent.span_id
               == server_span.context.span_id]  # fmt: skip
    # (The first may be asyncpg's type introspection: the read returns an array of records.)
    assert any("from orders" in q.attributes["db.statement"].lower() for q in queries)
    # Every span of the trace chains up to the turn: one trace, no orphans.
    for span in trace:
        node = span
        while node.parent is not None:
            node = by_id[node.parent.span_id]
        assert node is turn, f"{span.name} does not chain up to the turn"
    # Every tool the server answered in this turn is in the same trace.
    server_spans = [s for s in finished if s.kind == SpanKind.SERVER]
    assert server_spans and all(s.context.trace_id == turn.context.trace_id for s in server_spans)


@pytest.mark.slow
async def test_real_processes_export_one_joined_trace_over_otlp(
    collector: _Collector, fleet_env, settings, conn, tmp_path
):
    """`fleet worker` and `fleet mcp serve` as OS processes, each exporting OTLP/HTTP: the
    collector receives one trace with spans from both services."""
    from fleet.database import connect
    from fleet.seed import seed_database
    from fleet.seed_corpus import build_corpus
    from tests.processes import start_fleet, stop, wait_until
    from tests.scrape import free_port

    corpus = build_corpus()
    seed_conn = await connect(settings, "fleet-seed", vector=True)
    try:
        await seed_database(
            seed_conn, settings, corpus.model_copy(update={"tickets": corpus.tickets[:6]})
        )
    finally:
        await seed_conn.close()
    port = free_port()
    env = {
        **fleet_env,
        "CUSTOMER_DATA_URL": f"http://127.0.0.1:{port}/mcp",
        "CUSTOMER_DATA_TOKEN": "otlp-test-token",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    env.pop("OTEL_SERVICE_NAME", None)
    server = start_fleet("mcp", "serve", "--port", str(port), env=env, log=tmp_path / "mcp.log")
    worker = start_fleet(
        "worker", "--handler", "agent", "--concurrency", "1", env=env, log=tmp_path / "w.log"
    )
    try:
        message_id = await conn.fetchval(
            "SELECT fleet.enqueue(session_id => 'otlp-1', customer_id => 'cus-1001', "
            "body => 'My order #4429 arrived damaged and the box was crushed. What can you do?')"
        )
        await wait_until(
            lambda: conn.fetchval(
                "SELECT state IN ('done', 'dead') FROM fleet.messages WHERE id = $1", message_id
            ),
            timeout=180,
            message="the turn to finish",
        )
        assert (
            await conn.fetchval("SELECT state FROM fleet.messages WHERE id = $1", message_id)
            == "done"
        ), (tmp_path / "w.log").read_text()[-3000:]

        async def exported() -> bool:  # batches leave every 200 ms (OTEL_BSP_SCHEDULE_DELAY)
            names = {s["name"] for s in collector.spans}
            return {"fleet.turn", "customer_data.lookup_order"} <= names

        await wait_until(exported, timeout=30, message="both processes' spans at the collector")
    finally:
        stop(worker)
        stop(server)
    spans = collector.spans
    turn = next(s for s in spans if s["name"] == "fleet.turn")
    trace = [s for s in spans if s["trace_id"] == turn["trace_id"]]
    services = {s["service"] for s in trace}
    assert services == {"pgfleet-worker", "pgfleet-customer-data"}, services
    call = next(s for s in trace if s["name"] == "fleet.tool_call lookup_order")
    served = next(s for s in trace if s["name"] == "customer_data.lookup_order")
    assert served["service"] == "pgfleet-customer-data"
    assert served["parent_id"] == call["span_id"]
    assert any(s["name"] == "db.query" and s["parent_id"] == served["span_id"] for s in trace), (
        "the server's queries are under its tool span"
    )
