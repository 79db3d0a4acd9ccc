"""Acceptance 6: the OpenAI-compatible path, end to end, against a local chat-completions stub.

A small server in this process speaks the chat-completions protocol: asked first, it answers
with a tool call (``lookup_order``); asked again with the tool's result in the conversation, it
answers with text built from that result. A real ``fleet worker --handler agent`` process with
``FLEET_MODEL``/``OPENAI_BASE_URL`` pointing at it runs the turn: the SDK's chat-completions
model, the real MCP server over HTTP for the tool, the database for memory and audit.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fleet import queue
from fleet.settings import Settings
from tests.processes import fleet_json, start_fleet, stop, wait_until
from tests.test_agent_turn import _free_port, _port_open, seeded_template  # noqa: F401

API_KEY = "stub-key-not-a-secret"


class ChatStub:
    """Chat completions: a tool call first, then a reply quoting the tool's result."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.port = _free_port()
        app = Starlette(routes=[Route("/v1/chat/completions", self.complete, methods=["POST"])])
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def complete(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("authorization"))
        tool_results = [m for m in body["messages"] if m.get("role") == "tool"]
        if not tool_results:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{
                    "id": f"call_stub_{uuid.uuid4().hex[:8]}",
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": '{"order_id": "4429"}'},
                }],
            }
            finish = "tool_calls"
        else:
            content = tool_results[-1]["content"]
            if isinstance(content, list):  # content parts are legal too
                content = "".join(part.get("text", "") for part in content)
            order = json.loads(content)
            message = {
                "role": "assistant",
                "content": f"Stub model: order {order['order_id']} is {order['status']}, "
                           f"paid {order['amount_cents']} cents.",
            }
            finish = "stop"
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:8]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 15, "total_tokens": 135},
        })

    def __enter__(self) -> ChatStub:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not _port_open(self.port):
            assert time.monotonic() < deadline, "stub server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def stub() -> Iterator[ChatStub]:
    with ChatStub() as running:
        yield running


async def test_openai_compatible_model_drives_a_tool_call_end_to_end(
    stub: ChatStub, server_url: str, seeded_template: str, fleet_home: Path, tmp_path: Path,  # noqa: F811
) -> None:
    from fleet.database import connect
    from tests.conftest import _admin, _with_database
    from tests.test_agent_turn import _base_env

    name = f"t_wire_{uuid.uuid4().hex[:10]}"
    await _admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{seeded_template}"')
    url = _with_database(server_url, name)
    mcp_port = _free_port()
    env = _base_env(url, fleet_home, mcp_port)
    env.update(
        FLEET_MODEL="stub-model",
        OPENAI_BASE_URL=f"http://127.0.0.1:{stub.port}/v1",
        OPENAI_API_KEY=API_KEY,
    )
    mcp = start_fleet("mcp", "serve", "--port", str(mcp_port), env=env, log=tmp_path / "mcp.log")
    worker = start_fleet("worker", "--handler", "agent", env=env, log=tmp_path / "worker.log")
    conn: asyncpg.Connection = await connect(Settings(database_url=url), "fleet-test", url=url)
    try:
        message_id = await queue.enqueue(conn, "wire-1", "What's the status of order #4429?")

        async def done() -> Any:
            row = await conn.fetchrow(
                "SELECT state, reply, error FROM fleet.messages WHERE id = $1", message_id)
            assert row["state"] != "dead", row["error"]
            return row["reply"] if row["state"] == "done" else None

        reply = await wait_until(done, timeout=180, message="the stub-driven reply")
        order = await conn.fetchrow("SELECT status, amount_cents FROM orders WHERE id = '4429'")
        assert reply == (f"Stub model: order 4429 is {order['status']}, "
                         f"paid {order['amount_cents']} cents.")

        # The wire: two chat-completions requests, with the key, the tools and the tool result.
        assert len(stub.requests) == 2
        assert stub.auth == [f"Bearer {API_KEY}"] * 2
        first, second = stub.requests
        assert first["model"] == "stub-model"
        tools = {t["function"]["name"] for t in first["tools"]}
        assert tools == {"load_skill", "lookup_customer", "find_customer_by_email",
                         "lookup_order", "find_similar_resolved_tickets", "issue_refund"}
        system = first["messages"][0]
        assert system["role"] == "system" and "summarize-ticket" in system["content"]
        assert first["messages"][-1] == {"role": "user",
                                         "content": "What's the status of order #4429?"}
        tool_message = next(m for m in second["messages"] if m["role"] == "tool")
        assert isinstance(tool_message["content"], str)  # plain JSON text: every server takes it
        assert json.loads(tool_message["content"])["order_id"] == "4429"

        # The run went through the real MCP server and left its trail.
        trace = fleet_json("trace", "wire-1", env=env)
        actions = [(r["action"], r["target"]) for r in trace["audit"]]
        assert actions == [("message_received", "conversation:wire-1"),
                           ("capability_invoked", "mcp:lookup_order"),
                           # the server's own row for the order it read (run variables too)
                           ("customer_data_read", "mcp:lookup_order"),
                           ("message_sent", "conversation:wire-1")]
        sent = trace["audit"][-1]["payload"]
        assert sent["model"] == "stub-model" and sent["model_calls"] == 2
        assert sent["input_tokens"] == 240 and sent["output_tokens"] == 30
    finally:
        await conn.close()
        stop(worker)
        stop(mcp)
        await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_stub_answers_like_the_protocol() -> None:
    """The stub itself, through the official client (so a failure above is not the stub's)."""
    from openai import OpenAI

    with ChatStub() as running:
        client = OpenAI(base_url=f"http://127.0.0.1:{running.port}/v1", api_key=API_KEY)
        answer = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
        call = answer.choices[0].message.tool_calls[0]
        assert call.function.name == "lookup_order"
        assert asyncio.iscoroutinefunction(running.complete)
