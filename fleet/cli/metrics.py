"""``fleet metrics serve``: one /metrics endpoint for a host's workers and the queue gauges.

For deployments where workers are not children of ``fleet up``: systemd's ``fleet-worker@``
units on one host share ``PROMETHEUS_MULTIPROC_DIR`` and this process serves all of them; in
Kubernetes one replica of it exports the database-derived gauges while worker pods run with
``FLEET_QUEUE_METRICS=false``.
"""

from __future__ import annotations

import os
import signal
import threading

import typer

from fleet.cli.app import app, settings, setup_logging

metrics_app = typer.Typer(help="Prometheus metrics endpoints.", no_args_is_help=True)
app.add_typer(metrics_app, name="metrics")


@metrics_app.command("serve")
def serve_command(
    port: int = typer.Option(9400, "--port", min=1, max=65535, help="Port of /metrics."),
    host: str | None = typer.Option(
        None, "--host", help="Listen address (default FLEET_METRICS_HOST)."
    ),
    queue_metrics: bool = typer.Option(
        True,
        "--queue-metrics/--no-queue-metrics",
        help="Export the database-derived gauges (queue depth, ages, workers, approvals).",
    ),
) -> None:
    """Serve /metrics: every process writing to PROMETHEUS_MULTIPROC_DIR (when set) plus the
    queue gauges; runs until SIGTERM/SIGINT."""
    from prometheus_client import CollectorRegistry

    from fleet.database import resolve_url_sync
    from fleet.errors import InvalidInput
    from fleet.metrics_server import QueueCollector, listen, multiprocess_registry

    setup_logging()
    cfg = settings()
    url = resolve_url_sync(cfg) if queue_metrics else None
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        if not os.path.isdir(path):
            raise InvalidInput(f"PROMETHEUS_MULTIPROC_DIR {path!r} is not a directory")
        registry = multiprocess_registry(path, cfg, url)
    elif url is not None:
        registry = CollectorRegistry()
        registry.register(QueueCollector(cfg, url))
    else:
        raise InvalidInput(
            "nothing to serve: set PROMETHEUS_MULTIPROC_DIR or leave --queue-metrics on"
        )
    listen(port, host or cfg.fleet_metrics_host, registry)
    typer.echo(f"metrics on {host or cfg.fleet_metrics_host}:{port}/metrics", err=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
