"""Property-based bad input for the approver CLI and the customer-data MCP tools.

Each bad input must get one clear sentence (stderr and a non-zero exit for the CLI, a tool error
for MCP), must never show a traceback, and must write nothing. The "writes nothing" half is
checked against a snapshot of the tables the command could touch, taken before and after.

The approver CLI runs in-process through ``fleet.cli.main`` (the console script's own entry
point) so hypothesis can try many examples; a handful of fixed cases run the real ``fleet``
executable in a subprocess. Command-line arguments cannot carry NUL bytes (execve refuses
them), so the CLI strategies leave NUL out; ``fleet.enqueue``'s NUL handling is in
tests/test_enqueue_properties.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import uuid
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.database import connect
from fleet.settings import Settings
from tests.processes import fleet

# -- the approver CLI -------------------------------------------------------------------------

INJECTIONS = [
    "' OR '1'='1",
    "'; DROP TABLE run_states; --",
    "00000000-0000-0000-0000-000000000000' OR true --",
    "1; UPDATE run_states SET status = 'approved'",
    "$$; DELETE FROM audit_log; $$",
    "\\x27",
    "%",
    "*",
]
argv_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
                    max_size=80)


@dataclass
class Approvals:
    awaiting: str
    decided: str
    expired: str
    loop: asyncio.AbstractEventLoop
    conn: Any
    url: str

    def snapshot(self) -> tuple:
        async def read() -> tuple:
            states = await self.conn.fetch(
                "SELECT id, status, decision, decided_by, decision_note, resumed_at"
                " FROM run_states ORDER BY id")
            messages = await self.conn.fetch(
                "SELECT id, state, run_after FROM fleet.messages ORDER BY id")
            audit = await self.conn.fetchval("SELECT count(*) FROM audit_log")
            return [tuple(r) for r in states], [tuple(r) for r in messages], audit

        return self.loop.run_until_complete(read())


async def _park(conn: Any, session: str, *, expires: str, decided: bool = False) -> str:
    message_id = await conn.fetchval("SELECT fleet.enqueue(session_id => $1, body => 'refund')",
                                     session)
    await conn.execute("UPDATE fleet.messages SET state = 'awaiting_approval' WHERE id = $1",
                       message_id)
    await conn.execute("INSERT INTO conversations (session_id, user_id) VALUES ($1, 'c1')"
                       " ON CONFLICT DO NOTHING", session)
    approval = await conn.fetchval(
        f"""INSERT INTO run_states (conversation_id, message_id, tool, arguments, call_id, state,
                                    requested_at, expires_at)
            VALUES ($1, $2::bigint, 'issue_refund', '{{"order_id": "4429", "amount_cents": 500}}',
                    'call-' || $2::text, '{{}}', now() - interval '2 hours',
                    now() + interval '{expires}')
            RETURNING id::text""", session, message_id)
    if decided:
        await conn.execute(
            """UPDATE run_states SET status = 'approved', decision = 'approved',
                   decided_by = 'grace', decided_at = now() WHERE id = $1::uuid""", approval)
        await conn.execute("UPDATE fleet.messages SET state = 'queued' WHERE id = $1",
                           message_id)
    return approval


@pytest.fixture
def approvals(db_url):
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(connect(Settings(database_url=db_url), "fleet-test",
                                           url=db_url))

    async def setup() -> Approvals:
        await conn.execute("INSERT INTO customers (id, email, name) VALUES ('c1', 'c@x.io', 'C');"
                           "INSERT INTO orders (id, customer_id, amount_cents, status)"
                           " VALUES ('4429', 'c1', 5000, 'paid')")
        return Approvals(
            awaiting=await _park(conn, "s-awaiting", expires="1 hour"),
            decided=await _park(conn, "s-decided", expires="1 hour", decided=True),
            expired=await _park(conn, "s-expired", expires="-1 hour"),
            loop=loop, conn=conn, url=db_url)

    yield loop.run_until_complete(setup())
    loop.run_until_complete(conn.close())
    loop.close()


def _cli(url: str, *args: str) -> tuple[int, str, str]:
    """``fleet ARGS`` through the console script's entry point, in this process."""
    from fleet.cli import main
    from fleet.settings import get_settings

    saved_env, saved_argv = os.environ.get("DATABASE_URL"), sys.argv
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        sys.argv = ["fleet", *args]
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = saved_env
        get_settings.cache_clear()
    return code, out.getvalue(), err.getvalue()


def _assert_clear_refusal(code: int, out: str, err: str) -> None:
    assert code != 0, out
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error message"
    assert lines[0].startswith(("error:", "Usage:", "Error:")) or "Error" in err, err
    if lines[0].startswith("error:"):
        assert len(lines) == 1, err  # one sentence, not a dump


bad_by = st.one_of(st.none(), st.sampled_from(["", "   ", "\t", "x" * 201, "fleet:expiry",
                                               "fleet:cancel"]))
good_by = st.one_of(st.sampled_from(["ada", "Grace Hopper", "o'brien", *INJECTIONS]),
                    argv_text.filter(lambda s: s.strip() != ""
                                     and not s.strip().startswith("fleet:")))
note = st.one_of(st.none(), argv_text, st.sampled_from(INJECTIONS))


@st.composite
def bad_decisions(draw: st.DrawFn) -> tuple[str, str, str | None, str | None]:
    """(verb, target, --by, --note/--reason) that must all be refused."""
    verb = draw(st.sampled_from(["approve", "reject"]))
    target = draw(st.sampled_from(["awaiting", "decided", "expired", "unknown", "text",
                                   "injection"]))
    if target == "awaiting":
        # The one decidable approval: only a missing/blank/reserved --by (or a rejection
        # without a reason) may refuse it.
        if verb == "reject" and draw(st.booleans()):
            return verb, target, draw(good_by), draw(st.sampled_from([None, "", "  "]))
        return verb, target, draw(bad_by), draw(note)
    return verb, target, draw(st.one_of(bad_by, good_by)), draw(note)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_decisions(), text_id=argv_text)
def test_approver_cli_refuses_bad_decisions_cleanly_and_changes_nothing(approvals, case,
                                                                        text_id):
    verb, target, by, text = case
    approval_id = {
        "awaiting": approvals.awaiting, "decided": approvals.decided,
        "expired": approvals.expired, "unknown": str(uuid.uuid4()), "text": text_id or " ",
        "injection": INJECTIONS[len(text_id) % len(INJECTIONS)],
    }[target]
    args = [verb, approval_id]
    if by is not None:
        args += ["--by", by]
    if text is not None:
        args += ["--note" if verb == "approve" else "--reason", text]
    before = approvals.snapshot()
    code, out, err = _cli(approvals.url, *args)
    _assert_clear_refusal(code, out, err)
    assert approvals.snapshot() == before


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(approval_id=st.one_of(argv_text, st.sampled_from(INJECTIONS), st.uuids().map(str)))
def test_approvals_show_refuses_unknown_ids_cleanly(approvals, approval_id):
    before = approvals.snapshot()
    code, out, err = _cli(approvals.url, "approvals", "show", approval_id or "-", "--json")
    _assert_clear_refusal(code, out, err)
    assert out == ""  # no half JSON document on stdout
    assert approvals.snapshot() == before


def test_approver_cli_fixed_cases_in_a_real_process(approvals, fleet_env):
    """The real executable: every refusal is one line on stderr; the good decision lands once."""
    env = dict(fleet_env, DATABASE_URL=approvals.url)
    cases = {
        ("approve", str(uuid.uuid4()), "--by", "ada"): "no approval with id",
        ("approve", "'; DROP TABLE run_states; --", "--by", "ada"): "no approval with id",
        ("approve", approvals.decided, "--by", "ada"): "already approved by grace",
        ("approve", approvals.expired, "--by", "ada"): "expired",
        ("approve", approvals.awaiting): "--by is required",
        ("approve", approvals.awaiting, "--by", "  "): "--by is required",
        ("reject", approvals.awaiting, "--by", "ada"): "needs --reason",
    }
    before = approvals.snapshot()
    for args, expected in cases.items():
        done = fleet(*args, env=env)
        assert done.returncode != 0, args
        assert expected in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert approvals.snapshot() == before
    done = fleet("approve", approvals.awaiting, "--by", "ada", env=env)
    assert done.returncode == 0, done.stderr
    again = fleet("approve", approvals.awaiting, "--by", "bob", env=env)
    assert again.returncode != 0 and "already approved by ada" in again.stderr


# -- the customer-data MCP tools, over HTTP, through the worker's own client ------------------

SQLISH = st.sampled_from([
    *INJECTIONS, "4429' OR '1'='1", "4429; DELETE FROM refunds", "4429--", "4429\u0000",
    "ada@example.com' OR 1=1 --", "\"; DROP TABLE orders; --@x.io", "ADA@EXAMPLE.COM\u0000",
    "../../etc/passwd", "${jndi:ldap://x}", "{{7*7}}", "%00", "\u202e4429",
])
any_text = st.one_of(st.text(max_size=200), SQLISH, st.just("x" * 20_000),
                     st.just(""), st.just("   "))
bad_amounts = st.one_of(
    st.integers(max_value=0),  # zero and negative
    st.integers(min_value=5001, max_value=2**31 - 1),  # more than the order's 5000 cents
    st.integers(min_value=2**31),  # past int4
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: f != int(f)
                                                          if f == f and abs(f) != float("inf")
                                                          else True),
    st.sampled_from(["100", "abc", "1e3", "", "  12 ", "0x10", "NaN", "-5"]),
    st.none(), st.booleans(), st.just([100]), st.just({"cents": 100}),
)


class MCPHarness:
    """A module-scoped server and the worker's MCP client pool on a private event loop."""

    def __init__(self, url: str, token: str, database_url: str) -> None:
        from pydantic import SecretStr

        from fleet.mcp_client import MCPClientPool

        self.loop = asyncio.new_event_loop()
        self.database_url = database_url
        cfg = Settings(database_url=database_url, customer_data_url=url,
                       customer_data_token=SecretStr(token))
        self.pool = MCPClientPool(cfg)
        self.conn = self.loop.run_until_complete(connect(cfg, "fleet-test", url=database_url))

    def call(self, tool: str, arguments: dict[str, Any]) -> tuple[bool, str]:
        """(is_error, text) of one real tools/call; a transport-level refusal counts as an
        error too, with its message."""
        async def go() -> tuple[bool, str]:
            try:
                result = await self.pool.call_tool(
                    tool, arguments, {"idempotency_key": f"prop-{uuid.uuid4()}",
                                      "session_id": "prop"})
            except Exception as exc:  # an MCP-level error (e.g. invalid params)
                from fleet.mcp_client import CustomerDataUnavailable

                assert not isinstance(exc, CustomerDataUnavailable), exc  # the server held up
                return True, str(exc)
            text = " ".join(getattr(c, "text", "") for c in result.content)
            return bool(result.is_error), text

        return self.loop.run_until_complete(go())

    def snapshot(self) -> tuple:
        async def read() -> tuple:
            refunds = await self.conn.fetchval("SELECT count(*) FROM refunds")
            orders = await self.conn.fetch("SELECT id, status, updated_at FROM orders ORDER BY id")
            audit = await self.conn.fetchval("SELECT count(*) FROM audit_log")
            customers = await self.conn.fetchval("SELECT count(*) FROM customers")
            return refunds, [tuple(r) for r in orders], audit, customers

        return self.loop.run_until_complete(read())

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


@pytest.fixture(scope="module")
def mcp(server_url, template_url, fleet_home, tmp_path_factory):
    from tests.mcp_process import _admin, module_database, module_env, running_mcp

    with module_database(server_url) as url:
        _admin(url, """
            INSERT INTO customers (id, email, name, metadata)
                VALUES ('c1', 'ada@example.com', 'Ada', '{"tier": "pro"}');
            INSERT INTO orders (id, customer_id, amount_cents, status)
                VALUES ('4429', 'c1', 5000, 'delivered');
            INSERT INTO conversations (session_id, user_id) VALUES ('prop', 'c1');""")
        log = tmp_path_factory.mktemp("mcp-props") / "mcp.log"
        with running_mcp(module_env(url, fleet_home), log,
                         CUSTOMER_DATA_RATE_LIMIT="0", CUSTOMER_DATA_MAX_CONCURRENCY="0") as srv:
            harness = MCPHarness(srv.url, srv.token, url)
            try:
                yield harness
            finally:
                harness.close()


def _assert_clear_tool_error(is_error: bool, text: str) -> None:
    assert is_error, text[:300]
    assert text.strip(), "an error without a message"
    assert "Traceback" not in text
    for leak in ("asyncpg", "syntax error", "psycopg", "pg_catalog", "SQLSTATE", "Internal"):
        assert leak not in text, text[:300]
    assert len(text) <= 2_000, f"an error message of {len(text)} characters"


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order_id=st.one_of(st.just("4429"), any_text), amount=bad_amounts,
       reason=st.one_of(st.just("damaged in transit"), any_text))
def test_issue_refund_refuses_bad_amounts_ids_and_reasons_and_moves_no_money(
    mcp, order_id, amount, reason
):
    before = mcp.snapshot()
    is_error, text = mcp.call("issue_refund", {"order_id": order_id, "amount_cents": amount,
                                               "reason": reason})
    _assert_clear_tool_error(is_error, text)
    assert mcp.snapshot() == before


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tool=st.sampled_from(["lookup_order", "lookup_customer", "find_customer_by_email"]),
       value=any_text.filter(lambda v: v.strip().lower().lstrip("#") not in
                             ("4429", "c1", "ada@example.com")))
def test_lookups_of_unknown_or_injection_shaped_ids_fail_cleanly(mcp, tool, value):
    key = {"lookup_order": "order_id", "lookup_customer": "customer_id",
           "find_customer_by_email": "email"}[tool]
    before = mcp.snapshot()
    is_error, text = mcp.call(tool, {key: value})
    _assert_clear_tool_error(is_error, text)
    assert mcp.snapshot() == before


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(description=any_text,
       limit=st.one_of(st.integers(min_value=-10**12, max_value=10**12),
                       st.sampled_from(["ten", "5", 1.5, None, float("inf")])))
def test_similar_tickets_with_oversized_descriptions_and_limits_answer_or_refuse_cleanly(
    mcp, description, limit
):
    before = mcp.snapshot()
    is_error, text = mcp.call("find_similar_resolved_tickets",
                              {"description": description, "limit": limit})
    if is_error:
        _assert_clear_tool_error(is_error, text)
    else:  # a valid search: limits are capped, long descriptions cut to the model's window
        # (pydantic's lax mode reads the string "5" as 5 for a limit; money is StrictInt)
        as_int = int(limit) if isinstance(limit, int | str) and str(limit).isdigit() else None
        assert as_int is not None and as_int >= 1 and description.strip(), (limit, text[:200])
        answer = json.loads(text)
        assert answer["limit_applied"] == min(as_int, 10) and len(answer["matches"]) <= 10
    assert mcp.snapshot() == before


def test_the_one_good_refund_still_goes_through(mcp):
    """Guard against a property that passes because everything fails."""
    before = mcp.snapshot()
    is_error, text = mcp.call("issue_refund", {"order_id": "4429", "amount_cents": 1250,
                                               "reason": "damaged in transit"})
    assert not is_error, text
    assert mcp.snapshot()[0] == before[0] + 1
