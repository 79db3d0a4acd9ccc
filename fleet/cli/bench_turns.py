"""``fleet bench turns``: agent turns per second and worker CPU per turn (BENCHMARKS.md)."""

from __future__ import annotations

import typer

from fleet.cli.app import JsonOption, emit_json, emit_table, run, settings, setup_logging
from fleet.cli.bench import bench_app


@bench_app.command("turns")
def bench_turns_command(
    sequential: int = typer.Option(30, "--sequential", min=1, help="Turns of the one-at-a-time "
                                   "phase (overhead without a model)."),
    turns: int = typer.Option(300, "--turns", min=1, help="Turns of the throughput phase."),
    concurrency: int = typer.Option(32, "--concurrency", min=1,
                                    help="Worker concurrency of the throughput phase."),
    slow_turns: int = typer.Option(300, "--slow-turns", min=1,
                                   help="Turns of the slow-model phase."),
    slow_concurrency: int = typer.Option(200, "--slow-concurrency", min=1,
                                         help="Worker concurrency of the slow-model phase."),
    model_latency: float = typer.Option(1.0, "--model-latency", min=0,
                                        help="Seconds per model call in the slow-model phase."),
    steady_rate: float = typer.Option(30.0, "--steady-rate", min=0,
                                      help="Arrivals/s of the steady slow-model phase (0: skip)."),
    repeat: int = typer.Option(1, "--repeat", min=1,
                               help="Runs of every phase; medians reported, every run listed."),
    sandbox_skills: bool = typer.Option(
        False, "--sandbox-skills",
        help="Instead: compare the SDK's sandbox Skills capability with fleet's load_skill tool."),
    as_json: bool = JsonOption,
) -> None:
    """Agent turns with the offline model against a real MCP server, in a scratch database."""
    from fleet.bench.turns import TurnBenchConfig, run_turn_bench, sandbox_skills_comparison

    setup_logging("WARNING")
    if sandbox_skills:
        rows = run(lambda: sandbox_skills_comparison())
        if as_json:
            emit_json(rows)
        else:
            emit_table(rows, ["loader", "concurrency", "wall_ms_per_run", "cpu_ms_per_run"])
        return
    config = TurnBenchConfig(
        sequential=sequential, turns=turns, concurrency=concurrency, slow_turns=slow_turns,
        slow_concurrency=slow_concurrency, model_latency=model_latency, steady_rate=steady_rate,
        repeat=repeat,
    )
    progress = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
    report = run(lambda: run_turn_bench(settings(), config, progress))
    if as_json:
        emit_json(report)
        return
    env = report.environment
    typer.echo(f"\nPostgreSQL {env['server_version']}, {env['cpus']} CPUs, load {env['load']}")
    emit_table(
        [p.model_dump() for p in report.phases],
        ["name", "turns", "concurrency", "model_latency_s", "turns_per_s",
         "worker_cpu_ms_per_turn", "mcp_cpu_ms_per_turn", "postgres_cpu_ms_per_turn", "p50_ms",
         "p90_ms", "max_in_flight", "rss_idle_mib", "rss_peak_mib", "mib_per_in_flight_turn",
         "all_done"],
    )
    if len(report.runs) > 1:
        typer.echo(f"\nMedians of {len(report.runs)} runs; each run's turns/s and p50 ms:")
        for i, phase in enumerate(report.phases):
            each = " / ".join(f"{run[i].turns_per_s:g} ({run[i].p50_ms:g})" for run in report.runs)
            typer.echo(f"  {phase.name}: {each}")
