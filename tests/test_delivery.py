"""Delivery promises of the fleet under faults and rebalances, each test forcing the situation it names."""

from __future__ import annotations

import json
import time

import pytest
from kafka import KafkaProducer

from inference.request import GenerationRequest
from queueing.messages import encode_request
from tests.conftest import wait_for_job
from tests.test_fleet import _generations, _request, _topic_messages

pytestmark = pytest.mark.timeout(600)


_wait_job = wait_for_job


def _results(fleet, request_id: str) -> list[dict]:
    messages = [json.loads(m.value) for m in _topic_messages(fleet.bootstrap, f"{fleet.prefix}.results")]
    return [m for m in messages if m["request_id"] == request_id]


def _produce(fleet, value: bytes, topic: str = "", partition: int | None = None, **options) -> None:
    producer = KafkaProducer(bootstrap_servers=fleet.bootstrap, **options)
    producer.send(topic or f"{fleet.prefix}.requests.base", value, partition=partition).get(timeout=20)
    producer.close()


def test_broker_stopped_during_a_job_then_back_the_same_worker_goes_on(tiny_model, tmp_path, redis_server,
                                                                       s3_server) -> None:
    from tests.services import Fleet, TansuBroker

    broker = TansuBroker(tmp_path, s3=s3_server)  # s3 storage: topics and offsets survive the restart
    fleet = Fleet(tiny_model, tmp_path, broker.bootstrap, redis_server.url, s3_server, s3_server.bucket())
    try:
        fleet.start_worker("steady")
        fleet.wait_for_workers(["steady"])
        _, jobs = fleet.redis_fleet()
        request = _request("a job that outlives its broker", width=512, height=512, steps=30, seed=3)
        with fleet.client() as client:
            client.submit(request)
        _wait_job(jobs, request.request_id, lambda j: j.state == "running" and j.step >= 1)
        submitted = time.time() - 60
        broker.stop()  # the result cannot be published and the offset not committed until it is back
        _wait_job(jobs, request.request_id, lambda j: j.state == "done", timeout=120)
        time.sleep(3)  # publish and commit fail meanwhile; they are retried, the consumer lives on
        broker.start()
        with fleet.client() as client:
            assert client.attach(request.request_id, since=submitted, timeout=120)["state"] == "done"
            after = client.generate(_request("the next one", seed=4), timeout=120)
        assert after["state"] == "done" and after["result"]["worker"] == "steady"
        assert fleet.processes["steady"].poll() is None
        workers, _ = fleet.redis_fleet()
        assert [w["consumer"] for w in workers.workers()] == ["consuming"]
    finally:
        fleet.stop_all()
        broker.stop()


def test_a_dead_letter_always_fits_even_for_a_huge_message(fleet) -> None:
    fleet.start_worker("w1")
    fleet.wait_for_workers(["w1"])
    huge = ("é" * 350_000).encode()  # 700 KB of UTF-8; as escaped JSON text it would be 2.1 MB
    _produce(fleet, huge, topic=f"{fleet.prefix}.requests", max_request_size=4 * 1024 * 1024)
    with fleet.client() as client:
        assert client.generate(_request("after the huge one"), timeout=120)["state"] == "done"
    dead = [json.loads(m.value) for m in _topic_messages(fleet.bootstrap, f"{fleet.prefix}.dlq", timeout=20)]
    assert len(dead) == 1, [d["reason"] for d in dead]
    entry = dead[0]
    assert entry["reason"].startswith("message is 700000 bytes") and entry["topic"] == f"{fleet.prefix}.requests"
    assert entry["partition"] >= 0 and entry["offset"] >= 0
    original = entry["original"]
    assert original["size"] == len(huge) and original["truncated"] is True and len(original["base64"]) < 400_000


def test_a_request_id_reused_for_other_pixels_is_refused_on_the_topic(fleet) -> None:
    fleet.start_worker("w1")
    fleet.wait_for_workers(["w1"])
    first = _request("the original sword", request_id="item-sword-1")
    impostor = _request("someone else's shield", request_id="item-sword-1")
    with fleet.client() as client:
        done = client.generate(first, timeout=120)
        assert done["state"] == "done"
        client.submit(impostor)
        deadline = time.monotonic() + 60
        while not any(r["state"] == "failed" for r in _results(fleet, "item-sword-1")):
            assert time.monotonic() < deadline
            time.sleep(0.3)
    refused = [r for r in _results(fleet, "item-sword-1") if r["state"] == "failed"]
    assert "already names a different request" in refused[0]["error"] and refused[0]["result"] is None
    _, jobs = fleet.redis_fleet()
    job = jobs.get("item-sword-1")
    assert job.state == "done" and job.result["object_key"] == done["result"]["object_key"]  # untouched
    dead = [json.loads(m.value) for m in _topic_messages(fleet.bootstrap, f"{fleet.prefix}.dlq")]
    assert [d["request_id"] for d in dead] == ["item-sword-1"] and "different request" in dead[0]["reason"]
    time.sleep(1.5)  # heartbeats carry the count, once a second
    assert _generations(fleet) == 1


def test_the_same_request_delivered_twice_is_generated_once(fleet) -> None:
    fleet.start_worker("w1")
    fleet.wait_for_workers(["w1"])
    request = _request("a twice-sent banner", request_id="banner-2x")
    for partition in (0, 5):  # two deliveries, on two partitions
        _produce(fleet, encode_request(request), partition=partition)
    _, jobs = fleet.redis_fleet()
    _wait_job(jobs, "banner-2x", lambda j: j.state == "done")
    deadline = time.monotonic() + 30
    while len(_results(fleet, "banner-2x")) < 2:  # the second delivery republishes the first result
        assert time.monotonic() < deadline
        time.sleep(0.3)
    results = _results(fleet, "banner-2x")
    assert {r["state"] for r in results} == {"done"} and len({r["result"]["object_key"] for r in results}) == 1
    time.sleep(1.5)
    assert _generations(fleet) == 1 and jobs.get("banner-2x").attempts == 1


def test_a_job_longer_than_max_poll_interval_is_not_redelivered(fleet) -> None:
    fleet.start_worker("patient", KAFKA_MAX_POLL_INTERVAL_MS="3000", KAFKA_SESSION_TIMEOUT_MS="3000")
    fleet.wait_for_workers(["patient"])
    request = _request("a long, long render", width=512, height=512, steps=50, seed=9)
    with fleet.client() as client:
        started = time.monotonic()
        result = client.generate(request, timeout=300)
        elapsed = time.monotonic() - started
    assert result["state"] == "done" and elapsed > 3, elapsed  # it did outlast max_poll_interval_ms
    _, jobs = fleet.redis_fleet()
    assert jobs.get(request.request_id).attempts == 1
    time.sleep(1.5)
    assert _generations(fleet) == 1 and len(_results(fleet, request.request_id)) == 1


def test_a_rebalance_mid_job_runs_the_request_once(fleet) -> None:
    # One partition, and the range assignor gives it to the member whose id sorts first: "a-late"
    # joins while "z-first" runs the job, takes the partition, and gets the running request again.
    fleet.start_worker("z-first", KAFKA_PARTITIONS="1")
    fleet.wait_for_workers(["z-first"])
    _, jobs = fleet.redis_fleet()
    request = _request("a render across a rebalance", width=768, height=768, steps=50, seed=11)
    with fleet.client() as client:
        client.submit(request)
        _wait_job(jobs, request.request_id, lambda j: j.state == "running" and j.step >= 1)
        fleet.start_worker("a-late", KAFKA_PARTITIONS="1")
        fleet.wait_for_workers(["a-late"])  # it holds the partition now, while the job still runs
        assert jobs.get(request.request_id).state == "running"
        result = client.wait(request.request_id, timeout=240)
    assert result["state"] == "done" and result["result"]["worker"] == "z-first"
    assert f"request {request.request_id}: {request.request_id}@z-first holds it" in fleet.log("a-late")
    job = jobs.get(request.request_id)
    assert job.attempts == 1 and job.worker == "z-first"
    time.sleep(1.5)
    assert _generations(fleet) == 1
    assert _topic_messages(fleet.bootstrap, f"{fleet.prefix}.dlq") == []
    assert {r["state"] for r in _results(fleet, request.request_id)} == {"done"}


def test_a_cancel_on_one_clone_stops_the_job_another_clone_runs(fleet) -> None:
    from gradio_client import Client

    from tests.conftest import wait_for_status

    fleet.start_worker("runner")
    app = fleet.start_app("front", KAFKA_CONSUME="0")
    fleet.wait_for_workers(["runner"])
    client = Client(app.url, verbose=False)
    slow = {"negative_prompt": "", "preset": "base", "width": 512, "height": 512, "steps": 50,
            "guidance_scale": 5.0}
    request_id = client.predict(prompt="a job to stop elsewhere", seed=12, **slow, api_name="/submit")
    wait_for_status(client, request_id, lambda s: s["state"] == "running" and s["worker"] == "runner")
    client.predict(request_id=request_id, api_name="/cancel")
    cancelled = wait_for_status(client, request_id, lambda s: s["state"] == "cancelled", timeout=60)
    assert cancelled["step"] < 50
    with fleet.client() as backend:
        assert backend.generate(_request("the runner is free again"), timeout=120)["state"] == "done"


def test_request_ids_never_appear_in_health_metrics_or_heartbeats(fleet) -> None:
    import urllib.request

    from gradio_client import Client

    from tests.conftest import wait_for_status

    app = fleet.start_app("front")
    client = Client(app.url, verbose=False)
    slow = {"negative_prompt": "", "preset": "base", "width": 512, "height": 512, "steps": 30,
            "guidance_scale": 5.0}
    request_id = client.predict(prompt="a secret job", seed=13, request_id="hidden-13", **slow,
                                api_name="/submit")
    wait_for_status(client, request_id, lambda s: s["state"] == "running" and s["step"] >= 1)
    views = [urllib.request.urlopen(f"{app.url}{path}", timeout=10).read().decode() for path in
             ("/healthz", "/metrics")]
    workers, _ = fleet.redis_fleet()
    views.append(json.dumps(workers.workers()))
    assert json.loads(views[0])["queue"]["running"] is True
    assert not any("hidden-13" in view for view in views)
    client.predict(request_id=request_id, api_name="/cancel")


def test_object_store_failing_then_recovering_delivers_the_image_fleet_wide(fleet) -> None:
    from tests.services import S3Gate

    gate = S3Gate(fleet.s3)
    try:
        fleet.start_worker("w1", S3_ENDPOINT_URL=gate.endpoint)
        fleet.wait_for_workers(["w1"])
        _, jobs = fleet.redis_fleet()
        gate.open = False
        request = _request("an image waiting for R2", seed=21)
        with fleet.client() as client:
            client.submit(request)
            _wait_job(jobs, request.request_id, lambda j: j.error and "object store" in j.error, timeout=120)
            assert jobs.get(request.request_id).state == "queued"  # not done with a local-only image
            assert gate.refused >= 1
            gate.open = True
            result = client.wait(request.request_id, timeout=180)
        assert result["state"] == "done" and result["result"]["persisted"] is True
        key = result["result"]["object_key"]
        assert fleet.s3.client.get_object(Bucket=fleet.bucket, Key=key)["Body"].read()[:8] == b"\x89PNG\r\n\x1a\n"
        time.sleep(1.5)
        assert _generations(fleet) == 1  # the retry uploaded the kept image, it did not render again
        assert jobs.get(request.request_id).attempts == 1
    finally:
        gate.stop()


def test_healthz_while_loading_and_while_shutting_down(fleet) -> None:
    import signal
    import urllib.error
    import urllib.request

    from gradio_client import Client

    from tests.conftest import get_json, launch_app, wait_for_status

    app = launch_app(fleet.env(WORKER_NAME="ui", SHUTDOWN_GRACE_SECONDS="60"), fleet.workdir, name="ui",
                     ready=("starting", "ok"))
    fleet.processes["ui"] = app.process
    first = get_json(f"{app.url}/healthz")[1]
    if first["status"] == "starting":  # caught while the model loads: not in the consumer group yet
        assert first["consumer"]["state"] == "waiting for the model" and first["consumer"]["partitions"] == 0
    fleet.wait_for_workers(["ui"])
    client = Client(app.url, verbose=False)
    slow = {"negative_prompt": "", "preset": "base", "width": 512, "height": 512, "steps": 50,
            "guidance_scale": 5.0}
    request_id = client.predict(prompt="finished while draining", seed=14, **slow, api_name="/submit")
    wait_for_status(client, request_id, lambda s: s["state"] == "running" and s["step"] >= 1)
    app.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    with pytest.raises(urllib.error.HTTPError) as draining:  # still answering, and saying it is going
        urllib.request.urlopen(f"{app.url}/healthz", timeout=5)
    assert draining.value.code == 503 and json.loads(draining.value.read())["status"] == "stopping"
    assert app.process.wait(120) == 0  # it closes once the job in hand is done and committed
    _, jobs = fleet.redis_fleet()
    job = jobs.get(request_id)
    assert job.state == "done" and job.worker == "ui"  # finished here, within the grace period


def test_a_worker_whose_model_fails_takes_no_requests(fleet, tmp_path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    doomed = fleet.start_worker("doomed", MODEL_ID=str(broken))
    request = _request("waits for a worker that can draw", seed=31)
    with fleet.client() as client:
        client.submit(request)
        assert doomed.wait(90) == 2  # it says why and exits, without joining the group
        assert "joined group" not in fleet.log("doomed").lower()
        _, jobs = fleet.redis_fleet()
        assert jobs.get(request.request_id) is None  # nothing was failed (or even touched) for it
        fleet.start_worker("able")
        assert client.wait(request.request_id, timeout=120)["result"]["worker"] == "able"
