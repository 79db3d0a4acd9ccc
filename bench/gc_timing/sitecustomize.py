"""Time Python's garbage collections in every process of a benchmark (BENCHMARKS.md, "settle").

Put this folder on ``PYTHONPATH`` and Python imports it at start-up in every process started
with that environment (``fleet bench turns`` passes its environment on to the worker, the
MCP server and the seeder). Each process then appends, once a second, one line to
``$GC_TIMING_DIR/gc-<pid>.txt``:

    <unix time> <argv[1:4]> cpu=<process CPU s> young=<threshold> g0:<count>/<ms> g1:... g2:...

with running totals of collections and the wall time spent in them per generation. Take the
difference between two lines of one process to get a phase's share.

    PYTHONPATH=bench/gc_timing GC_TIMING_DIR=/tmp/gc \\
        fleet bench turns --sequential 1 --turns 600 --slow-turns 1 --steady-rate 0

(``GC_TIMING_DIR`` has no ``FLEET_`` prefix because the turn bench does not pass those on.)
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

_DIR = os.environ.get("GC_TIMING_DIR")
_started: list[float] = [0.0]
_totals = {generation: [0, 0.0] for generation in (0, 1, 2)}


def _on_collection(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    total = _totals[info["generation"]]
    total[0] += 1
    total[1] += time.perf_counter() - _started[0]


def _report_every_second(path: str) -> None:
    who = " ".join(sys.argv[1:4])
    while True:
        time.sleep(1)
        counts = " ".join(f"g{g}:{n}/{s * 1000:.0f}" for g, (n, s) in _totals.items())
        with open(path, "a") as out:
            out.write(f"{time.time():.1f} {who} cpu={time.process_time():.2f} "
                      f"young={gc.get_threshold()[0]} {counts}\n")


if _DIR:
    os.makedirs(_DIR, exist_ok=True)
    gc.callbacks.append(_on_collection)
    threading.Thread(
        target=_report_every_second, args=(os.path.join(_DIR, f"gc-{os.getpid()}.txt"),),
        daemon=True, name="gc-timing",
    ).start()
