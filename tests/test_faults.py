"""Faults injected into real services: nothing a user asked for is lost, nothing crashes."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest
import redis
from gradio_client import Client

from tests.conftest import get_json, start_app, stop_app
from tests.services import FailingS3, Fleet, RedisServer, TansuBroker

pytestmark = pytest.mark.timeout(600)
SMALL = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


def _generate(client: Client, prompt: str, seed: int = 1):
    return client.predict(prompt=prompt, seed=seed, **SMALL, api_name="/generate")


def _health(app) -> dict:
    return get_json(f"{app.url}/healthz")[1]


def test_redis_outage_degrades_then_caching_resumes(tiny_model, tmp_path) -> None:
    server = RedisServer(tmp_path)
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", REDIS_URL=server.url, REDIS_NAMESPACE="outage")
    try:
        client = Client(app.url, verbose=False)
        _, before = _generate(client, "before the outage")
        cache = redis.Redis.from_url(server.url)
        assert cache.exists(f"outage:result:{before['fingerprint']}")
        server.stop()
        _, during = _generate(client, "during the outage")  # still generates, no cache
        assert during["cached"] is False
        health = _health(app)
        assert health["status"] == "degraded" and "Redis" in health["degraded"]
        assert "caching resumes by itself" in health["degraded"]["Redis"]["meaning"]
        server.start()
        _, after = _generate(client, "after the outage")
        assert cache.exists(f"outage:result:{after['fingerprint']}")
        assert _health(app)["status"] == "ok"
        _, again = _generate(client, "after the outage")
        assert again["cached"] is True
    finally:
        stop_app(app)
        server.stop()


def test_failing_object_store_retries_then_serves_the_image_itself(tiny_model, tmp_path) -> None:
    s3 = FailingS3()
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", S3_ENDPOINT_URL=s3.endpoint, R2_BUCKET="images",
                    R2_ACCESS_KEY_ID="id", R2_SECRET_ACCESS_KEY="secret")
    try:
        client = Client(app.url, verbose=False)
        image_path, meta = _generate(client, "an image R2 cannot take")
        attempts = s3.requests
        assert attempts >= 3  # botocore's standard retries, with backoff
        assert meta["persisted"] is False and meta["url"].startswith(f"{app.url}/outputs/images/")
        with urllib.request.urlopen(meta["url"], timeout=10) as response:
            assert response.read() == open(image_path, "rb").read()
        health = _health(app)
        assert health["status"] == "degraded" and "not persisted" in health["degraded"]["R2/S3"]["meaning"]
        _, again = _generate(client, "an image R2 cannot take")
        assert again["cached"] is False  # a local-only image is never offered to the fleet as a hit
        assert again["persisted"] is False and s3.requests == attempts  # uploads paused: no new waits
    finally:
        stop_app(app)
        s3.stop()


def test_kafka_away_at_startup_then_back(tiny_model, tmp_path, redis_server, s3_server) -> None:
    from tests.conftest import launch_app

    broker_port_holder = TansuBroker(tmp_path)  # reserve a port, then stop: Kafka is "away"
    broker_port_holder.stop()
    fleet = Fleet(tiny_model, tmp_path, broker_port_holder.bootstrap, redis_server.url, s3_server, s3_server.bucket())
    app = launch_app(fleet.env(WORKER_NAME="lonely"), tmp_path, name="lonely")
    fleet.processes["lonely"] = app.process
    try:
        health = _health(app)
        assert any(p.startswith(f"Kafka unreachable at {broker_port_holder.bootstrap}") for p in health["unreachable"])
        client = Client(app.url, verbose=False)
        with pytest.raises(Exception, match="Kafka"):
            _generate(client, "while Kafka is away")  # refused with the reason: not silently dropped
        assert "Kafka" in _health(app)["degraded"]
        broker_port_holder.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                _, meta = _generate(client, "after Kafka came back")
                break
            except Exception:
                time.sleep(1)
        assert meta["worker"] == "lonely" and "Kafka" not in _health(app)["degraded"]
    finally:
        fleet.stop_all()
        broker_port_holder.stop()


def test_kafka_away_with_local_fallback_serves_here(tiny_model, tmp_path, redis_server, s3_server) -> None:
    from tests.conftest import launch_app

    broker = TansuBroker(tmp_path)
    broker.stop()
    fleet = Fleet(tiny_model, tmp_path, broker.bootstrap, redis_server.url, s3_server, s3_server.bucket())
    app = launch_app(fleet.env(WORKER_NAME="solo", KAFKA_FALLBACK_LOCAL="1"), tmp_path, name="solo")
    fleet.processes["solo"] = app.process
    try:
        _, meta = _generate(Client(app.url, verbose=False), "served here while Kafka is away")
        assert meta["cached"] is False and meta["persisted"] is True
        assert "Kafka" in _health(app)["degraded"]
    finally:
        fleet.stop_all()


@pytest.mark.parametrize(("grace", "finisher"), [("30", "same"), ("1", "other")])
def test_sigterm_during_a_job_loses_nothing(fleet, grace: str, finisher: str) -> None:
    fleet.start_worker("first", SHUTDOWN_GRACE_SECONDS=grace)
    fleet.wait_for_workers(["first"])
    _, jobs = fleet.redis_fleet()
    from inference.request import GenerationRequest

    request = GenerationRequest.create("a long job at shutdown", preset="base", width=512, height=512, steps=30,
                                       guidance_scale=5.0, seed=2)
    with fleet.client() as client:
        client.submit(request)
        deadline = time.monotonic() + 60
        while not ((job := jobs.get(request.request_id)) and job.state == "running" and job.step >= 1):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fleet.processes["first"].send_signal(signal.SIGTERM)
        if finisher == "other":
            fleet.start_worker("second")
        result = client.wait(request.request_id, timeout=180)
    assert fleet.processes["first"].wait(60) == 0  # it left cleanly
    assert result["state"] == "done"
    assert result["result"]["worker"] == ("first" if finisher == "same" else "second")
    assert "left the consumer group" in fleet.log("first")


def test_request_crashing_every_time_ends_in_dlq_and_worker_carries_on(tmp_path, kafka_bootstrap, redis_server,
                                                                       s3_server) -> None:
    from inference.request import GenerationRequest
    from tests.conftest import TinyModel
    from tests.sdxl_builder import build_tiny_sdxl
    from tests.test_fleet import _topic_messages

    # This model's text encoders know only ASCII tokens: a prompt with any other character fails
    # inside the pipeline (an embedding lookup out of range), every time; ASCII prompts work.
    build_tiny_sdxl(tmp_path / "fragile", ascii_only=True)
    fragile = TinyModel(tmp_path / "fragile" / "sdxl", tmp_path / "fragile" / "taesd")
    fleet = Fleet(fragile, tmp_path, kafka_bootstrap, redis_server.url, s3_server, s3_server.bucket())
    try:
        fleet.start_worker("fragile")
        fleet.wait_for_workers(["fragile"])
        doomed = GenerationRequest.create("a crashing café", preset="base", width=256, height=256, steps=2,
                                          seed=1)
        fine = GenerationRequest.create("works", preset="base", width=256, height=256, steps=2, seed=1)
        with fleet.client() as client:
            client.submit(doomed)
            client.submit(fine)
            results = client.wait_all([doomed.request_id, fine.request_id], timeout=180)
        assert results[fine.request_id]["state"] == "done"
        failed = results[doomed.request_id]
        assert failed["state"] == "failed" and "attempt 3 of 3" in failed["error"]
        assert "dead-letter topic" in failed["error"] and "generation failed" in failed["error"]
        _, jobs = fleet.redis_fleet()
        assert jobs.get(doomed.request_id).attempts == 3
        dead = [json.loads(m.value) for m in _topic_messages(kafka_bootstrap, f"{fleet.prefix}.dlq")]
        assert [d["request_id"] for d in dead] == [doomed.request_id] and dead[0]["attempts"] == 3
        assert fleet.processes["fragile"].poll() is None  # still alive
    finally:
        fleet.stop_all()


def test_dead_letters_are_replayed_once_the_cause_is_fixed(fleet) -> None:
    from inference.request import GenerationRequest
    from queueing.dlq import main as dlq_main

    fleet.start_worker("base-only")  # serves the base preset only
    fleet.wait_for_workers(["base-only"])
    lost = GenerationRequest.create("a turbo request nobody serves", preset="turbo", width=256, height=256,
                                    steps=1, seed=5)
    with fleet.client() as client:
        client.submit(lost)
        failed = client.wait(lost.request_id, timeout=120)
        assert failed["state"] == "failed" and "not served by worker base-only" in failed["error"]
        from tests.services import stop_process

        stop_process(fleet.processes["base-only"])  # the fix: this fleet now runs the turbo preset
        fleet.start_worker("turbo", MODEL_PRESET="turbo")
        fleet.wait_for_workers(["turbo"])
        env = {"KAFKA_BOOTSTRAP_SERVERS": fleet.bootstrap, "KAFKA_TOPIC_PREFIX": fleet.prefix}
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert dlq_main(["replay"]) == 0
            assert dlq_main(["replay"]) == 0  # a second run resends nothing
        deadline = time.monotonic() + 120
        _, jobs = fleet.redis_fleet()
        while jobs.get(lost.request_id).state != "done":
            assert time.monotonic() < deadline, jobs.get(lost.request_id)
            time.sleep(0.2)
    assert jobs.get(lost.request_id).worker == "turbo"
