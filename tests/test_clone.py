"""The clone tool: right secrets and variables, safe to repeat, secrets never printed.

The Hugging Face Hub is the outer edge here (unreachable offline), so the API object is a recorder."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("spaces_clone", REPO_ROOT / "spaces" / "clone.py")
clone = importlib.util.module_from_spec(spec)
sys.modules["spaces_clone"] = clone  # dataclasses look their module up while the file executes
spec.loader.exec_module(clone)

ENV = {"KAFKA_BOOTSTRAP_SERVERS": "kafka.example.com:443", "KAFKA_SASL_PASSWORD": "s3cr3t-kafka",
       "REDIS_URL": "rediss://default:s3cr3t-redis@redis.example.com:443", "R2_BUCKET": "crafterse",
       "R2_ACCESS_KEY_ID": "AKIAEXAMPLE", "R2_SECRET_ACCESS_KEY": "s3cr3t-r2", "MODEL_PRESET": "turbo"}


class RecordingHub:
    def __init__(self) -> None:
        self.spaces: dict[str, dict] = {}
        self.calls: list[str] = []

    def duplicate_repo(self, source, target, *, repo_type, private, exist_ok, space_hardware, space_secrets,
                       space_variables):
        self.calls.append("duplicate_repo")
        assert repo_type == "space" and exist_ok
        if target not in self.spaces:  # like the Hub: an existing Space is left as it is
            self.spaces[target] = {"secrets": {s["key"]: s["value"] for s in space_secrets},
                                   "variables": {v["key"]: v["value"] for v in space_variables},
                                   "hardware": space_hardware}
        return f"https://huggingface.co/spaces/{target}"

    def add_space_secret(self, target, key, value):
        self.spaces[target]["secrets"][key] = value

    def add_space_variable(self, target, key, value):
        self.spaces[target]["variables"][key] = value

    def request_space_hardware(self, target, hardware):
        self.spaces[target]["hardware"] = hardware


def test_secrets_are_secrets_and_variables_are_variables() -> None:
    hub = RecordingHub()
    plan = clone.plan_clone("crafterse/imagegen", "crafterse/imagegen-2", "cpu-upgrade", True, ENV)
    clone.apply_clone(hub, plan)
    space = hub.spaces["crafterse/imagegen-2"]
    assert set(space["secrets"]) == {"KAFKA_SASL_PASSWORD", "REDIS_URL", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY"}
    assert space["variables"] == {"KAFKA_BOOTSTRAP_SERVERS": "kafka.example.com:443", "R2_BUCKET": "crafterse",
                                  "MODEL_PRESET": "turbo"}
    assert space["hardware"] == "cpu-upgrade"


def test_running_twice_updates_the_existing_clone() -> None:
    hub = RecordingHub()
    clone.apply_clone(hub, clone.plan_clone("a/s", "a/s-2", "cpu-basic", True, ENV))
    rotated = {**ENV, "R2_SECRET_ACCESS_KEY": "rotated", "MODEL_PRESET": "lightning"}
    clone.apply_clone(hub, clone.plan_clone("a/s", "a/s-2", "t4-small", True, rotated))
    space = hub.spaces["a/s-2"]
    assert space["secrets"]["R2_SECRET_ACCESS_KEY"] == "rotated"
    assert space["variables"]["MODEL_PRESET"] == "lightning" and space["hardware"] == "t4-small"


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
