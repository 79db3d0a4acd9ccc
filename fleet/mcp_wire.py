"""MCP's streamable HTTP, as the worker uses it: one JSON-RPC request per POST on a kept-alive
HTTP/1.1 connection.

Why not the MCP SDK's client for every call: measured per ``tools/call`` against the real
server (in-process, 8 concurrent calls, uvloop), the SDK's ``ClientSession`` over its streamable
HTTP transport took 2.5 ms of CPU (a task group and memory streams per request, a JSON-RPC
dispatcher, httpx2 -> httpcore2 -> h11 -> anyio), httpx2 alone 1.7 ms, this module 0.45 ms
(the result parsed into the same ``mcp.types`` model and checked against the same compiled
output schema in all three). A turn makes two such calls, and the worker's CPU per turn is the
fleet's throughput.

What the server speaks, and so what this does: the customer-data server is stateless with JSON
responses (``mcp_customer_data.server``): every request is an independent POST answered with one
``application/json`` body, no ``Mcp-Session-Id``. The pool agrees on the protocol once, the way
the SDK client's default ``mode="auto"`` does (``fleet.mcp_client``): a ``server/discover``
probe at the 2026-07-28 revision, else the ``initialize`` handshake. On the 2026 revision every
request carries its envelope (protocol version, client info and capabilities in
``params._meta``; ``Mcp-Method`` and, for a tool call, ``Mcp-Name`` headers), and the SDK's
server answers each POST in one pass, without the per-request transport, task group and
dispatcher of its handshake-era stateless path (~0.7 ms less server CPU per call,
BENCHMARKS.md); on the handshake era the version goes in the ``MCP-Protocol-Version`` header
of every request. A
``text/event-stream`` answer (another server, or a future one) is read to its end and the
response to our request id taken from it; chunked bodies are decoded. A connection the server
closed while it sat idle (keep-alive timeout) is noticed on its next use, before any byte of
an answer arrived, and the request is sent once more on a new connection: nothing was read,
and ``issue_refund`` is idempotent on its key anyway.

Errors: a JSON-RPC error (including the server's 429, whose ``data.retry_after`` says how long
to wait) raises ``mcp.shared.exceptions.MCPError``; any other non-2xx answer raises
:class:`HTTPStatusError` with the status and ``Retry-After``. The bearer token is only ever in
the request head, never in an exception's text.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import NAME_BEARING_METHODS, encode_header_value
from mcp_types import CLIENT_CAPABILITIES_META_KEY, CLIENT_INFO_META_KEY, PROTOCOL_VERSION_META_KEY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from fleet import json_codec

#: A connection idle for longer is closed instead of reused: uvicorn closes idle keep-alive
#: connections after 5 s by default, and a request on a closing socket has to be sent twice.
IDLE_SECONDS = 4.0
#: Longest response head read (status line + headers).
MAX_HEAD = 64 * 1024


class HTTPStatusError(Exception):
    """The server answered with a non-2xx status and no JSON-RPC error in the body."""

    def __init__(self, status_code: int, retry_after: str | None, text: str) -> None:
        super().__init__(f"HTTP {status_code} from the MCP server: {text[:200]}")
        self.status_code = status_code
        self.retry_after = retry_after


class _Stale(Exception):
    """A reused connection was closed by the server before it answered."""


class Endpoint:
    """Where and how to POST: the URL's parts, the request head's fixed lines, TLS."""

    def __init__(
        self, url: str, headers: dict[str, str], ssl_context: ssl.SSLContext | None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl_context if parts.scheme == "https" else None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._fixed = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        )
        #: The agreed protocol revision (None until agreed; see :meth:`adopt`).
        self.protocol_version: str | None = None
        self._envelope: dict[str, Any] | None = None

    def adopt(self, version: str) -> None:
        """Speak ``version`` from now on: a 2026 revision stamps every request with its
        envelope (:meth:`stamp`), a handshake-era one only sends the version header."""
        self.protocol_version = version
        self._envelope = {
            PROTOCOL_VERSION_META_KEY: version,
            CLIENT_INFO_META_KEY: CLIENT_INFO,
            CLIENT_CAPABILITIES_META_KEY: {},
        } if version in MODERN_PROTOCOL_VERSIONS else None

    @property
    def modern(self) -> bool:
        """Whether requests carry the 2026 per-request envelope."""
        return self._envelope is not None

    def stamp(
        self, method: str, params: dict[str, Any] | None
    ) -> tuple[dict[str, Any] | None, str]:
        """A request's params and extra head lines for the agreed revision: on the 2026 one,
        the envelope merged into ``params._meta`` (the caller's keys kept) and the routing
        headers the server checks against the body."""
        if self._envelope is None:
            return params, ""
        params = dict(params or {})
        params["_meta"] = {**(params.get("_meta") or {}), **self._envelope}
        lines = f"Mcp-Method: {method}\r\n"
        name_key = NAME_BEARING_METHODS.get(method)
        if name_key is not None and isinstance(name := params.get(name_key), str):
            lines += f"Mcp-Name: {encode_header_value(name)}\r\n"
        return params, lines

    def head(self, length: int, extra: str = "") -> bytes:
        version = (
            f"MCP-Protocol-Version: {self.protocol_version}\r\n" if self.protocol_version else ""
        )
        return (
            f"{self._fixed}{version}{extra}Content-Length: {length}\r\n\r\n".encode("latin-1")
        )


#: Who the worker says it is, in the handshake and in every 2026-revision envelope.
CLIENT_INFO = {"name": "fleet-worker", "version": "1"}


class Connection:
    """One HTTP/1.1 connection, used by one request at a time (the pool sees to that)."""

    def __init__(self, endpoint: Endpoint, connect_timeout: float) -> None:
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = 0
        self.idle_since = time.monotonic()

    async def connect(self) -> None:
        self.close()
        e = self.endpoint
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(
                e.host, e.port, ssl=e.ssl, server_hostname=e.host if e.ssl else None,
                limit=MAX_HEAD,
            ),
            timeout=self.connect_timeout,
        )

    @property
    def usable(self) -> bool:
        return (
            self._writer is not None
            and not self._writer.is_closing()
            and self._reader is not None
            and not self._reader.at_eof()
            and time.monotonic() - self.idle_since < IDLE_SECONDS
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(
        self, method: str, params: dict[str, Any] | None = None, extra_head: str = ""
    ) -> dict[str, Any]:
        """Send one JSON-RPC request, stamped for the agreed revision (``extra_head``: more
        header lines, each ending in CRLF); its ``result`` (or raise)."""
        self._ids += 1
        params, lines = self.endpoint.stamp(method, params)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self._ids, "method": method}
        if params is not None:
            message["params"] = params
        body = json_codec.dumps_bytes(message)
        lines += extra_head
        if not self.usable:
            await self.connect()
            fresh = True
        else:
            fresh = False
        try:
            status, headers, data = await self._exchange(body, lines)
        except _Stale:
            if fresh:
                raise ConnectionResetError("the MCP server closed a new connection") from None
            await self.connect()
            status, headers, data = await self._exchange(body, lines)
        self.idle_since = time.monotonic()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return _result(status, headers, data, self._ids)

    async def _exchange(self, body: bytes, lines: str) -> tuple[int, dict[str, str], bytes]:
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        try:
            writer.write(self.endpoint.head(len(body), lines) + body)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close()
            if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                raise ConnectionResetError(
                    "the MCP server closed the connection mid-answer"
                ) from exc
            raise _Stale() from exc
        except BaseException:
            self.close()  # cancelled or timed out mid-exchange: the stream's state is unknown
            raise
        try:
            lines = head[:-4].decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                data = await _read_chunked(reader)
            elif "content-length" in headers:
                data = await reader.readexactly(int(headers["content-length"]))
            else:
                data = await reader.read()
                headers["connection"] = "close"
        except BaseException:
            self.close()
            raise
        return status, headers, data


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _result(status: int, headers: dict[str, str], data: bytes, request_id: int) -> dict[str, Any]:
    message: Any = None
    kind = headers.get("content-type", "")
    try:
        if kind.startswith("text/event-stream"):
            message = _from_events(data, request_id)
        elif data:
            message = json.loads(data)
    except ValueError:
        message = None
    if isinstance(message, dict) and isinstance(message.get("error"), dict):
        error = message["error"]
        raise MCPError(
            int(error.get("code", -32603)), str(error.get("message", "")), error.get("data")
        )
    if not 200 <= status < 300:
        raise HTTPStatusError(status, headers.get("retry-after"), data.decode(errors="replace"))
    if not isinstance(message, dict) or not isinstance(message.get("result"), dict):
        raise MCPError(-32603, f"not a JSON-RPC result from the MCP server: {data[:200]!r}")
    return message["result"]


def _from_events(data: bytes, request_id: int) -> Any:
    """The JSON-RPC response to ``request_id`` in a server-sent event stream."""
    for event in data.decode().replace("\r\n", "\n").split("\n\n"):
        lines = [line[5:].lstrip() for line in event.split("\n") if line.startswith("data:")]
        if not lines:
            continue
        message = json.loads("\n".join(lines))
        if isinstance(message, dict) and message.get("id") == request_id:
            return message
    return None
