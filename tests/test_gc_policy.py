"""The garbage collector settled once a worker or the customer-data server is ready."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import gc_policy, queue
from fleet.handlers import HandlerResult, Lease, NoopHandler
from fleet.queue import ClaimedMessage
from fleet.worker import Worker
from tests.mcp_process import running_mcp
from tests.processes import fleet, wait_until
from tests.workers import running

SETTLED = "young generation collected every {} allocations"


@pytest.fixture
def collector() -> Iterator[None]:
    """The test process's collector as it was, afterwards."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_settle_freezes_start_up_objects_and_raises_the_young_threshold(collector):
    _, middle, old = gc.get_threshold()
    gc_policy.settle(4321)
    assert gc.get_threshold() == (4321, middle, old)
    assert gc.get_freeze_count() > 1000  # everything imported so far


def test_zero_leaves_the_collector_alone(collector):
    gc.unfreeze()
    before = gc.get_threshold()
    gc_policy.settle(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_the_worker_is_ready_once_before_its_first_claim(settings, conn):
    message_id = await queue.enqueue(conn, "s1", "hello")
    seen: list[str] = []

    def ready() -> None:  # synchronous, on the worker's loop: nothing can claim meanwhile
        seen.append("ready")

    class Recording(NoopHandler):
        async def handle(self, message: ClaimedMessage, lease: Lease) -> HandlerResult:
            seen.append(f"handled {message.id}")
            return await super().handle(message, lease)

    async with running(Worker(settings, Recording(), concurrency=2, on_ready=ready)):
        await wait_until(lambda: conn.fetchval(
            "SELECT state = 'done' FROM fleet.messages WHERE id = $1", message_id),
            timeout=30, message="the message to be done")
    assert seen == ["ready", f"handled {message_id}"]


def test_fleet_worker_settles_its_collector_unless_told_not_to(fleet_env):
    done = fleet("worker", "--handler", "noop", "--drain",
                 env=dict(fleet_env, FLEET_GC_YOUNG_THRESHOLD="4321"))
    assert done.returncode == 0, done.stderr
    assert SETTLED.format(4321) in done.stderr
    done = fleet("worker", "--handler", "noop", "--drain",
                 env=dict(fleet_env, FLEET_GC_YOUNG_THRESHOLD="0"))
    assert done.returncode == 0, done.stderr
    assert "garbage collector settled" not in done.stderr


def test_fleet_mcp_serve_settles_its_collector_once_ready(fleet_env, tmp_path: Path):
    log = tmp_path / "mcp.log"
    with running_mcp(fleet_env, log, FLEET_GC_YOUNG_THRESHOLD="4321"):
        deadline = time.monotonic() + 90
        while "customer-data ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
    assert "customer-data ready" in text, text[-2000:]
    assert SETTLED.format(4321) in text, text[-2000:]
