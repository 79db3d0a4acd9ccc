"""Log every call a ``fleet worker`` process makes to claim (BENCHMARKS.md, "the worker's calls").

Put this folder on ``PYTHONPATH`` and set ``CYCLE_LOG_DIR``: Python imports this module at
start-up in every process, and in a ``fleet worker`` process it wraps
``fleet.queue.finish_and_claim``, which the worker looks up at each call (with no outcomes to
write it only claims). Twice a second, and as it exits, the process appends its calls to
``$CYCLE_LOG_DIR/cycles-<pid>.txt``, one line each:

    <unix time the call started> <ms it took> <outcomes written> <messages asked> <claimed>

``python bench/queue_probes.py sustained-trace --cycle-log`` sets both and reads the files back:
how many calls the worker made, how long they took and how full they came back, around the
late messages. Other processes are left alone.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

_DIR = os.environ.get("CYCLE_LOG_DIR")


def _install(directory: str) -> None:
    import fleet.queue

    calls: list[tuple[float, float, int, int, int]] = []
    finish_and_claim = fleet.queue.finish_and_claim

    async def logged(
        db: Any,
        worker_id: str,
        limit: int,
        lease_seconds: float,
        outcomes: Sequence[Any],
        **kwargs: Any,
    ) -> tuple[set[int], list[Any]]:
        started, clock = time.time(), time.perf_counter()
        finished, claimed = await finish_and_claim(
            db, worker_id, limit, lease_seconds, outcomes, **kwargs
        )
        calls.append(
            (started, (time.perf_counter() - clock) * 1000, len(outcomes), limit, len(claimed))
        )
        return finished, claimed

    fleet.queue.finish_and_claim = logged

    path = os.path.join(directory, f"cycles-{os.getpid()}.txt")
    # The writer thread and the exit hook may both be writing at exit: one at a time, or both
    # could take the same calls and log them twice.
    writing = threading.Lock()

    def write() -> None:
        with writing, open(path, "a") as out:
            taken = calls[:]
            del calls[: len(taken)]
            out.writelines(
                f"{at:.6f} {ms:.3f} {written} {asked} {claimed}\n"
                for at, ms, written, asked, claimed in taken
            )

    def write_twice_a_second() -> None:
        while True:
            time.sleep(0.5)
            write()

    threading.Thread(target=write_twice_a_second, daemon=True, name="cycle-log").start()
    # The calls of the last half second: a worker stopped with SIGTERM exits normally.
    atexit.register(write)


if _DIR and sys.argv[1:2] == ["worker"]:
    _install(_DIR)
