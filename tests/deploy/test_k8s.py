"""deploy/k8s: every rendered manifest is schema-valid, and the pieces fit together (selectors,
references, GPU requests, shutdown timing, KEDA's view of the queue)."""

from __future__ import annotations

import re

import pytest

from tests.deploy.deployfiles import (
    K8S,
    KILN_IMAGE,
    OVERLAYS,
    SECRET_EXAMPLE,
    container_env,
    containers,
    find,
    kiln_containers,
    load_yaml,
    pyproject,
    rendered,
    secret_values,
)
from tests.deploy.kustomize import pod_specs
from tests.deploy.schemas import validate_k8s
from worker.celery_wire import redis_list_for
from worker.protocol import DEFAULT_QUEUE

NAMESPACE = "kiln"
KEDA_PROMETHEUS = K8S / "autoscaling" / "keda-prometheus.yaml"
WORKLOADS = {"Deployment", "StatefulSet"}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rendered_manifests_validate_against_kubernetes_schemas(overlay):
    resources = rendered(overlay)
    assert resources
    errors = [message for resource in resources for message in validate_k8s(resource)]
    assert not errors, "\n".join(errors)


def test_example_secret_validates_and_holds_only_placeholders():
    secret = load_yaml(SECRET_EXAMPLE)
    assert not validate_k8s(secret)
    for key, value in secret["stringData"].items():
        assert "REPLACE-WITH" in value, key


def test_schema_validation_catches_a_typo():
    deployment = dict(find(rendered("gpu"), "Deployment", "kiln-gateway"))
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    assert validate_k8s(broken)
    scaled = find(rendered("gpu"), "ScaledObject", "kiln-worker")
    assert validate_k8s({**scaled, "spec": {**scaled["spec"], "minReplicas": 1}})


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_everything_lives_in_the_kiln_namespace(overlay):
    for resource in rendered(overlay):
        if resource["kind"] == "Namespace":
            assert resource["metadata"]["name"] == NAMESPACE
        else:
            assert resource["metadata"]["namespace"] == NAMESPACE, resource["metadata"]["name"]
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kiln"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_selectors_match_their_pods(overlay):
    resources = rendered(overlay)
    pods = [r["spec"]["template"]["metadata"]["labels"] for r in resources if r["kind"] in WORKLOADS]

    def selects(selector: dict[str, str]) -> int:
        return sum(1 for labels in pods if selector.items() <= labels.items())

    for resource in resources:
        kind, spec = resource["kind"], resource.get("spec", {})
        if kind in WORKLOADS:
            assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        elif kind == "Service":
            assert selects(spec["selector"]) == 1, resource["metadata"]["name"]
        elif kind == "PodDisruptionBudget":
            assert selects(spec["selector"]["matchLabels"]) == 1, resource["metadata"]["name"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_references_resolve(overlay):
    """ConfigMaps, PVCs, secret keys, scale targets, service ports and serviceName all exist."""
    resources = rendered(overlay)
    names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    secret_keys = set(secret_values(overlay))
    for resource in resources:
        for spec in pod_specs(resource):
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
            for container in containers(resource):
                for source in container.get("envFrom", []):
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                for item in container.get("env", []):
                    ref = item.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == "kiln-secrets" and ref["key"] in secret_keys, item
        if resource["kind"] == "StatefulSet":
            assert ("Service", resource["spec"]["serviceName"]) in names
        if resource["kind"] == "HorizontalPodAutoscaler":
            assert ("Deployment", resource["spec"]["scaleTargetRef"]["name"]) in names
        if resource["kind"] == "Service":
            ports = {
                port["name"]
                for workload in resources
                if workload["kind"] in WORKLOADS
                for c in containers(workload)
                for port in c.get("ports", [])
            }
            for port in resource["spec"]["ports"]:
                assert port["targetPort"] in ports, port


def test_gateway_has_deployment_service_hpa_and_pdb():
    resources = rendered("gpu")
    deployment = find(resources, "Deployment", "kiln-gateway")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = find(resources, "HorizontalPodAutoscaler", "kiln-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "kiln-gateway",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = find(resources, "PodDisruptionBudget", "kiln-gateway")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a PDB that blocks every drain"
    service = find(resources, "Service", "kiln-gateway")
    assert [p["port"] for p in service["spec"]["ports"]] == [8188]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def test_gpu_workers_request_one_gpu_and_mount_models_read_only():
    worker = find(rendered("gpu"), "Deployment", "kiln-worker")
    spec = worker["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == ["worker", "--gpu", "0"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    (models,) = [v for v in spec["volumes"] if v["name"] == "models"]
    assert models["persistentVolumeClaim"] == {"claimName": "kiln-models", "readOnly": True}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
    env = {item["name"]: item for item in container["env"]}
    assert env["KILN_MODELS_DIRS"]["value"] == "/models"
    assert env["KILN_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a surge pod would wait for a GPU"


def test_cpu_dev_asks_for_no_gpu():
    resources = rendered("cpu-dev")
    assert "nvidia.com/gpu" not in str(resources).replace("nvidia.com/gpu.present", "")
    worker = find(resources, "Deployment", "kiln-worker")
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker", "--device", "cpu"]
    assert not [r for r in resources if r["apiVersion"].startswith(("keda.sh", "monitoring.coreos.com"))]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_worker_shutdown_timing(overlay):
    """grace > job hard limit, and grace > soft shutdown + cancel grace + margin (see worker.yaml)."""
    resources = rendered(overlay)
    worker = find(resources, "Deployment", "kiln-worker")
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    env = container_env(container, resources, secret_values(overlay))
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    soft = float(env["KILN_SOFT_SHUTDOWN_TIMEOUT_S"])
    assert grace >= soft + float(env["KILN_CANCEL_GRACE_S"]) + 30
    if overlay == "gpu":
        assert grace > float(env["KILN_JOB_TIMEOUT_S"])
        assert soft >= float(env["KILN_JOB_TIMEOUT_S"]), "a running attempt may end on its own"
    assert "lifecycle" not in container, "SIGTERM starts the drain; a preStop delay only eats grace"


def test_redis_statefulset_is_durable_and_never_evicts():
    resources = rendered("gpu")
    redis = find(resources, "StatefulSet", "kiln-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args
    assert re.search(r"--appendfsync (always|everysec)", args)
    assert "--maxmemory-policy noeviction" in args
    assert "--maxmemory $(REDIS_MAXMEMORY)" in args
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert redis["spec"]["replicas"] == 1


def test_keda_measures_every_priority_list_of_the_shared_queue():
    """The triggers' lists are exactly the Redis lists kombu uses for kiln.jobs, and the formula adds
    them all up (see autoscaling/keda.yaml for what is not counted, and why)."""
    resources = rendered("gpu")
    scaled = find(resources, "ScaledObject", "kiln-worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "kiln-worker"
    find(resources, "Deployment", spec["scaleTargetRef"]["name"])
    expected = {redis_list_for(DEFAULT_QUEUE, priority) for priority in range(10)}
    triggers = spec["triggers"]
    assert {t["metadata"]["listName"] for t in triggers} == expected
    assert len(triggers) == len(expected)
    names = {t["name"] for t in triggers}
    formula = spec["advanced"]["scalingModifiers"]["formula"]
    assert set(re.findall(r"[A-Za-z_]\w*", formula)) == names
    assert re.fullmatch(r"\w+( \+ \w+)*", formula), "the depth is the sum of the lists"
    redis_service = find(resources, "Service", "kiln-redis")
    port = redis_service["spec"]["ports"][0]["port"]
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["address"] == f"kiln-redis.{NAMESPACE}.svc.cluster.local:{port}"
        auth = find(resources, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        (ref,) = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "password" and ref["key"] in secret_values("gpu")


def test_keda_prometheus_alternative_can_replace_the_default():
    """keda-prometheus.yaml (the scaler on kiln_queue_depth, for clusters with Prometheus) is valid,
    has the default's name and target, and the autoscaling kustomization lists exactly one of the two."""
    alternative = load_yaml(KEDA_PROMETHEUS)
    assert not validate_k8s(alternative)
    default = find(rendered("gpu"), "ScaledObject", "kiln-worker")
    assert alternative["metadata"]["name"] == default["metadata"]["name"]
    assert alternative["metadata"]["namespace"] == NAMESPACE
    assert alternative["spec"]["scaleTargetRef"] == default["spec"]["scaleTargetRef"]
    for field in ("minReplicaCount", "maxReplicaCount", "cooldownPeriod"):
        assert alternative["spec"][field] == default["spec"][field], field
    (trigger,) = alternative["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert f'kiln_queue_depth{{namespace="{NAMESPACE}"}}' in trigger["metadata"]["query"]
    listed = load_yaml(KEDA_PROMETHEUS.parent / "kustomization.yaml")["resources"]
    assert len({"keda.yaml", "keda-prometheus.yaml"} & set(listed)) == 1


def test_service_monitor_scrapes_the_gateway_metrics_port():
    resources = rendered("gpu")
    monitor = find(resources, "ServiceMonitor", "kiln-gateway")
    service = find(resources, "Service", "kiln-gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_grafana_dashboard_is_shipped_as_a_sidecar_configmap():
    dashboard = find(rendered("gpu"), "ConfigMap", "kiln-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(dashboard["data"]) == {"kiln-dashboard.json"}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_pods_meet_the_restricted_pod_security_standard(overlay):
    for resource in rendered(overlay):
        for spec in pod_specs(resource):
            assert spec["securityContext"]["runAsNonRoot"] is True, resource["metadata"]["name"]
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            assert spec.get("automountServiceAccountToken") is False
            for container in spec["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False, container["name"]
                assert context["capabilities"]["drop"] == ["ALL"], container["name"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_images_are_pinned(overlay):
    version = pyproject()["project"]["version"]
    for resource in rendered(overlay):
        for container in containers(resource):
            image = container["image"]
            if KILN_IMAGE.search(image):
                assert image.endswith(f":{version}"), image
            else:
                assert re.search(r":[\w.-]+@sha256:[0-9a-f]{64}$", image), image


def test_kiln_containers_are_found():
    roles = sorted(c["name"] for _, c in kiln_containers(rendered("gpu")))
    assert roles == ["gateway", "worker"]
