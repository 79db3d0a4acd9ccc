"""Running the real `fleet` CLI in subprocesses; waiting on the database, not sleeping."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def fleet(*args: str, env: dict[str, str], timeout: float = 120,
          check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``fleet ARGS`` to completion; returns the completed process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=check, cwd=ROOT,
    )


def fleet_json(*args: str, env: dict[str, str], timeout: float = 120) -> Any:
    done = fleet(*args, "--json", env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_fleet(*args: str, env: dict[str, str], log: Path | None = None) -> subprocess.Popen[str]:
    """Start ``fleet ARGS`` in the background (its own process group); output to ``log``."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "fleet", *args],
        env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal a process and wait for it; SIGKILL if it does not exit in time."""
    if process.poll() is None:
        os.kill(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


async def wait_until(predicate: Callable[[], Awaitable[Any]], timeout: float = 60.0,
                     interval: float = 0.1, message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        await asyncio.sleep(interval)
