"""The app as launched by `python app.py`, called over HTTP with gradio_client on every endpoint."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError

from inference.images import read_parameters
from tests.conftest import get_json, wait_for_status

SMALL = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2,
         "guidance_scale": 5.0}


def _generate(client, prompt: str, seed=None, **overrides):
    return client.predict(prompt=prompt, seed=seed, **{**SMALL, **overrides}, api_name="/generate")


def _fetch(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read(), response.headers["Content-Type"]


def test_api_lists_the_documented_endpoints(client) -> None:
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/submit", "/status", "/cancel", "/feedback", "/models"} <= set(api)
    assert [p["parameter_name"] for p in api["/feedback"]["parameters"]] == ["request_id", "vote"]
    generate_params = [p["parameter_name"] for p in api["/generate"]["parameters"]]
    fields = ["prompt", "negative_prompt", "preset", "width", "height", "steps", "guidance_scale", "seed"]
    sketch = ["init_image", "strength", "loras", "style_weight"]
    assert generate_params == fields + sketch + ["history_key"]
    assert [p["parameter_name"] for p in api["/submit"]["parameters"]] == fields + [
        "request_id", "priority", "webhook_url"] + sketch
    optional = {p["parameter_name"] for p in api["/submit"]["parameters"] if p["parameter_has_default"]}
    assert {"negative_prompt", "priority", "webhook_url", "init_image", "strength", "loras", "style_weight"} <= optional
    assert len(api["/generate"]["returns"]) == 2  # the image and its metadata; UI state stays private


def test_generate_returns_image_and_metadata_and_repeat_is_identical_cache_hit(client) -> None:
    image_path, meta = _generate(client, "a lighthouse at dusk", seed=99)
    assert meta["cached"] is False and meta["seed"] == 99 and meta["seed_derived"] is False
    assert set(meta["timings"]) >= {"generate_s", "store_s", "total_s"}
    again_path, again = _generate(client, "a lighthouse at dusk", seed=99)
    assert again["cached"] is True and again["url"] == meta["url"]
    assert again["fingerprint"] == meta["fingerprint"] and again["request_id"] != meta["request_id"]
    assert Path(image_path).read_bytes() == Path(again_path).read_bytes()
    stored, content_type = _fetch(meta["url"])
    assert content_type == "image/png" and stored == Path(image_path).read_bytes()
    assert read_parameters(stored).startswith("a lighthouse at dusk\nSteps: 2, Sampler: Euler, CFG scale: 5,")


def test_omitted_seed_is_derived_and_reproducible(client) -> None:
    _, meta = _generate(client, "a derived seed", seed=None)
    _, again = _generate(client, "a derived seed", seed=-1)  # -1 is how the UI says "no seed"
    assert meta["seed_derived"] is True and again["seed"] == meta["seed"] and again["cached"] is True


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"prompt": "  "}, "prompt"), ({"width": 300}, "width"), ({"steps": 51}, "steps"),
     ({"guidance_scale": 25}, "guidance_scale"), ({"preset": "turbo"}, "preset")],
)
def test_bad_input_is_an_error_naming_the_field(client, overrides: dict, field: str) -> None:
    with pytest.raises(AppError) as raised:
        client.predict(**{"prompt": "ok", "seed": None, **SMALL, **overrides}, api_name="/generate")
    assert str(raised.value).startswith(f"{field}") or f"{field}:" in str(raised.value)
    assert "Traceback" not in str(raised.value)


def test_submit_then_status_until_done(client) -> None:
    request_id = client.predict(prompt="a submitted castle", seed=5, request_id="castle-5", **SMALL,
                                api_name="/submit")
    assert request_id == "castle-5"
    done = wait_for_status(client, request_id, lambda s: s["state"] == "done")
    assert done["step"] == done["total_steps"] == 2 and done["result"]["url"].endswith(".png")
    again = client.predict(prompt="a submitted castle", seed=5, request_id="castle-5", **SMALL,
                           api_name="/submit")
    assert again == "castle-5"  # idempotent: no second job


def test_cancel_mid_generation(client) -> None:
    slow = {**SMALL, "width": 1024, "height": 1024, "steps": 50, "guidance_scale": 7.5}
    request_id = client.predict(prompt="a slow cathedral", seed=1, request_id="", **slow, api_name="/submit")
    running = wait_for_status(client, request_id, lambda s: s["state"] == "running" and s["step"] >= 1)
    assert running["total_steps"] == 50 and running["queue_position"] == 0
    client.predict(request_id=request_id, api_name="/cancel")
    cancelled = wait_for_status(client, request_id, lambda s: s["state"] != "running")
    assert cancelled["state"] == "cancelled" and cancelled["step"] < 50
    assert "cancelled" in cancelled["error"] and cancelled["result"] is None


def test_status_of_unknown_request_is_a_clear_error(client) -> None:
    with pytest.raises(AppError, match="no request with id 'missing'"):
        client.predict(request_id="missing", api_name="/status")


def test_healthz_reports_model_and_queue(app_server) -> None:
    code, health = get_json(f"{app_server.url}/healthz")
    assert code == 200 and health["status"] == "ok"
    assert health["model"]["state"] == "ready" and health["model"]["device"] == "cpu"
    assert health["model"]["preset"] == "base" and health["model"]["dtype"] in ("bfloat16", "float32")
    assert health["queue"]["kind"] == "local" and health["queue"]["depth"] == 0
    assert health["backends"] == {"queue": "in-process", "cache": "in-memory", "jobs": "in-memory",
                                  "objects": "local folder", "remote": None}
    assert health["remote"] is None  # no GPU service configured
    assert health["unreachable"] == []
