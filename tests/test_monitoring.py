"""Monitoring artifacts (deploy/monitoring): alert rules checked and unit-tested by promtool, a real
Prometheus server scraping the running app with those rules loaded, and a Grafana dashboard that reads
only metrics the app serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from gradio_client import Client

from tests.conftest import REPO_ROOT, free_port, start_app, stop_app
from tests.services import stop_process, wait_for_port

MONITORING = REPO_ROOT / "deploy" / "monitoring"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _promtool(*args: str) -> str:
    done = subprocess.run([PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_pass_promtool_checks_and_unit_tests() -> None:
    assert "SUCCESS: 6 rules found" in _promtool("check", "rules", "alerts.yml")
    _promtool("test", "rules", "alerts_test.yml")
    _promtool("check", "config", "prometheus.yml")


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]["result"]


def _served_metric_names(app_url: str) -> set[str]:
    text = urllib.request.urlopen(f"{app_url}/metrics", timeout=5).read().decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if kind == "counter":
            names.add(f"{name}_total" if not name.endswith("_total") else name)
    return names


def test_prometheus_scrapes_the_app_and_the_dashboard_reads_what_it_serves(tiny_model, tmp_path) -> None:
    app = start_app(tiny_model, tmp_path / "app", MODEL_PRESET="base")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{MONITORING / 'alerts.yml'}']\n"
        "scrape_configs:\n"
        f"  - job_name: imagegen\n    static_configs: [{{targets: ['{app.url.removeprefix('http://')}']}}]\n")
    prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port)
        Client(app.url, verbose=False).predict(prompt="a watched forge", seed=1, negative_prompt="", preset="base",
                                               width=256, height=256, steps=2, guidance_scale=5.0,
                                               api_name="/generate")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _query(base, 'imagegen_requests_total{outcome="done"}'):
            time.sleep(0.5)
        done = _query(base, 'imagegen_requests_total{outcome="done"}')
        assert done and float(done[0]["value"][1]) >= 1, done
        assert float(_query(base, 'up{job="imagegen"}')[0]["value"][1]) == 1
        assert _query(base, 'imagegen_fleet_workers{preset="base"}')[0]["value"][1] == "1"
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as response:
            rules = json.loads(response.read())["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} >= {"ImagegenNoLiveWorker", "ImagegenErrorRate", "ImagegenDeadLetters"}
        assert all(r["health"] == "ok" for r in rules), rules  # every rule evaluates against real data

        served = _served_metric_names(app.url)
        dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        for expr in exprs + [r["query"] for r in rules]:
            for name in set(re.findall(r"\b(imagegen_[a-z_]+)", expr)):
                assert name in served, f"{name} (in {expr!r}) is not served by the app"
        for expr in exprs:  # and Prometheus itself accepts every panel's query
            _query(base, expr)
    finally:
        stop_process(prometheus)
        stop_app(app)
