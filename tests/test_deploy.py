"""The Kubernetes deployment (deploy/kubernetes), validated offline: every manifest parses into the
Kubernetes client's models (the custom resources against the fields KEDA and the Prometheus operator
require), checkov finds nothing it does not explain, the manifests agree with the code (topic and group
names, ports, grace periods), and the worker's health server answers the probes they use."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from queueing.kafka import KafkaSettings
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
CORE_KINDS = {"Deployment": "V1Deployment", "Service": "V1Service", "ConfigMap": "V1ConfigMap",
              "PersistentVolumeClaim": "V1PersistentVolumeClaim", "Namespace": "V1Namespace",
              "PodDisruptionBudget": "V1PodDisruptionBudget", "NetworkPolicy": "V1NetworkPolicy",
              "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler"}
# Required fields of the custom resources, from their CRDs (KEDA v2, Prometheus operator v1).
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"): ["spec.scaleTargetRef.name", "spec.triggers"],
                ("keda.sh/v1alpha1", "TriggerAuthentication"): ["spec.secretTargetRef"],
                ("monitoring.coreos.com/v1", "PodMonitor"): ["spec.selector", "spec.podMetricsEndpoints"]}


class _Response:
    def __init__(self, document: dict) -> None:
        self.data = json.dumps(document)


def _documents() -> list[dict]:
    documents = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def _by_kind(kind: str, name: str) -> dict:
    return next(d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def _field(document: dict, dotted: str):
    value = document
    for part in dotted.split("."):
        value = value[part]
    return value


def _quantities_as_text(value, key: str = ""):
    """Resource quantities are strings in the API (`1` and `"1"` are the same quantity)."""
    if isinstance(value, dict):
        return {k: _quantities_as_text(v, k if key not in ("requests", "limits") else key) for k, v in value.items()}
    if isinstance(value, list):
        return [_quantities_as_text(v) for v in value]
    return str(value) if key in ("requests", "limits") and isinstance(value, int | float) else value


def test_every_manifest_parses_into_the_kubernetes_models() -> None:
    api = k8s.ApiClient()
    documents = _documents()
    assert {d["kind"] for d in documents} >= {"Deployment", "Service", "PodDisruptionBudget", "ScaledObject",
                                               "HorizontalPodAutoscaler", "PodMonitor", "NetworkPolicy"}
    for document in documents:
        custom = CUSTOM_KINDS.get((document["apiVersion"], document["kind"]))
        if custom is not None:
            for dotted in custom:
                assert _field(document, dotted), (document["kind"], dotted)
            continue
        model = api.deserialize(_Response(document), CORE_KINDS[document["kind"]])
        assert model.metadata.name == document["metadata"]["name"]
        if document["kind"] == "Deployment":  # the models dropped no field: the round trip is equal
            assert api.sanitize_for_serialization(model)["spec"] == _quantities_as_text(document["spec"])
    listed = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def _checkov() -> str:
    found = REPO_ROOT / ".venv" / "checkov" / "bin" / "checkov"
    path = str(found) if found.exists() else shutil.which("checkov")
    assert path, "checkov is not installed: .ci/run installs it into .venv/checkov"
    return path


def test_checkov_finds_no_problem_that_is_not_explained() -> None:
    done = subprocess.run([_checkov(), "-d", str(MANIFESTS), "--framework", "kubernetes", "--skip-download",
                           "-o", "json"], capture_output=True, text=True, timeout=600)
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 100  # it read the workloads (an unparsable file passes silently)
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == [], failed
    for skipped in report["results"]["skipped_checks"]:  # each accepted one says why, in the manifest
        assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped


def test_manifests_agree_with_the_code() -> None:
    settings = _by_kind("ConfigMap", "imagegen-settings")["data"]
    kafka = KafkaSettings(bootstrap_servers=settings["KAFKA_BOOTSTRAP_SERVERS"],
                          topic_prefix=settings["KAFKA_TOPIC_PREFIX"],
                          group_id=f"{settings['KAFKA_TOPIC_PREFIX']}.workers")
    triggers = [t["metadata"] for t in _by_kind("ScaledObject", "imagegen-gpu-worker")["spec"]["triggers"]]
    preset = settings["MODEL_PRESET"]
    assert [t["topic"] for t in triggers] == [kafka.preset_topic(preset), kafka.bulk_topic(preset)]
    for trigger in triggers:
        assert trigger["consumerGroup"] == kafka.preset_group(preset)
        assert trigger["bootstrapServers"] == settings["KAFKA_BOOTSTRAP_SERVERS"]

    worker = _by_kind("Deployment", "imagegen-gpu-worker")["spec"]["template"]["spec"]
    container = worker["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["command"] == ["python", "app.py", "--worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    health_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
    assert int(env["WORKER_HEALTH_PORT"]) == health_port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    # the job in hand (SHUTDOWN_GRACE_SECONDS) + a late hand-back (30 s) + the preStop pause
    assert worker["terminationGracePeriodSeconds"] >= float(settings["SHUTDOWN_GRACE_SECONDS"]) + 30 + pre_stop
    secret_keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e
                   and "secretKeyRef" in e["valueFrom"]}
    assert {"REDIS_URL", "R2_SECRET_ACCESS_KEY"} <= secret_keys  # secrets by reference, never inline
    assert not any(k in settings for k in ("REDIS_URL", "R2_SECRET_ACCESS_KEY", "KAFKA_SASL_PASSWORD"))
    assert worker["initContainers"][0]["command"] == ["python", "deploy/fetch_weights.py"]
    assert (REPO_ROOT / "deploy" / "fetch_weights.py").exists()


def test_the_worker_image_pins_its_versions() -> None:
    dockerfile = (DEPLOY / "docker" / "worker.Dockerfile").read_text()
    for base in re.findall(r"^FROM (\S+)", dockerfile, re.M):
        assert ":" in base and not base.endswith(":latest"), base
    for install in re.findall(r"pip install ([^&\n]+)", dockerfile):
        assert all("==" in arg or arg in ("-r", "requirements.txt") for arg in install.split()), install
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (REPO_ROOT / copied).exists(), copied


def _get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
            return response.status, json.loads(body) if body.startswith("{") else body
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.timeout(300)
def test_the_headless_worker_answers_the_probes(fleet) -> None:
    from tests.conftest import free_port

    port = free_port()
    fleet.start_worker("probed", WORKER_HEALTH_PORT=str(port))
    deadline, seen = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        try:
            code, body = _get(f"http://127.0.0.1:{port}/readyz")
        except OSError:  # not listening yet
            time.sleep(0.2)
            continue
        seen.append(code)
        if code == 200:
            break
        time.sleep(0.2)
    assert seen and seen[-1] == 200, seen
    deadline = time.monotonic() + 60
    while (health := _get(f"http://127.0.0.1:{port}/healthz")[1])["consumer"]["state"] != "consuming":
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    assert health["worker"] == "probed" and health["status"] == "ok"
    code, metrics = _get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200 and "imagegen_fleet_workers" in metrics
    assert _get(f"http://127.0.0.1:{port}/nothing")[0] == 404
