"""Webhooks against a real local HTTP receiver: signed, once per state, retried with backoff, logged.

The receiver is an outer edge (the game backend's endpoint): a real HTTP server in the test process,
told to answer 500 a given number of times first.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from gradio_client import Client
from standardwebhooks import Webhook

from inference.errors import InvalidRequest
from inference.request import GenerationRequest
from tests.conftest import start_app, stop_app

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
FIELDS = dict(negative_prompt="", preset="base", width=256, height=256, steps=2, guidance_scale=5.0)


class Receiver:
    """Records every POST (path, headers, body); answers 500 to the first `fail_first` of each path."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.fail_first: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.posts.append({"path": self.path, "headers": dict(self.headers), "body": body})
                failures = receiver.fail_first.get(self.path, 0)
                seen = sum(1 for post in receiver.posts if post["path"] == self.path)
                self.send_response(500 if seen <= failures else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, path: str, count: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [post for post in self.posts if post["path"] == path]
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"{path}: {len([p for p in self.posts if p['path'] == path])} of {count} POSTs")


@pytest.fixture(scope="module")
def receiver():
    made = Receiver()
    yield made
    made.server.shutdown()


@pytest.fixture(scope="module")
def webhook_app(tiny_model, tmp_path_factory, receiver):
    app = start_app(tiny_model, tmp_path_factory.mktemp("webhooks"), MODEL_PRESET="base", WARMUP="0",
                    WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{receiver.port}", WEBHOOK_SECRET=SECRET,
                    WEBHOOK_BACKOFF_SECONDS="0.3", WEBHOOK_MAX_ATTEMPTS="4")
    yield app
    stop_app(app)


def _status_when(client: Client, request_id: str, done, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(request_id, api_name="/status")
        if done(status):
            return status
        time.sleep(0.1)
    raise TimeoutError(status)


def test_done_request_posts_one_signed_webhook_with_the_callers_id(webhook_app, receiver) -> None:
    client = Client(webhook_app.url, verbose=False)
    url = receiver.url("/hooks/ok?token=receiver-secret")
    rid = client.predict("a rune stone", **FIELDS, seed=11, request_id="order-11", webhook_url=url,
                         api_name="/submit")
    assert rid == "order-11"
    [post] = receiver.wait_for("/hooks/ok?token=receiver-secret", 1)
    payload = Webhook(SECRET).verify(post["body"], post["headers"])  # raises unless the signature is ours
    assert payload["type"] == "image.done"
    data = payload["data"]
    assert data["request_id"] == "order-11" and data["state"] == "done" and data["error"] is None
    assert data["result"]["request_id"] == "order-11" and data["result"]["seed"] == 11
    assert data["result"]["url"]
    assert post["headers"]["webhook-id"].endswith(":done")
    status = _status_when(client, rid, lambda s: s["webhook"]["deliveries"])
    assert status["webhook"]["host"] == "127.0.0.1"  # the URL's token is never shown
    assert "receiver-secret" not in json.dumps(status)
    [entry] = status["webhook"]["deliveries"]
    assert entry["delivered"] is True and entry["status_code"] == 204 and entry["attempt"] == 1
    # Resubmitting the same id is the same job: no second POST for the same state.
    assert client.predict("a rune stone", **FIELDS, seed=11, request_id="order-11", webhook_url=url,
                          api_name="/submit") == "order-11"
    time.sleep(1.5)
    assert len([p for p in receiver.posts if p["path"].startswith("/hooks/ok")]) == 1
    assert "receiver-secret" not in webhook_app.log()


def test_receiver_failing_twice_gets_the_third_attempt_after_backoff(webhook_app, receiver) -> None:
    client = Client(webhook_app.url, verbose=False)
    receiver.fail_first["/hooks/flaky"] = 2
    rid = client.predict("a flaky lantern", **FIELDS, seed=12, webhook_url=receiver.url("/hooks/flaky"),
                         api_name="/submit")
    posts = receiver.wait_for("/hooks/flaky", 3)
    assert len({p["headers"]["webhook-id"] for p in posts}) == 1  # one message, delivered three times
    for post in posts:
        Webhook(SECRET).verify(post["body"], post["headers"])
    status = _status_when(client, rid, lambda s: len(s["webhook"]["deliveries"]) >= 3)
    log = status["webhook"]["deliveries"]
    assert [(e["attempt"], e["delivered"], e.get("status_code")) for e in log] == [
        (1, False, 500), (2, False, 500), (3, True, 204)], log
    assert [e.get("retry_in_s") for e in log] == [0.3, 0.6, None]  # exponential backoff
    assert log[1]["at"] - log[0]["at"] >= 0.25 and log[2]["at"] - log[1]["at"] >= 0.5
    time.sleep(1.5)
    assert len(receiver.wait_for("/hooks/flaky", 3)) == 3


def test_receiver_that_always_fails_is_given_up_after_max_attempts(webhook_app, receiver) -> None:
    client = Client(webhook_app.url, verbose=False)
    receiver.fail_first["/hooks/down"] = 100
    rid = client.predict("a cursed chest", **FIELDS, seed=13, webhook_url=receiver.url("/hooks/down"),
                         api_name="/submit")
    status = _status_when(client, rid, lambda s: len(s["webhook"]["deliveries"]) >= 4)
    assert status["state"] == "done"  # the image is fine; only the notification failed
    log = status["webhook"]["deliveries"]
    assert [e["delivered"] for e in log] == [False] * 4 and "retry_in_s" not in log[-1]
    time.sleep(3)
    assert len(receiver.wait_for("/hooks/down", 4)) == 4  # WEBHOOK_MAX_ATTEMPTS, then no more


def test_cache_hit_is_notified_too(webhook_app, receiver) -> None:
    client = Client(webhook_app.url, verbose=False)
    first = client.predict("a golden key", **FIELDS, seed=14, api_name="/submit")
    _status_when(client, first, lambda s: s["state"] == "done")
    client.predict("a golden key", **FIELDS, seed=14, webhook_url=receiver.url("/hooks/hit"), api_name="/submit")
    [post] = receiver.wait_for("/hooks/hit", 1)
    data = Webhook(SECRET).verify(post["body"], post["headers"])["data"]
    assert data["state"] == "done" and data["result"]["cached"] is True


@pytest.mark.parametrize(("url", "message"), [
    ("http://169.254.169.254/latest/meta-data", "not in this Space's WEBHOOK_ALLOWED_HOSTS"),
    ("http://127.0.0.1:1/elsewhere", "not in this Space's WEBHOOK_ALLOWED_HOSTS"),  # allowed host, other port
    ("ftp://127.0.0.1/x", "http:// or https://"),
    ("http://user:pw@127.0.0.1/x", "credentials"),
])
def test_webhook_urls_the_space_will_not_call_are_refused_naming_the_field(webhook_app, url, message) -> None:
    client = Client(webhook_app.url, verbose=False)
    with pytest.raises(Exception, match="webhook_url") as raised:
        client.predict("a map", **FIELDS, seed=1, webhook_url=url, api_name="/submit")
    assert message in str(raised.value)


def test_batch_requests_carry_their_own_webhooks(webhook_app, receiver) -> None:
    client = Client(webhook_app.url, verbose=False)
    items = [{"prompt": f"a banner {i}", **FIELDS, "seed": 20 + i, "request_id": f"banner-{i}",
              "priority": "bulk", "webhook_url": receiver.url(f"/hooks/batch-{i}")} for i in range(2)]
    outcomes = client.predict(items, api_name="/submit_batch")
    assert [o["request_id"] for o in outcomes] == ["banner-0", "banner-1"]
    for i in range(2):
        [post] = receiver.wait_for(f"/hooks/batch-{i}", 1)
        assert Webhook(SECRET).verify(post["body"], post["headers"])["data"]["request_id"] == f"banner-{i}"


def test_webhooks_are_refused_where_the_space_has_none(app_server) -> None:
    client = Client(app_server.url, verbose=False)
    with pytest.raises(Exception, match="webhook_url: webhooks are off on this Space"):
        client.predict("a map", **FIELDS, seed=1, webhook_url="https://example.com/hook", api_name="/submit")


def test_webhook_url_shape_is_checked_in_the_request_type() -> None:
    request = GenerationRequest.create("a map", preset="base", webhook_url="https://hooks.example/x?t=1")
    assert request.to_dict()["webhook_url"] == "https://hooks.example/x?t=1"
    assert "webhook_url" not in GenerationRequest.create("a map", preset="base").to_dict()
    assert request.pixel_fields() == GenerationRequest.create("a map", preset="base").pixel_fields()
    with pytest.raises(InvalidRequest, match="webhook_url"):
        GenerationRequest.create("a map", preset="base", webhook_url="http://[::1")
    with pytest.raises(InvalidRequest, match="webhook_url"):
        GenerationRequest.create("a map", preset="base", webhook_url=42)


@pytest.mark.timeout(600)
def test_topic_request_with_a_webhook_is_posted_by_the_worker_that_ran_it(fleet, receiver) -> None:
    """The game backend produces to the topic with a webhook_url; a fleet worker (another process)
    makes the image and POSTs it, once, though two workers share the topic."""
    env = dict(WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{receiver.port}", WEBHOOK_SECRET=SECRET)
    for name in ("w1", "w2"):
        fleet.start_worker(name, **env)
    fleet.wait_for_workers(["w1", "w2"])
    request = GenerationRequest.create("a topic totem", seed=31, webhook_url=receiver.url("/hooks/topic"),
                                       request_id="topic-31", **FIELDS)
    with fleet.client() as client:
        result = client.generate(request, timeout=120)
    assert result["state"] == "done", result
    [post] = receiver.wait_for("/hooks/topic", 1)
    data = Webhook(SECRET).verify(post["body"], post["headers"])["data"]
    assert data["request_id"] == "topic-31" and data["result"]["worker"] in ("w1", "w2")
    time.sleep(2)
    assert len(receiver.wait_for("/hooks/topic", 1)) == 1
    _, jobs = fleet.redis_fleet()
    assert jobs.get("topic-31").webhook_deliveries[0]["delivered"] is True


def test_the_jobs_panel_shows_the_webhook_delivery_log(browser, webhook_app, receiver, artifacts) -> None:
    client = Client(webhook_app.url, verbose=False)
    receiver.fail_first["/hooks/ui"] = 1
    rid = client.predict("a lighthouse for the harbour level", **FIELDS, seed=41, request_id="harbour-41",
                         webhook_url=receiver.url("/hooks/ui"), api_name="/submit")
    _status_when(client, rid, lambda s: len(s["webhook"]["deliveries"]) >= 2)
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(webhook_app.url, wait_until="domcontentloaded")
    page.get_by_text("Jobs (queue without waiting").click()
    page.get_by_label("Request id").fill("harbour-41")
    page.get_by_role("button", name="Status", exact=True).click()
    page.get_by_text("deliveries").first.wait_for(timeout=20_000)
    page.get_by_text("204").first.wait_for(timeout=20_000)
    shown = "".join(page.locator("body").inner_text().split())  # the viewer breaks lines
    assert '"status_code":500' in shown and '"status_code":204' in shown, shown[-2000:]
    page.get_by_text("204").first.scroll_into_view_if_needed()  # the log is at the end of the Job box
    page.screenshot(path=str(artifacts / "webhooks.png"), full_page=True)
