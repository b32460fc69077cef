"""deploy/prometheus and deploy/grafana: rule unit tests (promtool), names that exist,
and a real Prometheus server scraping a real gateway on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from buttress.distributed import FairQueue, Worker
from buttress.metrics import register
from buttress.service import ServiceHandlers
from buttress.testing import free_port
from conftest import wait_until
from service_support import Gateway

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "buttress-service.json"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package prometheus; .ci/run installs it)")
    return path


def test_rules_are_valid_and_their_unit_tests_pass() -> None:
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", "alerts_test.yml"],
                          cwd=RULES.parent, capture_output=True, text=True, timeout=120)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


def test_every_alert_has_a_runbook_entry() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "service.md").read_text()
    alerts = re.findall(r"- alert: (\w+)", RULES.read_text())
    assert len(alerts) == 6
    for alert in alerts:
        assert f"### {alert}" in docs, f"docs/service.md has no runbook entry for {alert}"


def exported_names(redis_client: Any, redis_url: str, gateway_metrics: str) -> set[str]:
    """Every metric family name a gateway (leader) and a worker process export."""
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\w+) ", gateway_metrics, re.M)}
    queue = FairQueue(redis_client, f"names-{os.getpid()}")
    registry = CollectorRegistry()
    service = ServiceHandlers({"x": lambda payload: None}, redis_client, queue.name)
    register(service.dedupe, registry, name="worker")
    register(Worker(queue, service.wrapped), registry)
    text = generate_latest(registry).decode()
    names |= {m.group(1) for m in re.finditer(r"^# TYPE (\w+) ", text, re.M)}
    return names


def referenced_names() -> set[str]:
    text = RULES.read_text() + DASHBOARD.read_text()
    names = set(re.findall(r"\bbuttress_[a-z_]+", text))
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}


@pytest.mark.slow
def test_prometheus_scrapes_the_gateway(tmp_path: Path, redis_url: str,
                                        redis_client: Any) -> None:
    """A real Prometheus on loopback scrapes a real gateway; a series arrives via its API.

    Also checks that every metric the rules and the dashboard use is exported.
    """
    prometheus = tool("prometheus")
    queue = f"scrape-{os.getpid()}"
    redis_client.set(f"buttress:leader:{{{queue}-maintenance}}:fence", 0)  # no quarantine
    gateway = Gateway(redis_url, queue, "--leader-ttl-ms", "1000", "--maintenance-interval",
                      "0.2", env={"BUTTRESS_GRACE_PERIOD": "3"}).wait_ready()
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: gateway\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{gateway.port}']\n")
    server = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for i in range(3):
            response = httpx.post(gateway.url + "/v1/tasks", timeout=10, json={
                "id": f"p-{i}", "tenant": "acme", "task": "record", "payload": {"n": i}})
            assert response.status_code == 202

        def accepted_series() -> Any:
            if server.poll() is not None:
                pytest.fail(f"prometheus exited: {server.stderr.read().decode()[-2000:]}")
            try:
                answer = httpx.get(f"http://127.0.0.1:{web_port}/api/v1/query", timeout=5,
                                   params={"query": 'buttress_gateway_requests_total'
                                                    '{code="202",outcome="accepted"}'}).json()
            except (httpx.HTTPError, ValueError):
                return None
            result = answer.get("data", {}).get("result", [])
            return result if result and float(result[0]["value"][1]) == 3 else None

        result = wait_until(accepted_series, timeout=60, interval=0.5,
                            message="the gateway's counter in Prometheus")
        assert result[0]["metric"]["job"] == "gateway"  # type: ignore[index]
        def leader_metrics() -> str | None:
            text = httpx.get(gateway.url + "/metrics", timeout=10).text
            return text if "buttress_queue_oldest_head_age_seconds" in text else None

        metrics = wait_until(leader_metrics, timeout=30, message="the leader's queue metrics")
        missing = referenced_names() - exported_names(redis_client, redis_url, str(metrics))
        assert not missing, f"rules or dashboard use metrics nobody exports: {sorted(missing)}"
        # The labels the rules group by are on the real series.
        for query, label, value in (
            ('max by (queue) (buttress_queue_state{state="normal"})', "queue", queue),
            ("max by (queue) (buttress_queue_oldest_head_age_seconds)", "queue", queue),
            ("sum by (gateway) (buttress_gateway_requests_total)", "gateway", queue),
            ("max by (election) (buttress_leader_is_leader)", "election",
             f"{queue}-maintenance"),
        ):
            def labelled(query: str = query) -> Any:
                answer = httpx.get(f"http://127.0.0.1:{web_port}/api/v1/query", timeout=5,
                                   params={"query": query}).json()
                return answer["data"]["result"] or None

            result = wait_until(labelled, timeout=30, interval=0.5, message=query)
            assert result[0]["metric"].get(label) == value, (query, result)  # type: ignore[index]
        rules = httpx.get(f"http://127.0.0.1:{web_port}/api/v1/rules", timeout=10).json()
        loaded = [rule["name"] for group in rules["data"]["groups"] for rule in group["rules"]]
        assert len(loaded) == 6
    finally:
        server.terminate()
        server.wait(30)
        gateway.kill()


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "buttress-service"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "buttress_" in target["expr"]


def test_kubernetes_manifests_agree_with_the_service() -> None:
    """Grace periods match BUTTRESS_GRACE_PERIOD, probes and the preStop drain are there, the
    autoscaling metric is one the service exports, and every alert is documented there."""
    kube = DEPLOY / "kubernetes"
    gateway = (kube / "service-gateway.yaml").read_text()
    grace = re.search(r"terminationGracePeriodSeconds: (\d+)", gateway)
    env = re.search(r'BUTTRESS_GRACE_PERIOD, value: "(\d+)"', gateway)
    assert grace and env and grace.group(1) == env.group(1)
    assert '["python", "-m", "buttress", "drain", "--port", "8080"]' in gateway
    assert "path: /readyz" in gateway and "path: /livez" in gateway
    assert 'BUTTRESS_PORT, value: "8080"' in gateway
    worker = (kube / "service-worker.yaml").read_text()
    assert '"--handlers", "buttress.service.worker:handlers"' in worker
    assert "name: buttress_queue_depth" in worker and "kind: HorizontalPodAutoscaler" in worker
    pdb = (kube / "service-pdb.yaml").read_text()
    assert pdb.count("kind: PodDisruptionBudget") == 3
    assert "buttress_queue_depth" in (REPO / "docs" / "metrics.md").read_text()
