"""Metrics on /metrics and request ids in log lines, from the app as launched."""

from __future__ import annotations

import re
import urllib.request

SMALL = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


def _metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_outcomes_hits_and_timings(client, app_server) -> None:
    before = _metrics(app_server.url)
    _, meta = client.predict(prompt="a metered lantern", seed=31, **SMALL, api_name="/generate")
    client.predict(prompt="a metered lantern", seed=31, **SMALL, api_name="/generate")
    after = _metrics(app_server.url)
    assert _value(after, 'imagegen_requests_total{outcome="done"}') >= _value(before, 'imagegen_requests_total{outcome="done"}') + 1
    assert _value(after, "imagegen_cache_hits_total") >= _value(before, "imagegen_cache_hits_total") + 1
    assert _value(after, 'imagegen_generation_seconds_count{preset="base"}') >= 1
    assert _value(after, "imagegen_queue_wait_seconds_count") >= 1
    assert _value(after, "imagegen_model_load_seconds") > 0
    assert "imagegen_backlog" in after and "imagegen_dead_letters_total" in after


def test_log_lines_carry_the_request_id(client, app_server) -> None:
    request_id = client.predict(prompt="a logged lantern", seed=32, request_id="log-me-32", **SMALL,
                                api_name="/submit")
    client.predict(request_id=request_id, api_name="/status")
    import time

    def tagged() -> list[str]:
        return [line for line in app_server.log().splitlines() if ":log-me-32]" in line]  # the id as scoped to its caller

    deadline = time.monotonic() + 60
    while not any("generated in" in line for line in tagged()) and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = tagged()
    assert any("queued" in line for line in lines) and any("generated in" in line for line in lines)
