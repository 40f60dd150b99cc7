"""Faults injected into real services: nothing a user asked for is lost, nothing crashes."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest
import redis
from gradio_client import Client

from storage.resilient import RedisGuard
from tests.conftest import get_json, start_app, stop_app, wait_for_status
from tests.services import S3_KEY, S3_SECRET, Fleet, RedisServer, S3Gate, TansuBroker

pytestmark = pytest.mark.timeout(600)
SMALL = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


def _generate(client: Client, prompt: str, seed: int = 1):
    return client.predict(prompt=prompt, seed=seed, **SMALL, api_name="/generate")


def _health(app) -> dict:
    return get_json(f"{app.url}/healthz")[1]


def _with_redis_and_s3(server: RedisServer, s3_server, namespace: str) -> dict[str, str]:
    return {"MODEL_PRESET": "base", "REDIS_URL": server.url, "REDIS_NAMESPACE": namespace,
            "S3_ENDPOINT_URL": s3_server.endpoint, "R2_BUCKET": s3_server.bucket(), "R2_ACCESS_KEY_ID": S3_KEY,
            "R2_SECRET_ACCESS_KEY": S3_SECRET}


def test_redis_outage_degrades_then_caching_resumes(tiny_model, tmp_path, s3_server) -> None:
    server = RedisServer(tmp_path)
    app = start_app(tiny_model, tmp_path, **_with_redis_and_s3(server, s3_server, "outage"))
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
        time.sleep(RedisGuard.OPEN_SECONDS + 1)  # the circuit breaker lets calls through again after this
        _, after = _generate(client, "after the outage")
        assert cache.exists(f"outage:result:{after['fingerprint']}")
        assert _health(app)["status"] == "ok"
        _, again = _generate(client, "after the outage")
        assert again["cached"] is True
    finally:
        stop_app(app)
        server.stop()


def test_job_finished_while_redis_is_away_is_written_back(tiny_model, tmp_path, s3_server) -> None:
    from storage.redis_store import RedisJobStore

    server = RedisServer(tmp_path)
    app = start_app(tiny_model, tmp_path, **_with_redis_and_s3(server, s3_server, "writeback"))
    try:
        client = Client(app.url, verbose=False)
        slow = {**SMALL, "width": 512, "height": 512, "steps": 12}
        request_id = client.predict(prompt="finished in the dark", seed=5, **slow, api_name="/submit")
        wait_for_status(client, request_id, lambda s: s["state"] == "running" and s["step"] >= 1)
        server.stop()  # the job finishes while Redis is away: its end is known to this Space only
        done = wait_for_status(client, request_id, lambda s: s["state"] == "done", timeout=120)
        assert done["result"]["url"]
        server.start()
        jobs = RedisJobStore(redis.Redis.from_url(server.url), "writeback", 3600)
        deadline = time.monotonic() + 20
        while (job := jobs.get(request_id)) is None or job.state != "done":
            assert time.monotonic() < deadline, f"Redis still says {job and job.state}"
            time.sleep(0.2)
        assert job.result["url"] == done["result"]["url"]  # the newest state won
    finally:
        stop_app(app)
        server.stop()


def test_hanging_redis_costs_seconds_not_a_timeout_per_call(tiny_model, tmp_path, s3_server) -> None:
    server = RedisServer(tmp_path)
    app = start_app(tiny_model, tmp_path, **_with_redis_and_s3(server, s3_server, "hang"))
    try:
        client = Client(app.url, verbose=False)
        _generate(client, "before the hang")
        server.process.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        started = time.monotonic()
        _, meta = _generate(client, "while Redis hangs")
        elapsed = time.monotonic() - started
        # ~15 Redis calls per request at 2 s x 2 tries each would be a minute; the breaker skips them.
        assert meta["cached"] is False and elapsed < 25, elapsed
        health_started = time.monotonic()
        assert _health(app)["status"] == "degraded"
        assert time.monotonic() - health_started < 5
    finally:
        server.process.send_signal(signal.SIGCONT)
        stop_app(app)
        server.stop()


def test_failing_object_store_retries_then_serves_the_image_itself(tiny_model, tmp_path) -> None:
    s3 = S3Gate()  # nothing behind it: every request is answered 503
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", S3_ENDPOINT_URL=s3.endpoint, R2_BUCKET="images",
                    R2_ACCESS_KEY_ID="id", R2_SECRET_ACCESS_KEY="secret")
    try:
        client = Client(app.url, verbose=False)
        image_path, meta = _generate(client, "an image R2 cannot take")
        attempts = s3.refused
        assert attempts >= 3  # botocore's standard retries, with backoff
        assert meta["persisted"] is False and meta["url"].startswith(f"{app.url}/outputs/images/")
        with urllib.request.urlopen(meta["url"], timeout=10) as response:
            assert response.read() == open(image_path, "rb").read()
        health = _health(app)
        assert health["status"] == "degraded" and "not persisted" in health["degraded"]["R2/S3"]["meaning"]
        _, again = _generate(client, "an image R2 cannot take")
        assert again["cached"] is False  # a local-only image is never offered to the fleet as a hit
        assert again["persisted"] is False and s3.refused == attempts  # uploads paused: no new waits
    finally:
        stop_app(app)
        s3.stop()


def test_kafka_away_at_startup_then_back(tiny_model, tmp_path, redis_server, s3_server) -> None:
    from tests.conftest import launch_app

    broker_port_holder = TansuBroker(tmp_path)  # reserve a port, then stop: Kafka is "away"
    broker_port_holder.stop()
    fleet = Fleet(tiny_model, tmp_path, broker_port_holder.bootstrap, redis_server.url, s3_server, s3_server.bucket())
    app = launch_app(fleet.env(WORKER_NAME="lonely"), tmp_path, name="lonely", ready=("degraded",))
    fleet.processes["lonely"] = app.process
    try:
        health = _health(app)
        assert any(p.startswith(f"Kafka unreachable at {broker_port_holder.bootstrap}") for p in health["unreachable"])
        # the consumer's real state, not "ok": it cannot take requests while the broker is away
        assert "Kafka consumer" in health["degraded"] and health["consumer"]["state"] == "connecting"
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
        assert _health(app)["consumer"]["state"] == "consuming"
    finally:
        fleet.stop_all()
        broker_port_holder.stop()


def test_kafka_away_with_local_fallback_serves_here(tiny_model, tmp_path, redis_server, s3_server) -> None:
    from tests.conftest import launch_app

    broker = TansuBroker(tmp_path)
    broker.stop()
    fleet = Fleet(tiny_model, tmp_path, broker.bootstrap, redis_server.url, s3_server, s3_server.bucket())
    app = launch_app(fleet.env(WORKER_NAME="solo", KAFKA_FALLBACK_LOCAL="1"), tmp_path, name="solo",
                     ready=("degraded",))
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


def test_a_preset_nobody_serves_waits_in_its_topic_without_using_attempts(fleet) -> None:
    from kafka import KafkaProducer

    from inference.request import GenerationRequest
    from queueing.messages import encode_request

    fleet.start_worker("base-only")  # serves the base preset only
    fleet.wait_for_workers(["base-only"])
    direct = GenerationRequest.create("a turbo request", preset="turbo", width=256, height=256, steps=1, seed=5)
    entrance = GenerationRequest.create("a turbo request via the entrance", preset="turbo", width=256, height=256,
                                        steps=1, seed=6)
    with fleet.client() as client:
        client.submit(direct)  # to <prefix>.requests.turbo
        producer = KafkaProducer(bootstrap_servers=fleet.bootstrap)  # any producer: the entrance topic
        producer.send(f"{fleet.prefix}.requests", encode_request(entrance)).get(timeout=10)
        producer.close()
        with pytest.raises(TimeoutError):
            client.wait_all([direct.request_id, entrance.request_id], timeout=8)
        from tests.test_fleet import _topic_messages

        assert _topic_messages(fleet.bootstrap, f"{fleet.prefix}.dlq") == []  # nothing failed for it
        from queueing.fleet import FleetBacklog
        from queueing.kafka import KafkaSettings

        backlog = FleetBacklog(KafkaSettings(fleet.bootstrap, topic_prefix=fleet.prefix,
                                             group_id=f"{fleet.prefix}.workers"), None, "turbo")
        assert backlog._measure() == 2  # both wait for a turbo worker (and the estimate says so)
        backlog._close_clients()
        fleet.start_worker("turbo", MODEL_PRESET="turbo")
        results = client.wait_all([direct.request_id, entrance.request_id], timeout=120)
    assert all(r["state"] == "done" and r["result"]["worker"] == "turbo" for r in results.values()), results
    _, jobs = fleet.redis_fleet()
    assert [jobs.get(r).attempts for r in (direct.request_id, entrance.request_id)] == [1, 1]


def test_dead_letters_are_replayed_once_the_cause_is_fixed(tiny_model, tmp_path, kafka_bootstrap, redis_server,
                                                           s3_server) -> None:
    from inference.request import GenerationRequest
    from queueing.dlq import replay, settings_from_env
    from tests.conftest import TinyModel
    from tests.sdxl_builder import build_tiny_sdxl
    from tests.services import stop_process

    build_tiny_sdxl(tmp_path / "fragile", ascii_only=True)  # fails on any non-ASCII prompt
    fragile = TinyModel(tmp_path / "fragile" / "sdxl", tmp_path / "fragile" / "taesd")
    fleet = Fleet(fragile, tmp_path, kafka_bootstrap, redis_server.url, s3_server, s3_server.bucket())
    first, second = (GenerationRequest.create(p, preset="base", width=256, height=256, steps=2, seed=1)
                     for p in ("a café sign", "a naïve knight"))
    try:
        fleet.start_worker("fragile", MAX_ATTEMPTS="1")
        fleet.wait_for_workers(["fragile"])
        with fleet.client() as client:
            for request in (first, second):
                client.submit(request)
            failed = client.wait_all([first.request_id, second.request_id], timeout=120)
        assert all(r["state"] == "failed" for r in failed.values()), failed
        stop_process(fleet.processes["fragile"])  # the fix: a model that reads any text
        healthy = Fleet(tiny_model, tmp_path, kafka_bootstrap, redis_server.url, s3_server, fleet.bucket,
                        prefix=fleet.prefix)
        healthy.start_worker("healthy")
        healthy.wait_for_workers(["healthy"])
        settings = settings_from_env({"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "KAFKA_TOPIC_PREFIX": fleet.prefix})
        assert replay(settings, {first.request_id})["replayed"] == 1  # just this one, committing nothing
        assert replay(settings)["replayed"] == 2  # so the other one is still there (and this one again)
        assert replay(settings)["replayed"] == 0  # a second full replay resends nothing
        _, jobs = fleet.redis_fleet()
        deadline = time.monotonic() + 120
        while {jobs.get(r.request_id).state for r in (first, second)} != {"done"}:
            assert time.monotonic() < deadline, [jobs.get(r.request_id) for r in (first, second)]
            time.sleep(0.2)
        assert {jobs.get(r.request_id).worker for r in (first, second)} == {"healthy"}
        healthy.stop_all()
    finally:
        fleet.stop_all()
