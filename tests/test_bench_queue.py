"""``fleet bench queue`` at a tiny size: every phase runs, the report has its shape, and every
message of every phase ended done (the benchmark measures a queue that works, not a fast failure).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from fleet.bench.queue import host_cpu_ticks, steal_percent_since
from tests.processes import fleet, fleet_json


def _bench(fleet_env: dict[str, str], *extra: str) -> dict[str, Any]:
    return fleet_json(
        "bench", "queue", "--messages", "300", "--sessions", "15", "--batch", "10",
        "--sustain-seconds", "1", "--explain-backlog", "2000", *extra,
        env=fleet_env, timeout=240,
    )


@pytest.mark.slow
def test_bench_queue_smoke_with_pgqueuer(fleet_env: dict[str, str]) -> None:
    report = _bench(fleet_env)

    assert report["all_done"] is True
    drains = {(d["system"], d["runner"], d["layout"]): d for d in report["drains"]}
    assert set(drains) == {
        ("pgfleet", "in-process", "one-per-session"),
        ("pgfleet", "in-process", "many-per-session"),
        ("pgqueuer", "in-process", "no sessions"),
        ("pgfleet", "1 process(es)", "one-per-session"),
        ("pgfleet", "2 process(es)", "one-per-session"),
        ("pgfleet", "1 process(es), 50 ms handlers", "one-per-session"),
        ("pgfleet", "2 process(es), 50 ms handlers", "one-per-session"),
    }
    for drain in drains.values():
        assert drain["all_done"] is True, drain
        assert drain["messages"] == 300
        assert drain["messages_per_second"] > 0
        assert drain["steady_messages_per_second"] > 0
        # The host's steal, per run, as a share of the machine's CPU time.
        assert len(drain["steal_percent"]) == 1 and 0 <= drain["steal_percent"][0] <= 100
    assert drains[("pgfleet", "in-process", "many-per-session")]["sessions"] == 15

    # The peak loads came first, and each sustained run went at half its own.
    peaks = {(p["system"], p["layout"]): p for p in report["peak_loads"]}
    assert set(peaks) == {("pgfleet", "one-per-session"), ("pgfleet", "many-per-session"),
                          ("pgqueuer", "no sessions")}
    for peak in peaks.values():
        assert peak["messages_per_second"] > 0 and len(peak["rates"]) == 1, peak
        assert peak["waiting"] == 40  # twice the worker's in-flight cap (2 x --batch)
    sustained = {(s["system"], s["layout"]): s for s in report["sustained"]}
    assert set(sustained) == set(peaks)
    for key, run in sustained.items():
        assert run["target_rate"] == round(peaks[key]["messages_per_second"] / 2, 1)
    for run in sustained.values():
        assert run["all_done"] is True, run
        assert run["messages"] >= int(run["target_rate"] * 1)
        assert 0 <= run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert 0 <= run["steal_percent"] <= 100
        # The worker process and the database's backends did work for each message.
        assert run["worker_cpu_us"] > 0 and run["postgres_cpu_us"] > 0, run

    plans = report["claim_plans"]
    assert len(plans) == 4
    for plan in plans:
        # The claim reads the claimable-heads index and takes a full batch whatever the backlog.
        assert "messages_claimable" in plan["indexes"]
        assert plan["claimed"] == min(10, plan["claimable"])
        assert plan["index_rows"] <= 4 * plan["batch"]

    summary = report["summary"]
    assert {"ratio_vs_pgqueuer_one_per_session", "ratio_vs_pgqueuer_many_per_session",
            "peak_load", "peak_load_many_per_session", "peak_load_pgqueuer",
            "drain_peak_over_peak_load",
            "scaling_steady", "scaling_steady_with_work", "sustained_p99_ms",
            "sustained_p99_ms_many_per_session", "sustained_p99_ms_pgqueuer",
            "targets_met", "one_process_cores", "scaling_ceiling"} <= set(summary)
    assert "p99 <= 10 ms at half peak load" in summary["targets_met"]
    # The room the cores leave: one process's cores from its own rate and CPU per message.
    one = drains[("pgfleet", "1 process(es)", "one-per-session")]
    cores = one["steady_messages_per_second"] * (one["worker_cpu_us"] + one["postgres_cpu_us"])
    assert summary["one_process_cores"] == pytest.approx(cores / 1e6, abs=0.01)
    assert 0 < summary["scaling_ceiling"] <= 2
    # The cores each in-process drain kept busy, ours and PgQueuer's, the same way.
    for key, row in (("cores_pgqueuer", ("pgqueuer", "in-process", "no sessions")),
                     ("cores_one_per_session", ("pgfleet", "in-process", "one-per-session")),
                     ("cores_many_per_session", ("pgfleet", "in-process", "many-per-session"))):
        drain = drains[row]
        cpu_us = drain["worker_cpu_us"] + drain["postgres_cpu_us"]
        assert summary[key] == pytest.approx(
            drain["steady_messages_per_second"] * cpu_us / 1e6, abs=0.01)
        assert 0 < summary[key] <= 1.25 * (os.cpu_count() or 1), (key, summary[key])
    assert drains[("pgfleet", "in-process", "one-per-session")]["concurrency"] == 20  # 2 x batch
    assert report["environment"]["pgqueuer"].startswith("1.6")


def test_bench_queue_without_pgqueuer_or_explain(fleet_env: dict[str, str]) -> None:
    report = fleet_json(
        "bench", "queue", "--messages", "100", "--sessions", "5", "--batch", "5",
        "--sustain-seconds", "0.5", "--explain-backlog", "0", "--skip-pgqueuer",
        "--scaling-work-delay", "0", "--sustain-rate", "150", "--concurrency", "5",
        "--repeat", "2", env=fleet_env, timeout=180,
    )
    assert report["all_done"] is True
    assert {d["system"] for d in report["drains"]} == {"pgfleet"}
    # --repeat runs the sustained phase again too, both layouts at the same rate; each summary
    # p99 is over its layout's runs.
    sustained = report["sustained"]
    assert [(s["system"], s["layout"]) for s in sustained] == [
        ("pgfleet", "one-per-session"), ("pgfleet", "many-per-session")] * 2
    assert {s["target_rate"] for s in sustained} == {150}
    # Each run counts its own 75 messages, not the warm-up's 150 sent before it.
    assert [s["messages"] for s in sustained] == [75] * 4
    summary = report["summary"]
    for suffix, layout in (("", "one-per-session"), ("_many_per_session", "many-per-session")):
        runs = [s for s in sustained if s["layout"] == layout]
        assert summary[f"sustained_p99_ms_per_run{suffix}"] == [s["p99_ms"] for s in runs]
        assert 0 < summary[f"sustained_p99_ms{suffix}"] <= max(s["max_ms"] for s in runs)
    assert {d["concurrency"] for d in report["drains"]} == {5}
    assert not any("handlers" in d["runner"] for d in report["drains"])
    assert report["claim_plans"] == []
    assert report["peak_loads"] == []  # a given rate needs no peak
    assert "ratio_vs_pgqueuer_one_per_session" not in report["summary"]


def test_host_steal_is_read_from_the_machine_counters() -> None:
    """The steal column comes from /proc/stat's aggregate line: the counters are read (not
    the (0, 0) of a machine without /proc), steal is one of them, and time moves them (idle
    time counts: 50 ms is five 10 ms ticks on every CPU)."""
    before = host_cpu_ticks()
    stolen, total = before
    assert total > 0 and 0 <= stolen <= total
    time.sleep(0.05)
    assert host_cpu_ticks()[1] > total
    assert 0 <= steal_percent_since(before) <= 100


def test_a_missed_scaling_target_says_what_the_cores_allow(capsys) -> None:
    """The human report: a scaling target missed on a machine whose cores leave no room for
    1.8x says so, with the measured figures; one they leave room for, or a met one, does not."""
    from fleet.bench.queue import QueueBenchConfig, QueueBenchReport
    from fleet.cli.bench_queue import _print

    report = QueueBenchReport(
        config=QueueBenchConfig(),
        environment={},
        summary={
            "one_process_cores": 1.39, "scaling_ceiling": 1.44,
            "one_process_cores_with_work": 0.1, "scaling_ceiling_with_work": 2.0,
            "targets_met": {
                "drain >= 2x PgQueuer": False,
                "2 processes >= 1.8x one (no-op handlers)": False,
                "2 processes >= 1.8x one (50 ms handlers)": False,
            },
        },
    )
    _print(report)
    lines = capsys.readouterr().out.splitlines()
    assert "target drain >= 2x PgQueuer: MISSED" in lines
    assert ("target 2 processes >= 1.8x one (no-op handlers): MISSED (the machine's cores"
            " leave room for 1.44x at most: one process kept 1.39 of them busy)") in lines
    assert "target 2 processes >= 1.8x one (50 ms handlers): MISSED" in lines


def test_the_sustained_rate_is_the_one_the_report_gives() -> None:
    """The producer's rate is rounded to 0.1/s as the report's ``target_rate`` is, whether it
    was given (``--sustain-rate``) or is half a measured peak; below 0.1/s is refused."""
    from pydantic import ValidationError

    from fleet.bench.queue import DrainResult, PeakLoadResult, QueueBench, QueueBenchConfig
    from fleet.settings import Settings

    given = QueueBench(Settings(), QueueBenchConfig(sustain_rate=1234.56))
    assert given._sustain_rate("pgfleet") == 1234.6
    load = QueueBench(Settings(), QueueBenchConfig())
    load.report.peak_loads.append(PeakLoadResult(
        system="pgqueuer", layout="no sessions", messages_per_second=2871.4, rates=[2871.4],
        waiting=40, load_before=0.0, steal_percent=[0.0]))
    assert load._sustain_rate("pgqueuer") == 1435.7  # half the peak load, by default
    measured = QueueBench(Settings(), QueueBenchConfig(sustain_peak="drain"))
    measured.report.drains.append(DrainResult(
        system="pgqueuer", runner="in-process", layout="no sessions", messages=10,
        sessions=None, batch=10, concurrency=None, processes=1, messages_per_second=3629.0,
        steady_messages_per_second=3629.07, wall_seconds=1.0, rates=[3629.0],
        worker_cpu_us=1.0, postgres_cpu_us=None, all_done=True, load_before=0.0,
        steal_percent=[0.0]))
    assert measured._sustain_rate("pgqueuer") == 1814.5
    with pytest.raises(ValidationError, match="sustain_rate"):
        QueueBenchConfig(sustain_rate=0.04)


def test_an_unknown_sustain_peak_is_refused_in_one_sentence(fleet_env: dict[str, str]) -> None:
    done = fleet("bench", "queue", "--sustain-peak", "highest", env=fleet_env, timeout=60)
    assert done.returncode == 2, done
    assert "unknown --sustain-peak 'highest'; expected load or drain" in done.stderr
    assert "Traceback" not in done.stderr
