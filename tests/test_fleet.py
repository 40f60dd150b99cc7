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
