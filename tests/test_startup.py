"""Starting the app: clear failure without weights, and a clean build on Hugging Face Spaces."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT, app_env, free_port

SPACES_BUILD = """
from pathlib import Path
from fastapi.testclient import TestClient
import app
services = app.build_services(app.Settings.from_env(__import__("os").environ))
client = TestClient(app.build_app(services))
assert client.get("/config").status_code == 200
assert "Sign in with Hugging Face" in client.get("/config").text  # the sign-in button is on the page
assert client.get("/healthz").json()["model"]["preset"] == "turbo"
print("built on spaces")
"""


def _run_app(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_missing_local_weights_end_with_one_clear_message(tiny_model, tmp_path) -> None:
    env = app_env(tiny_model, free_port(), tmp_path / "out", MODEL_ID=str(tmp_path / "weights"))
    run = _run_app(env)
    assert run.returncode == 2
    assert "Traceback" not in run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "MODEL_ID" in errors[0] and "local folder" in errors[0]


def test_hub_model_without_network_names_model_id(tiny_model, tmp_path) -> None:
    env = app_env(tiny_model, free_port(), tmp_path / "out", HF_HOME=str(tmp_path / "hf"))
    del env["MODEL_ID"]
    run = _run_app(env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "MODEL_ID" in run.stderr and "stabilityai/sdxl-turbo" in run.stderr


def test_unknown_preset_is_one_line_not_a_traceback(tiny_model, tmp_path) -> None:
    run = _run_app(app_env(tiny_model, free_port(), tmp_path / "out", MODEL_PRESET="sd15"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "preset: unknown preset 'sd15'" in run.stderr


def test_a_bad_setting_names_its_variable(tiny_model, tmp_path) -> None:
    for name, value, words in (("KAFKA_PARTITIONS", "abc", "Not a valid int"), ("MAX_ATTEMPTS", "0", "at least 1"),
                               ("WARMUP", "maybe", "Not a valid bool")):
        run = _run_app(app_env(tiny_model, free_port(), tmp_path / "out", **{name: value}))
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        errors = [line for line in run.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and f"'{name}'" in errors[0] and words in errors[0], errors


def test_a_fleet_that_could_not_deliver_images_is_refused(tiny_model, tmp_path) -> None:
    run = _run_app(app_env(tiny_model, free_port(), tmp_path / "out", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",
                           REDIS_URL="redis://127.0.0.1:9/0"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "R2_BUCKET is not" in run.stderr and "could not be served by the others" in run.stderr


def test_app_builds_with_system_spaces(tiny_model, tmp_path) -> None:
    # Our spaces/ folder (no __init__.py) must not shadow the `spaces` package Gradio imports there.
    assert not (REPO_ROOT / "spaces" / "__init__.py").exists()
    # With hf_oauth: true the Space sets the OAuth variables: the sign-in button and its routes are built.
    env = app_env(tiny_model, free_port(), tmp_path / "out", SYSTEM="spaces", SPACE_ID="crafterse/imagegen",
                  SPACE_HOST="crafterse-imagegen.hf.space", WARMUP="0", OAUTH_CLIENT_ID="client-id",
                  OAUTH_CLIENT_SECRET="client-secret", OPENID_PROVIDER_URL="https://huggingface.co",
                  OAUTH_SCOPES="openid profile")
    run = subprocess.run([sys.executable, "-c", SPACES_BUILD], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "built on spaces" in run.stdout
