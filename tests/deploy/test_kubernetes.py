"""deploy/kubernetes/: every manifest, as kustomize renders it, validated offline and strictly
(kubernetes-validate --strict ships the API schemas), and read for what operations rely on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from .tools import DEPLOY, require_tool, run

pytestmark = pytest.mark.deploy

KUBERNETES = DEPLOY / "kubernetes"
KUSTOMIZATIONS = ("base", "worker", "overlays/example")
# The dispatcher's drain on SIGTERM is bounded well under this (stop consuming, finish the
# batch in hand, publish the outbox); the worker's includes the grace of running flows.
MIN_GRACE_S = {"dispatcher": 45, "worker": 300}


@pytest.fixture(scope="module")
def kustomize() -> list[str]:
    from .tools import kustomize_command

    return kustomize_command()


@pytest.fixture(scope="module")
def validator() -> str:
    return require_tool("kubernetes-validate", "pip install kubernetes-validate (dev extras)")


def render(kustomize: list[str], directory: str) -> str:
    result = run(*kustomize, KUBERNETES / directory)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    return result.stdout


def validate(validator: str, manifest: Path) -> tuple[int, str]:
    # Offline: every proxy points at a closed port, so a schema fetched from the network
    # would fail the validation; kubernetes-validate ships its schemas.
    offline = {
        **os.environ,
        **{name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
        **{name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "all_proxy")},
        "NO_PROXY": "",
        "no_proxy": "",
    }
    result = run(validator, "--strict", "--no-warn", manifest, env=offline)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def example(kustomize: list[str]) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render(kustomize, "overlays/example")) if d]


def find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [
        d for d in documents if d["kind"] == kind and d["metadata"]["name"].startswith(name)
    ]
    return found


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_kustomization_renders_and_validates_strictly(
    kustomize: list[str], validator: str, directory: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(render(kustomize, directory))
    code, report = validate(validator, manifest)
    assert code == 0, report
    documents = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    assert documents
    assert report.count("passed for resource") == len(documents), report


def test_every_manifest_file_validates_on_its_own(validator: str) -> None:
    files = [
        p
        for p in sorted(KUBERNETES.rglob("*.yaml"))
        if p.name != "kustomization.yaml"  # kustomize's own format, checked by rendering
    ]
    assert len(files) >= 8
    for path in files:
        code, report = validate(validator, path)
        assert code == 0, report


def test_strict_validation_rejects_an_unknown_field(
    validator: str, example: list[dict[str, Any]], tmp_path: Path
) -> None:
    deployment = find(example, "Deployment", "rundispatch-dispatcher")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    code, report = validate(validator, broken)
    assert code != 0 and "livenesProbe" in report, report


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def test_dispatcher_deployment(example: list[dict[str, Any]]) -> None:
    deployment = find(example, "Deployment", "rundispatch-dispatcher")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= MIN_GRACE_S["dispatcher"]
    settings = find(example, "ConfigMap", "rundispatch-settings")["data"]
    assert pod["terminationGracePeriodSeconds"] > float(settings["RUNDISPATCH_DRAIN_S"]) + 5
    main = container(deployment)
    assert main["args"] == ["serve"]
    (port,) = main["ports"]
    assert port == {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert set(main["resources"]) == {"requests", "limits"}
    secret = find(example, "Secret", "rundispatch-dispatcher")["metadata"]["name"]
    assert {"secretRef": {"name": secret}} in main["envFrom"]
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9464"


def test_worker_has_its_own_identity_and_state(example: list[dict[str, Any]]) -> None:
    worker = find(example, "StatefulSet", "rundispatch-worker-m1")
    assert worker["spec"]["replicas"] == 1  # one worker per machine, never two
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= MIN_GRACE_S["worker"]
    values = find(example, "ConfigMap", "rundispatch-settings")["data"]
    # The flows' grace, then reporting their outcomes, all before Kubernetes kills the pod.
    drain = float(values["RUNDISPATCH_WORKER_GRACE_S"]) + float(values["RUNDISPATCH_DRAIN_S"])
    assert grace > drain + 5
    main = container(worker)
    assert main["command"] == ["rundispatch-worker"]
    args = main["args"]
    assert args[args.index("--machine-id") + 1] == "m1"
    own_secret = find(example, "Secret", "rundispatch-worker-m1")
    dispatcher_secret = find(example, "Secret", "rundispatch-dispatcher")
    secrets = [e["secretRef"]["name"] for e in main["envFrom"] if "secretRef" in e]
    assert secrets == [own_secret["metadata"]["name"]]
    assert dispatcher_secret["metadata"]["name"] not in str(worker)
    assert set(own_secret["data"]) == {"RUNDISPATCH_AMQP_URL"}
    settings = find(example, "ConfigMap", "rundispatch-settings")["data"]
    assert not [k for k in settings if k.endswith(("_URL", "_KEYS", "_SECRET"))]
    metrics_port = args[args.index("--metrics-port") + 1]
    assert {"name": "RUNDISPATCH_METRICS_PORT", "value": metrics_port} in main["env"]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    (claim,) = worker["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == args[args.index("--state-dir") + 1]


def test_every_pod_runs_as_the_images_non_root_user_read_only(
    example: list[dict[str, Any]],
) -> None:
    workloads = [d for d in example if d["kind"] in {"Deployment", "StatefulSet"}]
    assert len(workloads) == 2
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
        assert pod["automountServiceAccountToken"] is False
        security = container(workload)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}


def test_disruption_budget_and_services_select_the_pods(example: list[dict[str, Any]]) -> None:
    pdb = find(example, "PodDisruptionBudget", "rundispatch-dispatcher")
    assert pdb["spec"]["minAvailable"] == 1
    deployment = find(example, "Deployment", "rundispatch-dispatcher")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service_name, workload in (
        ("rundispatch-dispatcher", deployment),
        ("rundispatch-worker-m1", find(example, "StatefulSet", "rundispatch-worker-m1")),
    ):
        service = find(example, "Service", service_name)
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        # Headless and publishing not-ready pods: deploy/prometheus/kubernetes.yml finds every
        # pod through DNS, ready or not.
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
    statefulset = find(example, "StatefulSet", "rundispatch-worker-m1")
    assert statefulset["spec"]["serviceName"] == "rundispatch-worker-m1"
    assert all(
        d["metadata"].get("namespace") == "rundispatch" for d in example if d["kind"] != "Namespace"
    )
