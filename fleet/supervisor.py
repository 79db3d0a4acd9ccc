"""``fleet up``: the MCP server, N worker processes and one metrics endpoint, kept running.

A small synchronous process supervisor: children are real OS processes (``python -m fleet``),
restarted with backoff when they die, and drained on SIGINT/SIGTERM (workers first, so in-flight
turns can still reach the MCP server; the MCP server last). Horizontal scale is the same command
on more machines with one ``DATABASE_URL``.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from fleet.database import resolve_url_sync
from fleet.settings import Settings

log = logging.getLogger("fleet.supervisor")


@dataclass
class Child:
    """One supervised process and how to start it again."""

    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def fleet_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet", *args]


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        workers: int,
        concurrency: int,
        handler: str,
        claim_batch: int | None = None,
        work_delay: float = 0.0,
        metrics_port: int | None = None,
        poll_only: bool = False,
        with_mcp: bool | None = None,
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.concurrency = concurrency
        self.claim_batch = claim_batch
        self.handler = handler
        self.work_delay = work_delay
        self.metrics_port = metrics_port
        self.poll_only = poll_only
        self.with_mcp = handler == "agent" if with_mcp is None else with_mcp
        self.children: list[Child] = []
        self._stopping = False
        self._multiproc_dir: str | None = None

    # -- environment of the children ---------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DATABASE_URL"] = resolve_url_sync(self.settings)
        token = self.settings.customer_data_token
        env["CUSTOMER_DATA_TOKEN"] = (
            token.get_secret_value() if token else secrets.token_urlsafe(32)
        )
        env["CUSTOMER_DATA_URL"] = self.settings.customer_data_url
        if self._multiproc_dir:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._multiproc_dir
        return env

    def _build_children(self, env: dict[str, str]) -> None:
        if self.with_mcp:
            url = urlparse(self.settings.customer_data_url)
            self.children.append(
                Child(
                    "mcp",
                    fleet_argv(
                        "mcp",
                        "serve",
                        "--host",
                        url.hostname or "127.0.0.1",
                        "--port",
                        str(url.port or 8765),
                    ),
                    env,
                )
            )
        worker_args = [
            "worker",
            "--concurrency",
            str(self.concurrency),
            "--handler",
            self.handler,
            "--work-delay",
            str(self.work_delay),
        ]
        if self.claim_batch is not None:
            worker_args += ["--claim-batch", str(self.claim_batch)]
        if self.poll_only:
            worker_args.append("--poll-only")
        for index in range(self.workers):
            self.children.append(Child(f"worker-{index + 1}", fleet_argv(*worker_args), env))

    # -- metrics -----------------------------------------------------------------------------

    def _serve_metrics(self) -> None:
        from fleet.metrics_server import listen, multiprocess_registry

        registry = multiprocess_registry(
            self._multiproc_dir, self.settings, resolve_url_sync(self.settings)
        )
        listen(self.metrics_port, self.settings.fleet_metrics_host, registry)
        log.info("metrics on :%d/metrics", self.metrics_port)

    def _mark_dead(self, pid: int | None) -> None:
        if self._multiproc_dir and pid:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self._multiproc_dir)

    # -- run ---------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("received %s: draining", signal.Signals(signum).name)
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.metrics_port is not None:
            self._multiproc_dir = tempfile.mkdtemp(prefix="fleet-metrics-")
        env = self._child_env()
        self._migrate(env)
        self._build_children(env)
        if self.metrics_port is not None:
            self._serve_metrics()
        for child in self.children:
            child.start()
        try:
            while not self._stopping:
                self._watch()
                time.sleep(0.2)
        finally:
            self._drain()
            if self._multiproc_dir:
                shutil.rmtree(self._multiproc_dir, ignore_errors=True)
        return 0

    def _migrate(self, env: dict[str, str]) -> None:
        subprocess.run(fleet_argv("migrate"), env=env, check=True, stdout=subprocess.DEVNULL)

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.alive():
                continue
            if child.process is not None:
                code = child.process.returncode
                self._mark_dead(child.pid)
                # Crash loops back off: 1 s, 2 s, ... 30 s; a child that ran a minute is healthy.
                if now - child.started_at > 60:
                    child.restarts = 0
                delay = min(30.0, 2.0**child.restarts)
                log.warning(
                    "%s (pid %s) exited with %s; restarting in %.0fs",
                    child.name,
                    child.pid,
                    code,
                    delay,
                )
                child.process = None
                child.restarts += 1
                child.next_start = now + delay
            elif now >= child.next_start:
                child.start()

    def _drain(self) -> None:
        workers = [c for c in self.children if c.name.startswith("worker") and c.alive()]
        others = [c for c in self.children if not c.name.startswith("worker") and c.alive()]
        grace = self.settings.fleet_shutdown_grace + 10
        for group in (workers, others):
            for child in group:
                child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for child in group:
                try:
                    child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in time; killing it", child.name)
                    child.process.kill()
                    child.process.wait()
                self._mark_dead(child.pid)
        log.info("all children stopped")
