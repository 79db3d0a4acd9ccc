"""``fleet bench search``: top-5 search latency (p50/p99) and recall@5 against exact search."""

from __future__ import annotations

import typer

from fleet.cli.app import JsonOption, emit_json, emit_table, run, settings, setup_logging
from fleet.cli.bench import bench_app
from fleet.errors import InvalidInput


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise InvalidInput(f"{name} must be a comma-separated list of positive integers")
    return values


@bench_app.command("search")
def bench_search_command(
    sizes: str = typer.Option("10000,100000", "--sizes", help="Vector counts to measure at."),
    queries: int = typer.Option(500, "--queries", min=10, help="Timed queries per setting."),
    ef_search: str = typer.Option("40,64,100", "--ef-search", help="hnsw.ef_search values."),
    filters: str = typer.Option(
        "none,past_case,policy_library", "--filters",
        help="Source filters: none, past_case (90% of rows), policy_library (10%).",
    ),
    distribution: str = typer.Option(
        "clustered", "--distribution", help="Synthetic vectors: clustered or uniform."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Search benchmark on synthetic vectors in a scratch database (method: BENCHMARKS.md)."""
    from fleet.bench.search import FILTERS, SearchBenchConfig, run_search_bench

    setup_logging("WARNING")
    chosen = [f.strip() for f in filters.split(",") if f.strip()]
    if not chosen or any(f not in FILTERS for f in chosen):
        raise InvalidInput(f"--filters takes some of: {', '.join(FILTERS)}")
    if distribution not in ("clustered", "uniform"):
        raise InvalidInput("--distribution must be clustered or uniform")
    config = SearchBenchConfig(
        sizes=_ints(sizes, "--sizes"), queries=queries, ef_search=_ints(ef_search, "--ef-search"),
        filters=chosen, distribution=distribution,
    )
    progress = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
    report = run(lambda: run_search_bench(settings(), config, progress))
    if as_json:
        emit_json(report)
        return
    env = report.environment
    typer.echo(
        f"\n{report.model} ({report.dimensions} dims), {report.distribution} synthetic vectors, "
        f"PostgreSQL {env.get('server_version')}, pgvector {env.get('pgvector')}, "
        f"{env.get('cpus')} CPUs, load {env.get('load_before')} -> {env.get('load_after')}"
    )
    emit_table([s.model_dump() for s in report.sizes],
               ["vectors", "load_seconds", "index_build_seconds", "index_mb", "exact_p50_ms",
                "exact_p99_ms"])
    typer.echo("")
    emit_table([r.model_dump() for r in report.results],
               ["vectors", "filter", "ef_search", "p50_ms", "p99_ms", "recall_at_5",
                "uses_hnsw"])
