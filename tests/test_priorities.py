"""Priorities: interactive requests run before bulk ones, and bulk ones are never starved.

In process (the embedded queue), through the API (/submit's `priority`), and across the fleet's two
topics (`<prefix>.requests.<preset>` and its `.bulk` twin) with a real broker.
"""

from __future__ import annotations

import threading
import time

import pytest
from gradio_client import Client

from inference.errors import InvalidRequest
from inference.request import GenerationRequest
from queueing.local import LocalQueue
from tests.conftest import open_form, start_app, stop_app

SMALL = {"width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


def _request(prompt: str, priority: str = "interactive", **fields) -> GenerationRequest:
    return GenerationRequest.create(prompt, preset="base", priority=priority, **{**SMALL, **fields})


def test_priority_is_validated_and_outside_the_fingerprint() -> None:
    bulk, interactive = _request("a barrel", "bulk", seed=1), _request("a barrel", seed=1)
    assert bulk.pixel_fields() == interactive.pixel_fields()  # same image: one cache entry for both
    assert bulk.to_dict()["priority"] == "bulk"
    assert "priority" not in interactive.to_dict()  # the default keeps the wire form workers already read
    assert GenerationRequest.from_dict(bulk.to_dict()).priority == "bulk"
    with pytest.raises(InvalidRequest, match="priority.*interactive.*bulk"):
        _request("a barrel", "urgent")


def test_local_queue_runs_interactive_first_and_one_bulk_in_every_four() -> None:
    ran: list[str] = []
    gate = threading.Event()

    def handler(request: GenerationRequest) -> None:
        if request.prompt == "blocker":
            gate.wait(10)
        ran.append(request.prompt)

    queue = LocalQueue(handler, max_size=32, bulk_every=4)
    queue.start()
    try:
        queue.put(_request("blocker"))
        deadline = time.monotonic() + 5
        while queue.running_id is None and time.monotonic() < deadline:
            time.sleep(0.01)
        for name in ("b1", "b2", "b3"):
            queue.put(_request(name, "bulk"))
        for name in ("i1", "i2", "i3", "i4", "i5"):
            queue.put(_request(name))
        # Positions predict the order the queue will really run them in.
        predicted = sorted(("b1", "b2", "b3", "i1", "i2", "i3", "i4", "i5"),
                           key=lambda p: queue.position(_find(queue, p)))
        gate.set()
        deadline = time.monotonic() + 10
        while len(ran) < 9 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        queue.stop()
    # The blocker was the first interactive run: two more, then a bulk one (1 in every 4), and so on.
    assert ran == ["blocker", "i1", "i2", "b1", "i3", "i4", "i5", "b2", "b3"], ran
    assert predicted == ran[1:]


def _find(queue: LocalQueue, prompt: str) -> str:
    for request in queue._run_order():
        if request.prompt == prompt:
            return request.request_id
    raise AssertionError(prompt)


def test_bulk_every_zero_is_strict_priority() -> None:
    queue = LocalQueue(lambda request: None, bulk_every=0)
    for name in ("b1", "b2"):
        queue.put(_request(name, "bulk"))
    for name in ("i1", "i2", "i3", "i4", "i5"):
        queue.put(_request(name))
    assert [r.prompt for r in queue._run_order()] == ["i1", "i2", "i3", "i4", "i5", "b1", "b2"]


def _wait_state(client: Client, request_id: str, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.predict(request_id, api_name="/status")["state"] != state:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{request_id} never {state}")
        time.sleep(0.05)


def _wait_done(client: Client, request_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(request_id, api_name="/status")
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise TimeoutError(request_id)


def test_api_interactive_request_overtakes_a_bulk_backlog(tiny_model, tmp_path) -> None:
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", WARMUP="0", MAX_JOBS_PER_USER="0",
                    RATE_LIMIT_PER_HOUR="0", BULK_EVERY="4")
    try:
        client = Client(app.url, verbose=False)
        fields = dict(prompt="", negative_prompt="", preset="base", width=256, height=256, steps=6,
                      guidance_scale=5.0)
        # A slow request holds the worker while the batch is admitted one request at a time: without it,
        # a quick first bulk request could finish (and the next start) before the batch's last request
        # is in the queue (CI saw it), and the test would measure admission speed, not priorities.
        blocker = client.predict(**{**fields, "prompt": "a slow anvil", "width": 512, "height": 512, "steps": 40},
                                 seed=1, api_name="/submit")
        _wait_state(client, blocker, "running")
        items = [{**fields, "prompt": f"bulk crate {i}", "seed": i, "priority": "bulk"} for i in range(4)]
        items.append({**fields, "prompt": "urgent sword", "seed": 7})
        outcomes = client.predict(items, api_name="/submit_batch")
        *bulk, urgent = [outcome["request_id"] for outcome in outcomes]
        assert client.predict(bulk[0], api_name="/status")["priority"] == "bulk"
        if client.predict(blocker, api_name="/status")["state"] == "running":
            # Queued behind the blocker, the interactive request is next although it came last.
            assert client.predict(urgent, api_name="/status")["queue_position"] == 1
        status = _wait_done(client, urgent)
        assert status["state"] == "done" and status["priority"] == "interactive", status
        waiting = [client.predict(rid, api_name="/status")["state"] for rid in bulk]
        # FIFO would have run all four bulk requests first; only the one the worker took after the urgent
        # request may have finished by the time these are read.
        assert waiting.count("done") <= 1 and waiting[-1] == "queued", waiting
        final = client.predict(bulk, 120, api_name="/wait_all")
        assert all(s["state"] == "done" for s in final.values()), final  # bulk is served too
        with pytest.raises(Exception, match="priority"):
            client.predict(**{**fields, "prompt": "late"}, seed=1, priority="later", api_name="/submit")
        interactive_first = client.predict(**{**fields, "prompt": "bulk crate 0"}, seed=0, api_name="/submit")
        assert _wait_done(client, interactive_first)["result"]["cached"] is True  # priority is not in the fingerprint
    finally:
        stop_app(app)


@pytest.mark.timeout(600)
def test_fleet_worker_takes_the_interactive_topic_first_without_starving_bulk(fleet) -> None:
    """Six bulk requests are queued before three interactive ones, then one worker starts: it takes the
    interactive ones first (FIFO would take them last), and a bulk one within its first four takes."""
    with fleet.client() as client:
        bulk = [client.submit(_request(f"bulk tile {i}", "bulk", seed=i)) for i in range(6)]
        urgent = [client.submit(_request(f"urgent gem {i}", seed=100 + i)) for i in range(3)]
        fleet.start_worker("w1", BULK_EVERY="3")
        results = client.wait_all(bulk + urgent, timeout=300)
    assert all(r["state"] == "done" for r in results.values()), results
    _, jobs = fleet.redis_fleet()
    order = sorted(bulk + urgent, key=lambda rid: jobs.get(rid).started_at)
    ranks = [order.index(rid) for rid in urgent]
    assert max(ranks) <= 4, (ranks, order)  # FIFO: 6, 7, 8
    assert any(rid in bulk for rid in order[:4]), order  # never starved: 1 take in 3 is bulk


def test_page_request_overtakes_the_backends_bulk_backlog(browser, tiny_model, tmp_path, artifacts) -> None:
    """A designer clicks Generate while the backend's bulk batch waits: the page's image comes first."""
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", WARMUP="0", MAX_JOBS_PER_USER="0",
                    RATE_LIMIT_PER_HOUR="0")
    try:
        client = Client(app.url, verbose=False)
        page = open_form(browser, app.url, "a designer's urgent shield icon", height_px=1100, Width="256",
                         Height="256", Steps="2", Seed="5")
        items = [{"prompt": f"bulk floor tile {i}", "preset": "base", "width": 512, "height": 512, "steps": 12,
                  "guidance_scale": 5.0, "seed": i, "priority": "bulk"} for i in range(4)]
        bulk = [outcome["request_id"] for outcome in client.predict(items, api_name="/submit_batch")]
        page.locator("#generate").click()
        page.locator("#result-image img").wait_for(state="visible", timeout=120_000)
        states = [client.predict(rid, api_name="/status")["state"] for rid in bulk]
        assert states.count("done") <= 1 and states[-1] == "queued", states  # FIFO would make the page wait for all
        page.screenshot(path=str(artifacts / "priority.png"), full_page=True)
        assert all(s["state"] == "done" for s in client.predict(bulk, 300, api_name="/wait_all").values())
    finally:
        stop_app(app)
