"""The Grafana dashboard and the Prometheus alerts: well-formed, covering what issue 7 asks for,
and naming only metrics that exist (or that docs/operations.md lists as being added)."""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.deployfiles import K8S, ROOT, find, load_yaml, rendered

DASHBOARD = K8S / "monitoring" / "kiln-dashboard.json"
RULES = K8S / "monitoring" / "prometheusrule.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
# Kiln metrics the dashboard and alerts use before the code exports them (docs/operations.md).
PENDING = {
    "kiln_queue_depth",
    "kiln_jobs_total",
    "kiln_job_seconds",
    "kiln_model_loads_total",
    "kiln_affinity_hits_total",
    "kiln_gpu_memory_bytes",
}
# Metrics from the cluster's standard exporters.
EXTERNAL = {
    "up",
    "kube_pod_status_ready",
    "kube_pod_status_reason",
    "kube_deployment_status_replicas_available",
    "kube_statefulset_status_replicas_ready",
    "kube_pod_container_status_waiting_reason",
    "kube_pod_container_status_restarts_total",
    "kube_pod_container_resource_limits",
    "container_memory_working_set_bytes",
    "kubelet_volume_stats_available_bytes",
    "kubelet_volume_stats_capacity_bytes",
}


def exported_metrics() -> set[str]:
    """Series names the gateway's registry exports today (api/state.py)."""
    from api.state import Metrics

    names = set()
    for family in Metrics().registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def metrics_in(expression: str) -> set[str]:
    names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expression))
    return {re.sub(r"_(bucket|sum|count)$", "", name) if name.startswith("kiln_") else name for name in names}


def scaler_expressions() -> list[str]:
    alternative = load_yaml(K8S / "autoscaling" / "keda-prometheus.yaml")
    return [t["metadata"]["query"] for t in alternative["spec"]["triggers"] if t["type"] == "prometheus"]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def rules() -> list[dict]:
    return [rule for group in load_yaml(RULES)["spec"]["groups"] for rule in group["rules"]]


def anchors(markdown: str) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-") for h in headings}


def test_known_metrics_include_what_the_gateway_exports_today():
    exported = exported_metrics()
    assert {"kiln_jobs_submitted_total", "kiln_http_request_seconds"} <= exported


@pytest.mark.parametrize("source", ["dashboard", "alerts", "autoscaling"])
def test_only_known_metrics_are_used(source):
    expressions = {
        "dashboard": dashboard_expressions,
        "alerts": lambda: [str(r["expr"]) for r in rules()],
        "autoscaling": scaler_expressions,
    }[source]()
    used = set().union(*(metrics_in(e) for e in expressions))
    unknown = used - exported_metrics() - PENDING - EXTERNAL
    assert not unknown, unknown


def test_pending_metrics_are_documented():
    operations = OPERATIONS.read_text()
    for name in PENDING:
        assert f"`{name}`" in operations, name


def test_dashboard_covers_the_issue():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("queue depth", "job latency", "model loads", "affinity hit rate", "gpu memory"):
        assert topic in titles, topic
    used = set().union(*(metrics_in(e) for e in dashboard_expressions()))
    assert used >= PENDING
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'namespace="$namespace"' in target["expr"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace"}


def test_dashboard_configmap_carries_the_file():
    config = find(rendered("gpu"), "ConfigMap", "kiln-grafana-dashboard")
    assert json.loads(config["data"]["kiln-dashboard.json"]) == json.loads(DASHBOARD.read_text())


def test_alerts_are_complete_and_link_runbooks():
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    runbooks = anchors(OPERATIONS.read_text())
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor in runbooks, (rule["alert"], anchor)
        assert str(rule["expr"]).count("(") == str(rule["expr"]).count(")"), rule["alert"]
    for runbook in ("stuck-queue", "crash-looping-worker", "redis-failover", "storage-outage", "full-disk"):
        assert runbook in runbooks, runbook


def test_prometheus_rule_in_docs_matches_the_shipped_one():
    """docs/operations.md shows the shipped PrometheusRule, not a copy that drifts."""
    operations = OPERATIONS.read_text()
    assert "deploy/k8s/monitoring/prometheusrule.yaml" in operations
    for rule in rules():
        assert rule["alert"] in operations, rule["alert"]
