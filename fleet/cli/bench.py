"""``fleet bench ...``: benchmarks (method and results in BENCHMARKS.md).

Each benchmark registers its command on :data:`bench_app` from its own module.
"""

from __future__ import annotations

import typer

from fleet.cli.app import app

bench_app = typer.Typer(help="Benchmarks; see BENCHMARKS.md.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

for _name in ("bench_queue", "bench_search", "bench_turns"):
    try:
        __import__(f"fleet.cli.{_name}")
    except ModuleNotFoundError as _exc:  # a benchmark not written yet
        if _exc.name != f"fleet.cli.{_name}":
            raise
