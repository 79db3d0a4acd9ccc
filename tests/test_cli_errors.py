"""The CLI's error contract: one clear sentence on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from tests.processes import fleet


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
