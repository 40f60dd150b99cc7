"""Abuse limits with concurrent clients: per-user rate (fleet-wide through Redis), jobs in flight, queue."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from storage.limits import MemoryRateLimiter
from tests.conftest import start_app, stop_app

SMALL = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


# The apps run with TRUSTED_PROXY_HOPS=1, as on a Space: the last X-Forwarded-For entry is the one the
# platform's proxy appended. Here the test plays that proxy; `written` is what a client wrote itself.
PROXIED = {"TRUSTED_PROXY_HOPS": "1"}


def _client(app, address: str, written: str = "") -> Client:
    forwarded = f"{written}, {address}" if written else address
    return Client(app.url, verbose=False, headers={"X-Forwarded-For": forwarded})


def _try(client: Client, prompt: str) -> str:
    try:
        client.predict(prompt=prompt, seed=1, **SMALL, api_name="/generate")
        return "ok"
    except AppError as error:
        return str(error)


def test_sliding_window_counts_per_user() -> None:
    limiter = MemoryRateLimiter(limit=2, window_seconds=60)
    assert [limiter.hit("a").allowed for _ in range(3)] == [True, True, False]
    assert limiter.hit("b").allowed
    assert 0 < limiter.hit("a").retry_after_seconds <= 60


def test_rate_limit_is_per_user_and_shared_by_the_fleet(tiny_model, tmp_path, redis_server) -> None:
    shared = {"REDIS_URL": redis_server.url, "REDIS_NAMESPACE": "limits", "RATE_LIMIT_PER_HOUR": "4",
              "MODEL_PRESET": "base", "MAX_JOBS_PER_USER": "10", **PROXIED}
    app_a = start_app(tiny_model, tmp_path / "a", **shared)
    app_b = start_app(tiny_model, tmp_path / "b", **shared)
    try:
        greedy = [_client(app_a, "203.0.113.7"), _client(app_b, "203.0.113.7")]
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(lambda i: _try(greedy[i % 2], f"greedy {i}"), range(6)))
        assert outcomes.count("ok") == 4, outcomes  # 4 per hour across both Spaces
        refused = [o for o in outcomes if o != "ok"]
        assert all("rate limit: 4 requests per hour; try again in" in o and "minute" in o for o in refused), outcomes
        assert _try(_client(app_b, "198.51.100.2"), "someone else") == "ok"  # others are not starved
    finally:
        stop_app(app_a)
        stop_app(app_b)


def test_jobs_in_flight_are_capped_per_user(tiny_model, tmp_path) -> None:
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", MAX_JOBS_PER_USER="1", **PROXIED)
    try:
        client = _client(app, "192.0.2.1")
        slow = {**SMALL, "width": 512, "height": 512, "steps": 40}
        first = client.predict(prompt="slow one", seed=1, request_id="", **slow, api_name="/submit")
        with pytest.raises(AppError, match="already have 1 requests in progress"):
            client.predict(prompt="slow two", seed=2, request_id="", **slow, api_name="/submit")
        assert _try(_client(app, "192.0.2.2"), "another user") == "ok"
        client.predict(request_id=first, api_name="/cancel")
    finally:
        stop_app(app)


def test_full_queue_says_busy_to_concurrent_clients(tiny_model, tmp_path) -> None:
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", QUEUE_MAX_SIZE="1", MAX_JOBS_PER_USER="10",
                    **PROXIED)
    try:
        slow = {**SMALL, "width": 512, "height": 512, "steps": 20}
        clients = [_client(app, f"192.0.2.{i}") for i in range(4)]

        def submit(i: int) -> str:
            try:
                return clients[i].predict(prompt=f"queued {i}", seed=i, request_id="", **slow, api_name="/submit")
            except AppError as error:
                return str(error)

        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(submit, range(4)))
        busy = [o for o in outcomes if o.startswith("busy")]
        assert busy and all("try again in a minute" in o for o in busy)
        for request_id in set(outcomes) - set(busy):
            clients[0].predict(request_id=request_id, api_name="/cancel")
    finally:
        stop_app(app)


def test_a_header_the_client_wrote_does_not_make_a_new_user(tiny_model, tmp_path) -> None:
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", RATE_LIMIT_PER_HOUR="2", **PROXIED)
    try:
        outcomes = [_try(_client(app, "203.0.113.9", written=f"10.0.0.{i}"), f"spoof {i}") for i in range(3)]
        assert outcomes[:2] == ["ok", "ok"] and "rate limit: 2 requests per hour" in outcomes[2], outcomes
    finally:
        stop_app(app)


def test_rate_limit_zero_means_no_limit(tiny_model, tmp_path) -> None:
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", RATE_LIMIT_PER_HOUR="0", MAX_JOBS_PER_USER="0")
    try:
        assert [_try(_client(app, "192.0.2.50"), f"unlimited {i}") for i in range(3)] == ["ok"] * 3
    finally:
        stop_app(app)


def test_in_flight_cap_is_atomic_across_the_fleet(tiny_model, tmp_path, redis_server) -> None:
    shared = {"REDIS_URL": redis_server.url, "REDIS_NAMESPACE": "inflight", "MAX_JOBS_PER_USER": "2",
              "MODEL_PRESET": "base", "QUEUE_MAX_SIZE": "32", **PROXIED}
    apps = [start_app(tiny_model, tmp_path / name, **shared) for name in ("a", "b")]
    try:
        clients = [_client(app, "198.51.100.77") for app in apps]
        slow = {**SMALL, "width": 512, "height": 512, "steps": 40}

        def submit(i: int) -> str:
            try:
                return clients[i % 2].predict(prompt=f"capped {i}", seed=i, **slow, api_name="/submit")
            except AppError as error:
                return f"refused: {error}"

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(submit, range(8)))
        accepted = [o for o in outcomes if not o.startswith("refused")]
        assert len(accepted) == 2, outcomes  # 2 in flight per user, whichever Space they came through
        assert all("requests in progress (at most 2)" in o for o in outcomes if o.startswith("refused"))
        for request_id in accepted:
            for client in clients:  # the job lives on one Space's queue; either may cancel it
                try:
                    client.predict(request_id=request_id, api_name="/cancel")
                except AppError:
                    pass
    finally:
        for app in apps:
            stop_app(app)
