"""``fleet trace``'s table: what a reader sees of the audit rows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fleet.cli.trace import render


def _row(at: datetime, action: str, target: str) -> dict[str, object]:
    return {"created_at": at, "action": action, "target": target,
            "payload": {"excerpt": "hello"}, "result": {"status": "ok"}}


def test_the_date_is_shown_first_and_wherever_it_changes(capsys: pytest.CaptureFixture[str]):
    """A run parked in the evening and approved the next morning must not read as one
    minute's work."""
    data = {
        "session_id": "s-overnight",
        "audit": [
            _row(datetime(2026, 12, 1, 23, 59, 58, 120_000, tzinfo=UTC), "message_received",
                 "conversation:s-overnight"),
            _row(datetime(2026, 12, 1, 23, 59, 59, 5_000, tzinfo=UTC), "approval_requested",
                 "approval:a1"),
            _row(datetime(2026, 12, 2, 8, 15, 0, 250_000, tzinfo=UTC), "approval_decided",
                 "approval:a1"),
            _row(datetime(2026, 12, 2, 8, 15, 1, 0, tzinfo=UTC), "message_sent",
                 "conversation:s-overnight"),
        ],
        "run_states": [],
        "conversation": None,
    }
    render(data)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "session s-overnight: 4 audit rows"
    body = [line.split("  ")[0].strip() for line in lines[2:6]]
    assert body == ["2026-12-01 23:59:58.120", "23:59:59.005", "2026-12-02 08:15:00.250",
                    "08:15:01.000"]
