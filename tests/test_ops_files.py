"""The operator files in ``ops/`` against real tools and a real fleet.

promtool checks the Prometheus configs and alert rules (and runs the rules' unit tests); every
metric the dashboard and the alerts read exists in a real scrape of ``fleet up``; a real
Prometheus scrapes a running fleet and answers every dashboard query; the systemd units pass
``systemd-analyze verify``; the Kubernetes manifests build and KEDA's query counts the right
messages on the real schema; every ``fleet`` command line in ``ops/`` parses.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from tests.processes import ROOT, start_fleet, stop, wait_until
from tests.scrape import all_metric_names, free_port, scrape

OPS = ROOT / "ops"
PROMETHEUS_CONFIGS = [OPS / "prometheus" / "prometheus.yml", OPS / "compose" / "prometheus.yml"]
ALERTS = OPS / "prometheus" / "alerts.yml"
DASHBOARD = OPS / "grafana" / "fleet-dashboard.json"
#: Grafana's variables, as a query over a short test run sees them.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__range": "5m", "$__interval": "1s"}
#: Exported series that no panel or alert needs to show (internal plumbing).
NOT_ON_DASHBOARD = {
    "fleet_queue_collector_duration_seconds",
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return path


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def with_grafana_variables(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


# -- static checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda p: str(p.relative_to(OPS)))
def test_promtool_accepts_the_scrape_configs(config: Path):
    done = subprocess.run(
        [_promtool(), "check", "config", str(config)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_accepts_the_alert_rules_and_their_unit_tests():
    promtool = _promtool()
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_exprs())} rules found" in done.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        cwd=OPS / "prometheus",
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_alerts_cover_what_operators_are_paged_for():
    names = {name for name, _ in alert_exprs()}
    for required in (
        "FleetBacklogOld",
        "FleetDeadMessages",
        "FleetNoLiveWorkers",
        "FleetApprovalsWaitingTooLong",
        "FleetHighErrorRate",
    ):
        assert required in names


def test_dashboard_is_grafana_json_with_the_required_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
    text = " ".join(expr for _, expr in dashboard_exprs())
    for needle in (
        "fleet_messages_completed_total",  # throughput by outcome, failure rate
        "fleet_queue_wait_seconds_bucket",  # queue wait percentiles
        "fleet_turn_duration_seconds_bucket",  # turn latency percentiles
        "fleet_queue_messages",  # backlog
        "fleet_workers_alive",  # workers
        "fleet_approvals_pending",  # approvals
        "fleet_model_tokens_total",  # tokens
        "fleet_model_cost_dollars_total",  # cost
    ):
        assert needle in text, needle


def test_promql_metric_name_parser():
    from tests.scrape import promql_metric_names

    expr = (
        'histogram_quantile(0.95, sum by (le, tool) (rate(a_bucket{x=~"b|c"}[$__rate_interval])))'
        " / ignoring(tool) group_left max(b_total offset 5m) > 1e3 and on() absent(c)"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c"}


# -- against a running fleet ------------------------------------------------------------------


async def _start_fleet_with_traffic(conn: asyncpg.Connection, env: dict, log: Path, count: int):
    port = free_port()
    up = start_fleet(
        "up", "--workers", "2", "--handler", "noop", "--work-delay", "0.01",
        "--metrics-port", str(port), env={**env, "FLEET_METRICS_HOST": "127.0.0.1"}, log=log,
    )  # fmt: skip
    await wait_until(
        lambda: conn.fetchval("SELECT count(*) = 2 FROM fleet.workers"), timeout=60,
        message="two workers",
    )  # fmt: skip
    await conn.execute(
        """SELECT fleet.enqueue(session_id => 'ops-' || (g % 5), body => 'message ' || g)
           FROM generate_series(1, $1::int) AS g""",
        count,
    )
    await wait_until(
        lambda: conn.fetchval(
            "SELECT count(*) = $1 FROM fleet.messages WHERE state = 'done'", count
        ),
        timeout=60,
        message=f"{count} messages done",
    )
    return up, port


async def test_every_dashboard_and_alert_metric_exists_in_a_real_scrape(
    conn, fleet_env, tmp_path: Path
):
    up, port = await _start_fleet_with_traffic(conn, fleet_env, tmp_path / "up.log", 20)
    try:
        result = await wait_until(
            lambda: _scrape_if(port, lambda s: "fleet_workers_alive" in s.names), timeout=30
        )
    finally:
        stop(up)
    used = all_metric_names(e for _, e in dashboard_exprs() + alert_exprs())
    assert len(used) >= 20
    missing = sorted(used - result.names)
    assert not missing, f"the dashboard or alerts read metrics nobody exports: {missing}"
    # And the other way round: every fleet_ family exported is on the dashboard or in an alert.
    exported = {
        name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        for name in result.names
        if name.startswith("fleet_")
    }
    shown = {
        name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for name in used
    }
    forgotten = sorted(exported - shown - NOT_ON_DASHBOARD)
    assert not forgotten, f"exported but on no panel or alert: {forgotten}"


async def _scrape_if(port: int, predicate):
    try:
        result = await asyncio.to_thread(scrape, port)
    except OSError:
        return None
    return result if predicate(result) else None


def _prometheus_config(target_port: int) -> dict[str, Any]:
    """ops/prometheus/prometheus.yml aimed at the test's fleet, scraping every second."""
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(ALERTS)]
    job = config["scrape_configs"][0]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{target_port}"]}]
    job.pop("file_sd_configs", None)
    return config


def _api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


async def test_real_prometheus_scrapes_the_fleet_and_answers_dashboard_queries(
    conn, fleet_env, tmp_path: Path
):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus)")
    fleet_port = free_port()
    up = start_fleet(
        "up", "--workers", "2", "--handler", "noop", "--work-delay", "0.01",
        "--metrics-port", str(fleet_port),
        env={**fleet_env, "FLEET_METRICS_HOST": "127.0.0.1"}, log=tmp_path / "up.log",
    )  # fmt: skip
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(fleet_port)))
    log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_until(
            lambda: asyncio.to_thread(_target_up, prom_port), timeout=60, interval=0.5,
            message="Prometheus to scrape the fleet",
        )  # fmt: skip
        # Traffic while Prometheus watches: rates need samples before and after.
        for _ in range(3):
            await conn.execute(
                """SELECT fleet.enqueue(session_id => 'p-' || (g % 5), body => 'message ' || g)
                   FROM generate_series(1, 20) AS g"""
            )
            await asyncio.sleep(1.5)
        await wait_until(
            lambda: conn.fetchval("SELECT count(*) = 60 FROM fleet.messages WHERE state = 'done'"),
            timeout=60,
        )
        query = with_grafana_variables(
            "sum by (outcome) (rate(fleet_messages_completed_total[$__rate_interval]))"
        )
        assert query in {with_grafana_variables(e) for _, e in dashboard_exprs()}
        answer = await wait_until(
            lambda: asyncio.to_thread(_done_rate, prom_port, query), timeout=30, interval=0.5,
            message="a throughput answer with data",
        )  # fmt: skip
        assert answer > 0
        # Every dashboard query is PromQL Prometheus accepts; the core panels have data.
        empty = []
        for title, expr in dashboard_exprs():
            data = await asyncio.to_thread(
                _api, prom_port, "query", query=with_grafana_variables(expr)
            )
            if not data["result"]:
                empty.append(title)
        for title in (
            "Throughput by outcome",
            "Queue wait (enqueue to claim)",
            "Turn duration",
            "Backlog by state",
            "Workers alive",
            "Approvals pending",
        ):
            assert title not in empty, f"panel {title!r} has no data"
        backlog = await asyncio.to_thread(
            _api, prom_port, "query", query='max(fleet_queue_messages{state="done"})'
        )
        assert float(backlog["result"][0]["value"][1]) == 60
        # The alert rules load and evaluate against the live data.
        rules = await asyncio.to_thread(_api, prom_port, "rules")
        loaded = [r for g in rules["groups"] for r in g["rules"]]
        assert len(loaded) == len(alert_exprs())
        await wait_until(
            lambda: asyncio.to_thread(_rules_evaluated, prom_port), timeout=20, interval=0.5,
            message="every rule evaluated without error",
        )  # fmt: skip
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=15)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()
        stop(up)


def _target_up(port: int) -> bool:
    try:
        targets = _api(port, "targets")["activeTargets"]
    except OSError:
        return False
    return any(t["health"] == "up" for t in targets)


def _done_rate(port: int, query: str) -> float | None:
    for series in _api(port, "query", query=query)["result"]:
        if series["metric"].get("outcome") == "done" and float(series["value"][1]) > 0:
            return float(series["value"][1])
    return None


def _rules_evaluated(port: int) -> bool:
    rules = [r for g in _api(port, "rules")["groups"] for r in g["rules"]]
    assert all(r["health"] != "err" for r in rules), [r.get("lastError") for r in rules]
    return all(r["health"] == "ok" for r in rules)


# -- deployment files -------------------------------------------------------------------------


def _fleet_command_lines() -> list[list[str]]:
    """Every ``fleet ...`` invocation in compose, Kubernetes and systemd files (argv after
    ``fleet``)."""
    lines: list[list[str]] = []

    def from_shell(text: str) -> None:
        for part in text.split("&&"):
            words = shlex.split(part)
            if words and Path(words[0]).name == "fleet":
                lines.append(words[1:])

    compose = yaml.safe_load((OPS / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        if service.get("image") != "pgfleet:latest":
            continue
        entry = service.get("entrypoint")
        if entry and entry[:2] == ["sh", "-c"]:
            from_shell(entry[2])
        elif "command" in service:
            lines.append(service["command"])
    for manifest in sorted((OPS / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(manifest.read_text()):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []):
                if "args" in container:
                    lines.append(container["args"])
                command = container.get("command", [])
                if command[:2] == ["sh", "-c"]:
                    from_shell(command[2])
    for unit in sorted((OPS / "systemd").glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                from_shell(line.removeprefix("ExecStart="))
    return lines


def test_every_fleet_command_line_in_ops_parses():
    lines = _fleet_command_lines()
    assert any(line[:1] == ["worker"] for line in lines)
    assert any(line[:2] == ["mcp", "serve"] for line in lines)
    assert any(line[:2] == ["metrics", "serve"] for line in lines)
    failures = []
    for argv in {tuple(line) for line in lines}:
        done = subprocess.run(
            [sys.executable, "-m", "fleet", *argv, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        if done.returncode != 0:
            failures.append(f"fleet {' '.join(argv)}: {done.stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def test_systemd_units_verify(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    fleet_bin = shutil.which("fleet") or str(Path(sys.executable).parent / "fleet")
    for unit in (OPS / "systemd").iterdir():
        if unit.suffix in (".service", ".target"):
            text = unit.read_text().replace("/opt/pgfleet/venv/bin/fleet", fleet_bin)
            # The environment file is installed by the operator; verify must not need it.
            text = text.replace("EnvironmentFile=/", "EnvironmentFile=-/")
            (tmp_path / unit.name).write_text(text)
    units = ["fleet-worker@1.service", "fleet-metrics.service", "fleet-mcp.service", "fleet.target"]
    done = subprocess.run(
        [analyze, "verify", "--man=no", *(f"./{u}" for u in units)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    ours = [line for line in done.stderr.splitlines() if str(tmp_path) in line or "fleet" in line]
    assert done.returncode == 0 and not ours, done.stderr
    worker = (OPS / "systemd" / "fleet-worker@.service").read_text()
    assert "Environment=PROMETHEUS_MULTIPROC_DIR=/run/pgfleet/metrics" in worker
    assert "Restart=always" in worker and "KillSignal=SIGTERM" in worker


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for manifest in sorted((OPS / "k8s").glob("*.yaml")):
        if manifest.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    return docs


def test_kubernetes_manifests_scale_workers_on_queue_depth_with_mcp_separate():
    docs = _k8s_docs()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert {"customer-data", "fleet-worker", "fleet-metrics"} <= set(deployments)
    mcp = deployments["customer-data"]["spec"]["template"]["spec"]["containers"][0]
    assert mcp["args"][:2] == ["mcp", "serve"]
    worker = deployments["fleet-worker"]["spec"]["template"]["spec"]
    assert worker["containers"][0]["args"][0] == "worker"
    env = {e["name"]: e["value"] for e in worker["containers"][0]["env"]}
    assert env["FLEET_QUEUE_METRICS"] == "false"
    # SIGTERM grace outlasts the worker's own drain.
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert worker["terminationGracePeriodSeconds"] > float(config["data"]["FLEET_SHUTDOWN_GRACE"])
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "fleet-worker"
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "postgresql"
    auth = next(d for d in docs if d["kind"] == "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert "customer-data" in services
    assert config["data"]["CUSTOMER_DATA_URL"].startswith("http://customer-data:8765/")
    kubectl = shutil.which("kubectl")
    if kubectl:
        built = subprocess.run(
            [kubectl, "kustomize", str(OPS / "k8s")], capture_output=True, text=True, timeout=60
        )
        assert built.returncode == 0, built.stderr
        kinds = [d["kind"] for d in yaml.safe_load_all(built.stdout) if d]
        assert kinds.count("Deployment") == 3 and "ScaledObject" in kinds


async def test_keda_query_counts_claimable_and_running_messages(conn):
    scaled = next(d for d in _k8s_docs() if d["kind"] == "ScaledObject")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert await conn.fetchval(query) == 0
    # Session a: three messages, only its head is claimable. Session b: one. A retry not due.
    for session, body in [("a", "1"), ("a", "2"), ("a", "3"), ("b", "1"), ("c", "1")]:
        await conn.execute("SELECT fleet.enqueue(session_id => $1, body => $2)", session, body)
    await conn.execute(
        "UPDATE fleet.messages SET run_after = now() + interval '1 hour' WHERE session_id = 'c'"
    )
    assert await conn.fetchval(query) == 2
    # Cheap on a long history: the plan reads the partial indexes, not the table.
    plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query))
    assert "messages_claimable" in plan and "messages_running" in plan, plan


def test_compose_file_runs_workers_mcp_and_one_metrics_endpoint():
    compose = yaml.safe_load((OPS / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "migrate", "mcp", "worker", "metrics", "prometheus", "grafana"} <= set(
        services
    )
    assert services["worker"]["environment"]["FLEET_QUEUE_METRICS"] == "false"
    assert services["worker"]["environment"]["CUSTOMER_DATA_URL"] == "http://mcp:8765/mcp"
    prom = yaml.safe_load((OPS / "compose" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in prom["scrape_configs"]}
    assert jobs == {"fleet-workers", "fleet-metrics"}
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = volume.split(":")[0]
        assert (OPS / source).exists(), source
    assert (OPS / "Dockerfile").exists()
