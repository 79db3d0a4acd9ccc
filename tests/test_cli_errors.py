"""The CLI's error contract: one clear sentence on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import json
import socket
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
        (("messages", "--limit", "99999999999999999999"), "Invalid value for '--limit'"),
        (("worker", "--metrics-port", "99999"), "Invalid value for '--metrics-port'"),
    ],
)
def test_usage_errors_print_usage_and_exit_2(args: tuple[str, ...], expected: str,
                                             fleet_env: dict[str, str]) -> None:
    done = fleet(*args, env=fleet_env, timeout=60)
    assert done.returncode == 2
    assert expected in done.stderr
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr
    assert done.stdout == ""


def test_a_search_limit_past_the_most_one_search_returns_is_refused(
    fleet_env: dict[str, str],
) -> None:
    """It used to be capped silently: asked for 60, the user got 50 and no word why."""
    done = fleet("search", "refund", "--limit", "60", env=fleet_env, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr == "error: limit is 60, but one search returns at most 50\n"
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


def _one_sentence(done, code: int, start: str) -> None:
    assert done.returncode == code, done
    assert done.stderr.startswith(start), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_servers_that_cannot_start_say_why_in_one_sentence(fleet_env: dict[str, str]) -> None:
    """A port taken, a host that is no address, a database away: one sentence, exit 1 (not
    uvicorn's traceback and exit 3, nor "cannot reach the database" for a metrics port)."""
    env = dict(fleet_env, CUSTOMER_DATA_TOKEN="t")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        _one_sentence(fleet("mcp", "serve", "--port", port, env=env), 1,
                      f"error: the customer-data server cannot listen on 127.0.0.1:{port}: ")
        _one_sentence(fleet("worker", "--handler", "noop", "--metrics-port", port, env=env), 1,
                      "error: cannot serve /metrics on ")
    _one_sentence(fleet("mcp", "serve", "--host", "256.1.1.1", "--port", "8", env=env), 1,
                  "error: the customer-data server cannot listen on 256.1.1.1:8: ")
    away = dict(env, DATABASE_URL="postgresql://postgres@127.0.0.1:1/fleet")
    _one_sentence(fleet("mcp", "serve", "--port", port, env=away), 1,
                  "error: cannot reach the database")


def test_an_instructions_file_that_is_not_utf8_is_bad_input(fleet_env: dict[str, str],
                                                           tmp_path) -> None:
    binary = tmp_path / "instructions.bin"
    binary.write_bytes(b"\xd5\xff\x00 not text")
    _one_sentence(fleet("agents", "create", "tier9", "--instructions-file", str(binary),
                        env=fleet_env), 2, "error: --instructions-file ")


def test_status_watch_json_is_one_document_per_line(fleet_env: dict[str, str]) -> None:
    watcher = subprocess.Popen([sys.executable, "-m", "fleet", "status", "--watch", "0.3",
                                "--json"], env=fleet_env, stdout=subprocess.PIPE, text=True,
                               cwd=ROOT)
    try:
        lines = [watcher.stdout.readline() for _ in range(2)]
    finally:
        watcher.kill()
        watcher.wait(10)
    for line in lines:
        assert "counts" in json.loads(line)
