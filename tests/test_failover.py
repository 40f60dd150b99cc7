"""Storage failover: a second S3-compatible store (S3_FALLBACK_*) takes writes while R2 fails; reads and
URLs find each object where it lives."""

from __future__ import annotations

import json
import urllib.request

import pytest
from gradio_client import Client

from tests.conftest import start_app, stop_app
from tests.services import S3_KEY, S3_SECRET, S3Gate

pytestmark = pytest.mark.timeout(600)

SMALL = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


def _read(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_fallback_store_takes_writes_while_r2_fails(tiny_model, tmp_path, s3_server) -> None:
    primary, fallback = s3_server.bucket("r2"), s3_server.bucket("fallback")
    gate = S3Gate(s3_server)  # R2, behind a door we can close
    gate.open = False
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", S3_ENDPOINT_URL=gate.endpoint, R2_BUCKET=primary,
                    R2_ACCESS_KEY_ID=S3_KEY, R2_SECRET_ACCESS_KEY=S3_SECRET,
                    S3_FALLBACK_ENDPOINT_URL=s3_server.endpoint, S3_FALLBACK_BUCKET=fallback,
                    S3_FALLBACK_ACCESS_KEY_ID=S3_KEY, S3_FALLBACK_SECRET_ACCESS_KEY=S3_SECRET)
    try:
        client = Client(app.url, verbose=False)
        path, meta = client.predict(prompt="written while R2 is down", seed=1, **SMALL, api_name="/generate")
        assert meta["storage"] == "fallback" and meta["persisted"] is True, meta
        s3_server.client.head_object(Bucket=fallback, Key=meta["object_key"])
        assert _read(meta["url"]) == open(path, "rb").read()  # signed by the store that holds it
        health = json.loads(_read(f"{app.url}/healthz"))
        assert "R2" in health["degraded"] and "fallback store" in health["degraded"]["R2"]["meaning"]
        assert health["backends"]["objects"] == "s3 with fallback"

        gate.open = True  # R2 is back: new writes go there again
        _, later = client.predict(prompt="written once R2 is back", seed=2, **SMALL, api_name="/generate")
        assert later["storage"] == "primary"
        s3_server.client.head_object(Bucket=primary, Key=later["object_key"])

        _, again = client.predict(prompt="written while R2 is down", seed=1, **SMALL, api_name="/generate")
        assert again["cached"] and again["storage"] == "fallback"
        assert _read(again["url"]) == open(path, "rb").read()
    finally:
        stop_app(app)
        gate.stop()


def test_half_configured_fallback_is_refused_at_startup(tiny_model, tmp_path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, app_env, free_port

    env = app_env(tiny_model, free_port(), tmp_path / "out", S3_FALLBACK_BUCKET="spare")
    done = subprocess.run([sys.executable, "app.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "S3_FALLBACK_BUCKET needs S3_FALLBACK_ENDPOINT_URL" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr + done.stdout
