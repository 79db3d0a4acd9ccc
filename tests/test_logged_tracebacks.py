"""The chaos suites' crash check (``tests.logged_tracebacks``, used by ``_assert_no_crash``):
it tolerates the tracebacks of handled failures it knows, and nothing else. Fast: the logs are
written here by real ``logging`` calls in the fleet's format, from real raised chains."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from fleet.mcp_client import CustomerDataUnavailable
from fleet.mcp_wire import _Stale
from tests.logged_tracebacks import resolve, tracebacks, untolerated
from tests.test_chaos import MCP_SERVER_TOLERATED, WORKER_TOLERATED, _assert_no_crash


@contextmanager
def _captured() -> Iterator[io.StringIO]:
    """Everything logged meanwhile, as ``fleet.cli.app.setup_logging`` formats it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)


def _log(logger: str, message: str, exc: BaseException) -> str:
    """``message`` logged by ``logger`` with ``exc``'s traceback, after an unrelated line."""
    with _captured() as out:
        logging.getLogger("fleet.worker").warning("took over 1 messages with expired leases")
        try:
            raise exc
        except BaseException:
            logging.getLogger(logger).error(message, exc_info=True)
    return out.getvalue()


def _raised(fn) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def _unavailable(cause: BaseException) -> CustomerDataUnavailable:
    """The pool's give-up, chained from a transport failure (as ``_with_client`` raises it)."""
    def give_up() -> None:
        try:
            raise cause
        except BaseException as exc:
            raise CustomerDataUnavailable("customer-data MCP server: call failed") from exc
    return _raised(give_up)  # type: ignore[return-value]


def _timed_out() -> BaseException:
    """A TimeoutError caused by a CancelledError, as ``asyncio.wait_for`` raises it."""
    def time_out() -> None:
        try:
            raise asyncio.CancelledError()
        except asyncio.CancelledError as exc:
            raise TimeoutError() from exc
    return _raised(time_out)


def _stale() -> BaseException:
    def reconnect() -> None:
        try:
            raise _Stale()
        except _Stale:
            raise ConnectionResetError("the MCP server closed a new connection") from None
    return _raised(reconnect)


MCP_ERROR = "Error invoking MCP tool get_order on server 'customer-data'"
POOL_FLOOR = "Failed to restore the pool connection floor; retrying"


def test_handled_failures_are_tolerated() -> None:
    logs = "".join([
        _log("openai.agents", MCP_ERROR, _unavailable(_timed_out())),
        _log("openai.agents", MCP_ERROR, _unavailable(_stale())),
        _log("openai.agents", "Error invoking MCP tool", _unavailable(ConnectionRefusedError(111))),
        _log("asyncpg.pool", POOL_FLOOR, OSError("Multiple exceptions: [Errno 111] Connect call")),
        _log("asyncpg.pool", POOL_FLOOR, asyncpg.CannotConnectNowError("starting up")),
        _log("asyncpg.pool", POOL_FLOOR, _raised(lambda: asyncio.run(_refused_in_group()))),
    ])
    found = tracebacks(logs)
    assert [tb.logger for tb in found] == ["openai.agents"] * 3 + ["asyncpg.pool"] * 3
    assert found[0].exceptions == [
        "asyncio.exceptions.CancelledError", "TimeoutError",
        "fleet.mcp_client.CustomerDataUnavailable",
    ]
    assert found[4].exceptions == ["asyncpg.exceptions.CannotConnectNowError"]
    assert {"ExceptionGroup", "ConnectionRefusedError"} <= set(found[5].exceptions)
    assert untolerated(logs, WORKER_TOLERATED) == []
    _assert_no_crash(logs)


def test_a_chain_whose_cause_has_no_frames_belongs_to_its_record() -> None:
    """asyncpg's pool logs a dropped connection as a cause with no frames (printed as a bare
    exception line right after the record), then the chained traceback. Seen in the agent
    chaos suite; the chain was counted as printed outside any record, i.e. a crash."""
    cause = ConnectionResetError(104, "Connection reset by peer")  # never raised: no frames

    def drop() -> None:
        raise asyncpg.ConnectionDoesNotExistError("connection was closed") from cause

    logs = _log("asyncpg.pool", POOL_FLOOR, _raised(drop))
    [found] = tracebacks(logs)
    assert (found.logger, found.message) == ("asyncpg.pool", POOL_FLOOR)
    assert found.exceptions == [
        "ConnectionResetError", "asyncpg.exceptions.ConnectionDoesNotExistError",
    ]
    assert untolerated(logs, WORKER_TOLERATED) == []


async def _refused_in_group() -> None:
    async def refuse() -> None:
        raise ConnectionRefusedError(111, "Connect call failed")

    async with asyncio.TaskGroup() as group:
        group.create_task(refuse())


def test_a_bug_behind_a_tolerated_line_is_a_crash() -> None:
    """The same log lines with a bug of ours raised: each is reported."""
    bugs = [
        _log("openai.agents", MCP_ERROR, TypeError("'NoneType' object is not subscriptable")),
        _log("openai.agents", MCP_ERROR, _unavailable(KeyError("message_id"))),
        _log("asyncpg.pool", POOL_FLOOR, AttributeError("'Pool' object has no attribute 'x'")),
        _log("fleet.worker", "handler crashed", ConnectionResetError()),  # not a known line
    ]
    for logs in bugs:
        assert len(untolerated(logs, WORKER_TOLERATED)) == 1, logs
        try:
            _assert_no_crash(logs)
        except AssertionError:
            continue
        raise AssertionError(f"not reported: {logs}")


def test_a_traceback_outside_a_record_is_a_crash() -> None:
    """A traceback printed to stderr (no log record before it) is never tolerated, even after
    a tolerated record's traceback."""
    tolerated = _log("asyncpg.pool", POOL_FLOOR, asyncpg.CannotConnectNowError("starting up"))
    stray = "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    f()\n" \
            "ConnectionRefusedError: [Errno 111]\n"
    assert untolerated(tolerated, WORKER_TOLERATED) == []
    assert len(untolerated(tolerated + "something else printed\n" + stray,
                           WORKER_TOLERATED)) == 1


def test_mcp_server_log_tolerates_only_client_disconnect() -> None:
    from starlette.requests import ClientDisconnect

    gone = _log("mcp.server.streamable_http", "Error handling POST request", ClientDisconnect())
    assert tracebacks(gone)[0].exceptions == ["starlette.requests.ClientDisconnect"]
    assert untolerated(gone, MCP_SERVER_TOLERATED) == []
    bug = _log("mcp.server.streamable_http", "Error handling POST request",
               _raised(lambda: _disconnect_then(ClientDisconnect)))
    assert len(untolerated(bug, MCP_SERVER_TOLERATED)) == 1


def _disconnect_then(disconnect: type[BaseException]) -> None:
    """A bug while handling a disconnect: the chain names ClientDisconnect, then a TypeError."""
    try:
        raise disconnect()
    except disconnect:
        raise TypeError("unsupported operand")  # noqa: B904 (the implicit chain is the point)


def test_names_resolve_to_classes() -> None:
    assert resolve("ConnectionRefusedError") is ConnectionRefusedError
    assert resolve("asyncpg.exceptions.CannotConnectNowError") is asyncpg.CannotConnectNowError
    assert resolve("fleet.mcp_client.CustomerDataUnavailable") is CustomerDataUnavailable
    assert resolve("no.such.Error") is None and resolve("<unparsed 'x'>") is None
