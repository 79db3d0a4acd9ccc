"""``fleet bench queue``: drain and sustained-load benchmark of the queue, PgQueuer alongside."""

from __future__ import annotations

from typing import Any

import typer

from fleet.cli.app import JsonOption, emit_json, emit_table, run, settings, setup_logging
from fleet.cli.bench import bench_app


@bench_app.command("queue")
def bench_queue_command(
    messages: int = typer.Option(20_000, "--messages", min=1, help="Messages per drain."),
    sessions: int = typer.Option(
        200, "--sessions", min=1, help="Sessions of the many-per-session drain."
    ),
    batch: int = typer.Option(
        10, "--batch", min=1, help="Claim batch size (worker --claim-batch; PgQueuer batch_size)."
    ),
    concurrency: int | None = typer.Option(
        None, "--concurrency", min=1, help="Worker messages in flight (default: 2 x --batch)."
    ),
    processes: int = typer.Option(
        2, "--processes", min=2, help="Worker processes of the scaling run (vs one)."
    ),
    scaling_work_delay: float = typer.Option(
        0.05, "--scaling-work-delay", min=0.0,
        help="Scaling again with handlers this slow, in seconds (0: skip).",
    ),
    sustain_seconds: float = typer.Option(
        10.0, "--sustain-seconds", min=0.1, help="Length of each sustained-load run."
    ),
    sustain_rate: float | None = typer.Option(
        None, "--sustain-rate", min=0.1,
        help="Sustained messages/s, at least 0.1, rounded to 0.1 (default: half of the peak).",
    ),
    sustain_peak: str = typer.Option(
        "load", "--sustain-peak",
        help="Sustained rate: half the peak load ('load': producer and worker together) or"
             " half a drain's peak ('drain', the method until 2026-12-08).",
    ),
    repeat: int = typer.Option(
        1, "--repeat", min=1, help="Runs of each drain (median reported) and sustained run."
    ),
    explain_backlog: int = typer.Option(
        50_000, "--explain-backlog", min=0, help="Backlog of the claim's EXPLAIN ANALYZE (0: skip)."
    ),
    skip_pgqueuer: bool = typer.Option(False, "--skip-pgqueuer", help="Do not run PgQueuer."),
    as_json: bool = JsonOption,
) -> None:
    """Drain and sustained-load benchmark in a scratch database (method: BENCHMARKS.md)."""
    from fleet.bench.queue import QueueBenchConfig, run_queue_bench
    from fleet.errors import InvalidInput

    if sustain_peak not in ("load", "drain"):
        raise InvalidInput(f"unknown --sustain-peak {sustain_peak!r}; expected load or drain")
    setup_logging("WARNING")
    config = QueueBenchConfig(
        messages=messages,
        sessions=sessions,
        batch=batch,
        concurrency=concurrency,
        processes=processes,
        scaling_work_delay=scaling_work_delay,
        sustain_seconds=sustain_seconds,
        sustain_rate=sustain_rate,
        sustain_peak=sustain_peak,
        repeat=repeat,
        explain_backlog=explain_backlog,
        skip_pgqueuer=skip_pgqueuer,
    )
    progress = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
    report = run(lambda: run_queue_bench(settings(), config, progress))
    if as_json:
        emit_json(report)
        return
    _print(report)


def _print(report: Any) -> None:
    env = report.environment
    typer.echo("")
    typer.echo(
        f"PostgreSQL {env.get('server_version')} ({env.get('database')}), "
        f"synchronous_commit={env.get('synchronous_commit')}, {env.get('cpus')} CPUs, "
        f"load {env.get('load_before')} -> {env.get('load_after')}"
    )
    typer.echo(
        "\nDrain (messages/s from first claim to last completion; steady = middle 80%;"
        " CPU microseconds per message)"
    )
    emit_table(
        [d.model_dump() for d in report.drains],
        [
            "system",
            "runner",
            "layout",
            "messages",
            "batch",
            "concurrency",
            "messages_per_second",
            "steady_messages_per_second",
            "wall_seconds",
            "worker_cpu_us",
            "postgres_cpu_us",
            "steal_percent",
            "all_done",
        ],
    )
    if report.peak_loads:
        typer.echo(
            "\nPeak load (messages/s one worker process claims while a producer on the same"
            " machine keeps it busy; median of the runs)"
        )
        emit_table(
            [p.model_dump() for p in report.peak_loads],
            ["system", "layout", "messages_per_second", "rates", "waiting", "steal_percent"],
        )
    rate = ("at half the peak load" if report.config.sustain_peak == "load"
            else "at half the single-process drain's peak")
    if report.config.sustain_rate:
        rate = f"at {report.config.sustain_rate:,.0f} messages/s"
    typer.echo(f"\nSustained load {rate} (enqueue -> claim)")
    emit_table(
        [s.model_dump() for s in report.sustained],
        [
            "system",
            "layout",
            "target_rate",
            "achieved_rate",
            "messages_per_commit",
            "messages",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "max_ms",
            "commit_p50_ms",
            "commit_p99_ms",
            "pickup_p50_ms",
            "pickup_p99_ms",
            "steal_percent",
            "all_done",
        ],
    )
    if report.claim_plans:
        typer.echo("\nClaim statement, EXPLAIN ANALYZE")
        emit_table(
            [p.model_dump() for p in report.claim_plans],
            [
                "case",
                "claimable",
                "batch",
                "claimed",
                "execution_ms",
                "shared_buffers",
                "index_rows",
                "indexes",
            ],
            width=60,
        )
    typer.echo("")
    for key, value in report.summary.items():
        if key != "targets_met":
            typer.echo(f"{key}: {value}")
    summary = report.summary
    for target, met in summary.get("targets_met", {}).items():
        line = f"target {target}: {'met' if met else 'MISSED'}"
        if not met and "processes >=" in target:  # a scaling target: say what the cores allow
            key = "" if "no-op" in target else "_with_work"
            ceiling = summary.get(f"scaling_ceiling{key}")
            if ceiling is not None and ceiling < 1.8:
                line += (f" (the machine's cores leave room for {ceiling}x at most: one process"
                         f" kept {summary[f'one_process_cores{key}']} of them busy)")
        typer.echo(line)
    typer.echo(f"every message done: {report.all_done}")
    if not report.all_done:
        raise typer.Exit(1)
