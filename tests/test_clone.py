"""The clone tool: right secrets and variables, safe to repeat, secrets never printed.

The Hugging Face Hub is the outer edge here (unreachable offline): the real HfApi talks over HTTP to a
local server that answers like the Hub."""

from __future__ import annotations

import http.server
import importlib.util
import json
import subprocess
import sys
import threading

import pytest
from huggingface_hub import HfApi

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("spaces_clone", REPO_ROOT / "spaces" / "clone.py")
clone = importlib.util.module_from_spec(spec)
sys.modules["spaces_clone"] = clone  # dataclasses look their module up while the file executes
spec.loader.exec_module(clone)

ENV = {"KAFKA_BOOTSTRAP_SERVERS": "kafka.example.com:443", "KAFKA_SASL_PASSWORD": "s3cr3t-kafka",
       "REDIS_URL": "rediss://default:s3cr3t-redis@redis.example.com:443", "R2_BUCKET": "crafterse",
       "R2_ACCESS_KEY_ID": "AKIAEXAMPLE", "R2_SECRET_ACCESS_KEY": "s3cr3t-r2", "MODEL_PRESET": "turbo"}


class LocalHub:
    """A local HTTP server that answers the Hub API calls the tool makes, the way the Hub does: 404
    with X-Error-Code for a missing repo, 409 with an error body when duplicating onto an existing
    Space, and a duplicate that copies the source's variables (but not its secrets)."""

    def __init__(self) -> None:
        outer = self
        self.spaces: dict[str, dict] = {"crafterse/imagegen": {
            "secrets": {}, "variables": {"KAFKA_CONSUME": "0", "WORKER_NAME": "ui-1", "MODEL_PRESET": "turbo"},
            "hardware": "cpu-upgrade", "sleep": None}}
        self.duplicates = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def _route(self) -> None:
                path = self.path.split("?")[0].removeprefix("/api/spaces/").split("/")
                repo, action = "/".join(path[:2]), "/".join(path[2:])
                space = outer.spaces.get(repo)
                if space is None:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                body = self._body() if self.command in ("POST", "DELETE") else {}
                if action == "":
                    return self._json(200, {"id": repo, "sha": "0" * 40, "private": True, "tags": [],
                                            "siblings": [], "likes": 0})
                if action == "duplicate":
                    return self._duplicate(space, body)
                if action == "secrets":
                    space["secrets"][body["key"]] = body["value"]
                    return self._json(200, {})
                if action == "variables":
                    if self.command == "POST":
                        space["variables"][body["key"]] = body["value"]
                    elif self.command == "DELETE":
                        space["variables"].pop(body["key"], None)
                    return self._json(200, {k: {"value": v} for k, v in space["variables"].items()})
                if action == "hardware":
                    space["hardware"] = body["flavor"]
                elif action == "sleeptime":
                    space["sleep"] = body["seconds"]
                return self._json(200, {"stage": "RUNNING", "hardware": {"current": space["hardware"],
                                                                          "requested": space["hardware"]}})

            def _duplicate(self, source: dict, body: dict) -> None:
                target = body["repository"]
                if target in outer.spaces:
                    return self._json(409, {"error": "You already created this space repo"})
                outer.duplicates += 1
                outer.spaces[target] = {
                    "secrets": {s["key"]: s["value"] for s in body.get("secrets", [])},
                    "variables": {**source["variables"], **{v["key"]: v["value"] for v in body.get("variables", [])}},
                    "hardware": body.get("hardware"), "sleep": None}
                return self._json(200, {"url": f"https://huggingface.co/spaces/{target}"})

            do_GET = do_POST = do_DELETE = _route

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.api = HfApi(endpoint=f"http://127.0.0.1:{self.server.server_port}", token="hf_test_token")

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def hub():
    local = LocalHub()
    yield local
    local.stop()


def test_secrets_are_secrets_and_variables_are_variables(hub) -> None:
    plan = clone.plan_clone("crafterse/imagegen", "crafterse/imagegen-2", "cpu-upgrade", True, ENV)
    clone.apply_clone(hub.api, plan)
    space = hub.spaces["crafterse/imagegen-2"]
    assert set(space["secrets"]) == {"KAFKA_SASL_PASSWORD", "REDIS_URL", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY"}
    # the source's UI-only role and worker name are not carried into a clone meant to add capacity
    assert space["variables"] == {"KAFKA_BOOTSTRAP_SERVERS": "kafka.example.com:443", "R2_BUCKET": "crafterse",
                                  "MODEL_PRESET": "turbo"}
    assert space["hardware"] == "cpu-upgrade" and space["sleep"] == -1  # a fleet worker never sleeps


def test_running_twice_updates_the_existing_clone(hub) -> None:
    clone.apply_clone(hub.api, clone.plan_clone("crafterse/imagegen", "crafterse/s-2", "cpu-upgrade", True, ENV))
    rotated = {**ENV, "R2_SECRET_ACCESS_KEY": "rotated", "MODEL_PRESET": "lightning"}
    url = clone.apply_clone(hub.api, clone.plan_clone("crafterse/imagegen", "crafterse/s-2", "t4-small", True,
                                                      rotated))
    assert hub.duplicates == 1 and url.endswith("/spaces/crafterse/s-2")  # the rerun did not duplicate again
    space = hub.spaces["crafterse/s-2"]
    assert space["secrets"]["R2_SECRET_ACCESS_KEY"] == "rotated"
    assert space["variables"]["MODEL_PRESET"] == "lightning" and space["hardware"] == "t4-small"


def test_the_hub_refuses_duplicating_onto_an_existing_space(hub) -> None:
    # why the tool looks first: this is what huggingface_hub's duplicate_repo meets on a rerun
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{hub.api.endpoint}/api/spaces/crafterse/imagegen/duplicate", method="POST",
                                     data=json.dumps({"repository": "crafterse/imagegen"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 409 and "already created" in json.loads(refused.value.read())["error"]


def test_free_hardware_is_allowed_but_never_set_to_stay_awake(hub) -> None:
    clone.apply_clone(hub.api, clone.plan_clone("crafterse/imagegen", "crafterse/free", "cpu-basic", True, ENV))
    assert hub.spaces["crafterse/free"]["hardware"] == "cpu-basic" and hub.spaces["crafterse/free"]["sleep"] is None


def test_missing_fleet_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="KAFKA_BOOTSTRAP_SERVERS, REDIS_URL"):
        clone.plan_clone("a/s", "a/s-2", "cpu-basic", True, {"R2_BUCKET": "x"})


def test_dry_run_prints_the_plan_without_secret_values() -> None:
    run = subprocess.run([sys.executable, "spaces/clone.py", "--source", "a/s", "--target", "a/s-2", "--dry-run"],
                         cwd=REPO_ROOT, env={**ENV, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "secret   REDIS_URL (set, value hidden)" in output and "variable R2_BUCKET=crafterse" in output
    assert not any(secret in output for secret in ("s3cr3t", "AKIAEXAMPLE"))
