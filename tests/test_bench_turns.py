"""``fleet bench turns`` at a tiny size, twice (``--repeat 2``): every phase runs real turns
(worker, MCP server, offline model) to the end, and the report has its shape, medians included.
The numbers themselves are BENCHMARKS.md's."""

from __future__ import annotations

import os

import pytest

from tests.processes import fleet_json


@pytest.mark.slow
def test_bench_turns_smoke(fleet_env: dict[str, str]) -> None:
    report = fleet_json(
        "bench", "turns", "--sequential", "2", "--turns", "4", "--concurrency", "2",
        "--slow-turns", "6", "--slow-concurrency", "6", "--model-latency", "0.2",
        "--steady-rate", "10", "--repeat", "2",
        env=fleet_env, timeout=600,
    )
    phases = {p["name"]: p for p in report["phases"]}
    # Two runs of every phase; each reported figure is the median of the runs' (for two runs,
    # their mean), so it lies between them.
    assert [[p["name"] for p in run] for run in report["runs"]] == [list(phases)] * 2
    for i, phase in enumerate(report["phases"]):
        for figure in ("turns_per_s", "worker_cpu_ms_per_turn", "p50_ms"):
            low, high = sorted(run[i][figure] for run in report["runs"])
            assert phase[figure] == pytest.approx((low + high) / 2, abs=1e-3), figure
    assert list(phases) == ["sequential", "throughput", "slow model", "slow model, steady (10/s)"]
    for phase in phases.values():
        assert phase["all_done"] is True, phase
        assert phase["turns_per_s"] > 0 and phase["worker_cpu_ms_per_turn"] > 0
        assert phase["mcp_cpu_ms_per_turn"] > 0
        if not os.environ.get("DATABASE_URL"):  # the embedded server's processes are ours to read
            assert phase["postgres_cpu_ms_per_turn"] > 0
        assert 0 < phase["p50_ms"] <= phase["p90_ms"]
    # Three model calls of 0.2 s each: a turn cannot be faster than the model.
    assert phases["slow model"]["p50_ms"] >= 600
    assert phases["slow model, steady (10/s)"]["p50_ms"] >= 600
    assert phases["slow model"]["max_in_flight"] >= 2
