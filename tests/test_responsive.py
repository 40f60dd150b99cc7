"""The server stays responsive while many users wait: waiting holds no server thread."""

from __future__ import annotations

import time
import urllib.request

from gradio_client import Client

from tests.conftest import get_json, start_app, stop_app

SMALL = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}
WAITERS = 40


def test_health_answers_within_a_second_while_forty_clients_wait(tiny_model, tmp_path) -> None:
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", QUEUE_MAX_SIZE="64", MAX_JOBS_PER_USER="0",
                    RATE_LIMIT_PER_HOUR="0")
    try:
        client = Client(app.url, verbose=False)
        head = client.submit(prompt="the slow one at the head", seed=1,
                             **{**SMALL, "width": 512, "height": 512, "steps": 50}, api_name="/generate")
        waiting = [client.submit(prompt=f"waiting {i}", seed=i, **SMALL, api_name="/generate")
                   for i in range(WAITERS)]
        deadline = time.monotonic() + 60
        while get_json(f"{app.url}/healthz")[1]["queue"]["depth"] < WAITERS - 5:
            assert time.monotonic() < deadline, "the waiting requests never reached the queue"
            time.sleep(0.2)
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            with urllib.request.urlopen(f"{app.url}/healthz", timeout=10) as response:
                assert response.status == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.2)
        assert max(latencies) < 1.0, latencies
        assert not head.done() and sum(job.done() for job in waiting) < WAITERS  # they were really waiting
    finally:
        stop_app(app)
