"""The fleet against real services: Kafka-compatible broker, redis-server, moto S3, tiny SDXL workers."""

from __future__ import annotations

import io
import json
import time
import urllib.request
from collections import Counter

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from inference.images import read_parameters
from inference.request import GenerationRequest
from queueing.messages import encode_request
from tests.conftest import wait_for_status

pytestmark = pytest.mark.timeout(600)


def _request(prompt: str, **fields) -> GenerationRequest:
    return GenerationRequest.create(prompt, preset="base", **{"width": 256, "height": 256, "steps": 2,
                                                              "guidance_scale": 5.0, **fields})


def _topic_messages(bootstrap: str, topic: str, timeout: float = 5.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    ends = consumer.end_offsets(partitions)
    messages, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and any(consumer.position(p) < ends[p] for p in partitions):
        for batch in consumer.poll(timeout_ms=500).values():
            messages.extend(batch)
    consumer.close()
    return messages


def _generations(fleet) -> int:
    redis_fleet, _ = fleet.redis_fleet()
    return sum(w["generations"] for w in redis_fleet.workers())


def test_three_workers_share_thirty_requests_each_generated_once(fleet) -> None:
    names = ["w1", "w2", "w3"]
    for name in names:
        fleet.start_worker(name)
    fleet.wait_for_workers(names)
    with fleet.client() as client:
        ids = [client.submit(_request(f"crate number {i}", seed=i)) for i in range(30)]
        results = client.wait_all(ids, timeout=240)
    assert all(r["state"] == "done" for r in results.values()), results
    assert all(r["result"]["cached"] is False for r in results.values())
    by_worker = Counter(r["result"]["worker"] for r in results.values())
    assert len(by_worker) >= 2, by_worker
    deadline = time.monotonic() + 10  # heartbeats carry the counts, once a second
    while _generations(fleet) < 30 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _generations(fleet) == 30


def test_malformed_message_goes_to_dlq_and_the_next_request_is_served(fleet) -> None:
    fleet.start_worker("w1")
    fleet.wait_for_workers(["w1"])
    with fleet.client() as client:
        producer = KafkaProducer(bootstrap_servers=fleet.bootstrap)
        producer.send(f"{fleet.prefix}.requests", key=b"junk", value=b"{not json").get(timeout=10)
        producer.send(f"{fleet.prefix}.requests", key=b"old", value=json.dumps(
            {"v": 99, "request": {}}).encode()).get(timeout=10)
        producer.close()
        result = client.generate(_request("after the junk"), timeout=120)
    assert result["state"] == "done"
    dead = [json.loads(m.value) for m in _topic_messages(fleet.bootstrap, f"{fleet.prefix}.dlq")]
    reasons = sorted(d["reason"] for d in dead)
    assert len(dead) == 2 and reasons[0].startswith("not JSON") and "unknown message version 99" in reasons[1]
    assert {d["original"]["text"] for d in dead} == {"{not json", '{"v": 99, "request": {}}'}


def test_stored_object_has_content_type_metadata_and_fetchable_url(fleet) -> None:
    fleet.start_worker("w1")
    fleet.wait_for_workers(["w1"])
    with fleet.client() as client:
        result = client.generate(_request("a stored banner", seed=3), timeout=120)["result"]
    assert result["object_key"] == f"images/{result['fingerprint'][:2]}/{result['fingerprint']}.png"
    head = fleet.s3.client.head_object(Bucket=fleet.bucket, Key=result["object_key"])
    assert head["ContentType"] == "image/png" and "immutable" in head["CacheControl"]
    with urllib.request.urlopen(result["url"], timeout=10) as response:  # presigned GET
        data = response.read()
    assert read_parameters(data).startswith("a stored banner\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 3")
    from PIL import Image

    assert Image.open(io.BytesIO(data)).size == (256, 256)


def test_request_on_instance_a_is_generated_by_b_and_a_follows_it(fleet) -> None:
    from gradio_client import Client

    fleet.start_worker("b")
    app_a = fleet.start_app("a", KAFKA_CONSUME="0")  # A serves the UI/API; its own worker is stopped
    fleet.wait_for_workers(["b"])
    client = Client(app_a.url, verbose=False)
    slow = {"negative_prompt": "", "preset": "base", "width": 512, "height": 512, "steps": 30,
            "guidance_scale": 5.0}
    request_id = client.predict(prompt="a far-away forge", seed=8, request_id="", **slow, api_name="/submit")
    running = wait_for_status(client, request_id, lambda s: s["state"] == "running" and s["step"] >= 1)
    assert running["worker"] == "b" and running["total_steps"] == 30
    done = wait_for_status(client, request_id, lambda s: s["state"] == "done")
    assert done["result"]["worker"] == "b" and done["step"] == 30

    # Another instance asking the same thing gets the cached image: no generation, the same object.
    image_path, meta = client.predict(prompt="a far-away forge", seed=8, **slow, api_name="/generate")
    assert meta["cached"] is True and meta["object_key"] == done["result"]["object_key"]
    assert meta["url"].split("?")[0] == done["result"]["url"].split("?")[0]
    redis_fleet, _ = fleet.redis_fleet()
    time.sleep(1.5)
    assert {w["worker"]: w["generations"] for w in redis_fleet.workers()} == {"b": 1}
    # Following progress and estimating waits never scan the keyspace, and each process shares one
    # pattern subscription for all the jobs it waits on.
    assert "cmdstat_scan" not in redis_fleet.client.info("commandstats")
    assert redis_fleet.client.pubsub_numpat() <= len(fleet.processes)
    with open(image_path, "rb") as handle:
        assert handle.read() == fleet.s3.client.get_object(Bucket=fleet.bucket, Key=meta["object_key"])["Body"].read()


def test_worker_killed_mid_generation_hands_the_request_to_another(fleet) -> None:
    names = ["k1", "k2", "k3"]
    for name in names:
        fleet.start_worker(name)
    fleet.wait_for_workers(names)
    _, jobs = fleet.redis_fleet()
    spare = 4
    with fleet.client() as client:
        for round_ in range(5):
            request = _request(f"doomed tower {round_}", width=512, height=512, steps=24, seed=round_)
            client.submit(request)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = jobs.get(request.request_id)
                if job and job.state == "running" and job.step >= 1:
                    break
                time.sleep(0.05)
            victim = job.worker
            fleet.kill(victim)
            replacement = f"k{spare}"
            spare += 1
            fleet.start_worker(replacement)
            result = client.wait(request.request_id, timeout=120)
            assert result["state"] == "done", result
            assert result["result"]["worker"] != victim
            assert jobs.get(request.request_id).attempts == 2
    messages = [json.loads(m.value) for m in _topic_messages(fleet.bootstrap, f"{fleet.prefix}.results")]
    # Each request has one outcome, done, with one image. The killed worker published nothing; a result
    # may appear twice when a rebalance hands a finished request to another member (at least once,
    # as the README promises), but never with another state or another image.
    by_request: dict[str, set] = {}
    for message in messages:
        by_request.setdefault(message["request_id"], set()).add((message["state"], message["result"]["object_key"]))
    assert len(by_request) == 5 and all(len(outcomes) == 1 for outcomes in by_request.values()), by_request
    assert all(state == "done" for outcomes in by_request.values() for state, _ in outcomes)


def test_broker_restart_between_submit_and_consume_loses_nothing(tiny_model, tmp_path, redis_server,
                                                                 s3_server) -> None:
    from tests.services import Fleet, TansuBroker

    # Always a broker of its own (even when KAFKA_BOOTSTRAP_SERVERS names one): it is restarted here,
    # with the s3 storage engine so that its messages survive.
    broker = TansuBroker(tmp_path, s3=s3_server)
    fleet = Fleet(tiny_model, tmp_path, broker.bootstrap, redis_server.url, s3_server, s3_server.bucket())
    try:
        fleet.start_worker("through-restart")  # running before, during and after the restart
        fleet.wait_for_workers(["through-restart"])
        queued = [_request(f"a request that outlives its broker {i}", seed=77 + i) for i in range(3)]
        with fleet.client() as client:
            for request in queued:
                client.submit(request)
            broker.stop()
            time.sleep(2)
            broker.start()
            results = client.wait_all([r.request_id for r in queued], timeout=180)
        assert all(r["state"] == "done" and r["result"]["worker"] == "through-restart" for r in results.values())
        assert fleet.processes["through-restart"].poll() is None
    finally:
        fleet.stop_all()
        broker.stop()


def test_identical_requests_on_two_workers_are_generated_once(fleet) -> None:
    fleet.start_worker("t1")
    fleet.start_worker("t2")
    fleet.wait_for_workers(["t1", "t2"])
    slow = {"width": 512, "height": 512, "steps": 30, "seed": 4}
    twins = [_request("one golden idol", request_id=f"idol-{i}", **slow) for i in range(2)]
    # 12 partitions, range assignor: one worker holds 0-5, the other 6-11. Partitions 0 and 11 put
    # one twin on each worker for sure: the second must wait for the first one's claim.
    producer = KafkaProducer(bootstrap_servers=fleet.bootstrap)
    for request, partition in zip(twins, (0, 11)):
        producer.send(f"{fleet.prefix}.requests.base", encode_request(request), partition=partition).get(timeout=10)
    producer.close()
    with fleet.client() as client:
        ids = [r.request_id for r in twins]
        results = client.wait_all(ids, timeout=180)
    assert all(r["state"] == "done" for r in results.values())
    assert len({r["result"]["object_key"] for r in results.values()}) == 1
    assert sum(not r["result"]["cached"] for r in results.values()) == 1
    logs = fleet.log("t1") + fleet.log("t2")
    assert all(f"[{r.request_id}]" in fleet.log("t1") or f"[{r.request_id}]" in fleet.log("t2") for r in twins)
    assert logs.count("holds it; waiting for that result") == 1  # the claim path did run
    time.sleep(1.5)
    assert _generations(fleet) == 1
