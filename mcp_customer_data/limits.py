"""Per-token request rate and concurrency limits for the customer-data server (ASGI middleware).

Why: every tool call is a database query (``issue_refund`` a write), and the server's pool is
small on purpose. A burst from one client (a fleet scaled up at once, a runaway loop, a leaked
token) must not swamp the database or starve other clients. Each bearer token gets

* a token bucket: ``CUSTOMER_DATA_RATE_LIMIT`` requests per second on average, up to
  ``CUSTOMER_DATA_RATE_BURST`` at once;
* at most ``CUSTOMER_DATA_MAX_CONCURRENCY`` requests in flight.

Past either, the request is answered at once with HTTP 429, a ``Retry-After`` header (whole
seconds, as HTTP wants) and a JSON-RPC error body whose ``data.retry_after`` is the precise
wait in seconds, so an MCP client surfaces it as an ordinary error that says how long to wait
(``fleet.mcp_client`` honours it). The limit runs before authentication: a request without a
valid token is limited under its own key and then refused by the auth layer, so guessing
tokens cannot use up the real token's budget. Keys are SHA-256 digests of the Authorization
header (the token itself is never kept), and at most ``MAX_KEYS`` are remembered.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

#: JSON-RPC error code of a rate-limited request (implementation-defined server error range).
RATE_LIMITED = -32029
#: Buckets remembered at once; the least recently used are forgotten first.
MAX_KEYS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float
    in_flight: int = 0


@dataclass
class TokenLimits:
    """The bookkeeping, separate from ASGI so it is easy to reason about (and test)."""

    rate: float
    burst: int
    concurrency: int
    clock: Any = time.monotonic
    _buckets: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict)

    def _bucket(self, key: str) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), updated=self.clock())
            self._buckets[key] = bucket
            while len(self._buckets) > MAX_KEYS:
                oldest, old = next(iter(self._buckets.items()))
                if old.in_flight:  # never forget a key with requests still running
                    self._buckets.move_to_end(oldest)
                    break
                del self._buckets[oldest]
        else:
            self._buckets.move_to_end(key)
        return bucket

    def acquire(self, key: str) -> float | None:
        """Admit one request (None) or say how many seconds to wait before trying again."""
        bucket = self._bucket(key)
        if self.concurrency and bucket.in_flight >= self.concurrency:
            return 0.1  # a slot frees when a running request ends: try again shortly
        if self.rate:
            now = self.clock()
            refill = (now - bucket.updated) * self.rate
            bucket.tokens = min(float(self.burst), bucket.tokens + refill)
            bucket.updated = now
            if bucket.tokens < 1.0:
                return (1.0 - bucket.tokens) / self.rate
            bucket.tokens -= 1.0
        bucket.in_flight += 1
        return None

    def release(self, key: str) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1


def _key(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return hashlib.sha256(value).hexdigest()
    return "anonymous"


class RateLimitMiddleware:
    """ASGI middleware applying :class:`TokenLimits` to every HTTP request."""

    def __init__(self, app: ASGIApp, *, rate: float, burst: int, concurrency: int) -> None:
        self.app = app
        self.limits = TokenLimits(rate=rate, burst=max(burst, 1), concurrency=concurrency)
        self.rejected = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (not self.limits.rate and not self.limits.concurrency):
            await self.app(scope, receive, send)
            return
        key = _key(scope)
        wait = self.limits.acquire(key)
        if wait is not None:
            self.rejected += 1
            await _too_many(send, wait)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limits.release(key)


async def _too_many(send: Send, wait: float) -> None:
    body = json.dumps({
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": RATE_LIMITED,
            "message": f"rate limited: too many requests for this token; retry after {wait:.2f}s",
            "data": {"retry_after": round(wait, 3)},
        },
    }).encode()
    await send({
        "type": "http.response.start",
        "status": 429,
        "headers": [
            (b"content-type", b"application/json"),
            (b"retry-after", str(max(1, math.ceil(wait))).encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    })
    await send({"type": "http.response.body", "body": body})
