"""The CLI's error contract: one clear sentence on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tests.processes import ROOT, fleet, start_fleet, stop, wait_until


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("enqueue",), "Missing argument 'session'"),
        (("enqueue", "s1", "hi", "--bogus"), "No such option: --bogus"),
        (("messages", "--limit", "lots"), "Invalid value for '--limit'"),
    ],
)
def test_usage_errors_print_usage_and_exit_2(args: tuple[str, ...], expected: str,
                                             fleet_env: dict[str, str]) -> None:
    done = fleet(*args, env=fleet_env, timeout=60)
    assert done.returncode == 2
    assert expected in done.stderr
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr
    assert done.stdout == ""


def test_unknown_ids_are_one_sentence_and_exit_3(fleet_env: dict[str, str]) -> None:
    done = fleet("approvals", "show", "no-such-approval", env=fleet_env, timeout=60)
    assert done.returncode == 3
    assert done.stderr.startswith("error: no approval with id")
    assert done.stderr.count("\n") == 1


def test_enqueue_wait_without_a_reply_exits_4(fleet_env: dict[str, str]) -> None:
    """No worker runs: the wait times out with one sentence and exit code 4 (a command's own
    `typer.Exit(n)` used to be swallowed into 0 by click's non-standalone mode)."""
    done = fleet("enqueue", "s-wait", "hello", "--wait", "--timeout", "0.5",
                 env=fleet_env, timeout=60)
    assert done.returncode == 4, done
    assert done.stderr.startswith("error: no reply within 0.5s; message ")
    assert done.stderr.count("\n") == 1


async def test_enqueue_wait_for_a_message_that_dies_exits_1(conn, fleet_env: dict[str, str]
                                                            ) -> None:
    waiter = subprocess.Popen(
        [sys.executable, "-m", "fleet", "enqueue", "s-dead", "hello", "--wait", "--timeout", "60"],
        env=fleet_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        await wait_until(lambda: conn.fetchval(
            "SELECT count(*) = 1 FROM fleet.messages WHERE session_id = 's-dead'"), timeout=30,
            message="the enqueue")
        await asyncio.sleep(0.5)  # the waiter listens before it first looks
        assert await conn.fetchval(
            "SELECT fleet.finish_unleased(id, 'dead', NULL, 'handler failed', ARRAY['queued'])"
            " FROM fleet.messages WHERE session_id = 's-dead'")
        _, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 1, err
    assert err.startswith("error: message ") and err.rstrip().endswith("is dead: handler failed")


async def test_enqueue_wait_json_keeps_its_exit_codes_and_fleet_max_attempts_applies(
        conn, fleet_env: dict[str, str], tmp_path) -> None:
    env = dict(fleet_env, FLEET_MAX_ATTEMPTS="1")
    timed_out = fleet("enqueue", "s-json-1", "hello", "--wait", "--timeout", "0.5", "--json",
                      env=env, timeout=60)
    assert timed_out.returncode == 4, timed_out
    assert json.loads(timed_out.stdout)["state"] == "queued"
    worker = start_fleet("worker", "--handler", "noop", env=env, log=tmp_path / "worker.log")
    try:
        died = fleet("enqueue", "s-json-2", "please #fail", "--wait", "--timeout", "30",
                     "--json", env=env, timeout=60)
    finally:
        stop(worker)
    assert died.returncode == 1, died
    assert json.loads(died.stdout)["state"] == "dead"
    assert await conn.fetchval(
        "SELECT (max_attempts, attempts) = (1, 1) FROM fleet.messages"
        " WHERE session_id = 's-json-2'")
