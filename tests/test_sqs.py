"""SQS as the fleet's queue, against moto's server over HTTP (the SQS wire API): visibility extended while
a job runs, redelivery after a worker dies, deletion only after the outcome, dead letters by redrive."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import boto3
import pytest
from gradio_client import Client

from inference.request import GenerationRequest
from queueing.sqs import SqsRequestQueue, ensure_queue
from tests.conftest import wait_for_job
from tests.services import S3_KEY, S3_SECRET

pytestmark = pytest.mark.timeout(600)

VISIBILITY_SECONDS = 4
MAX_ATTEMPTS = 2


@pytest.fixture
def sqs_fleet(fleet):
    client = boto3.client("sqs", endpoint_url=fleet.s3.endpoint, region_name="us-east-1",
                          aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)
    name = f"requests-{uuid.uuid4().hex[:8]}"
    url = ensure_queue(client, name, MAX_ATTEMPTS, VISIBILITY_SECONDS)
    env = {"KAFKA_BOOTSTRAP_SERVERS": "", "SQS_QUEUE_URL": url, "SQS_ENDPOINT_URL": fleet.s3.endpoint,
           "SQS_REGION": "us-east-1", "SQS_VISIBILITY_TIMEOUT": str(VISIBILITY_SECONDS),
           "MAX_ATTEMPTS": str(MAX_ATTEMPTS), "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    return fleet, client, url, client.get_queue_url(QueueName=f"{name}-dlq")["QueueUrl"], env


def _count(client, url: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(attributes[n]) for n in names)


def _wait_job(jobs, request_id: str, predicate, timeout: float = 120.0):
    return wait_for_job(jobs, request_id, predicate, timeout)


def test_worker_killed_mid_job_the_message_comes_back_and_completes_once(sqs_fleet) -> None:
    fleet, client, url, dlq_url, env = sqs_fleet
    for name in ("s1", "s2"):
        fleet.start_worker(name, **env)
    fleet.wait_for_workers(["s1", "s2"])
    _, jobs = fleet.redis_fleet()
    request = GenerationRequest.create("a forge that loses its smith", preset="base", width=512, height=512,
                                       steps=40, guidance_scale=5.0, seed=3)
    SqsRequestQueue(client, url, None, "base").put(request)
    running = _wait_job(jobs, request.request_id, lambda j: j.state == "running")
    fleet.kill(running.worker)
    survivor = "s2" if running.worker == "s1" else "s1"
    done = _wait_job(jobs, request.request_id, lambda j: j.finished, timeout=300)
    assert done.state == "done" and done.result["worker"] == survivor, done
    assert done.result["backend"] == "fleet"
    deadline = time.monotonic() + 15
    while _count(client, url) and time.monotonic() < deadline:  # deleted once its outcome was stored
        time.sleep(0.5)
    assert _count(client, url) == 0 and _count(client, dlq_url) == 0
    redis_fleet, _ = fleet.redis_fleet()
    time.sleep(2)  # one more heartbeat carries the count
    assert {w["worker"]: w["generations"] for w in redis_fleet.workers()}[survivor] == 1  # made once


def test_poison_message_lands_in_the_dead_letter_queue_by_redrive(sqs_fleet) -> None:
    fleet, client, url, dlq_url, env = sqs_fleet
    fleet.start_worker("s1", **env)
    fleet.wait_for_workers(["s1"])
    client.send_message(QueueUrl=url, MessageBody="this is not a request")
    deadline = time.monotonic() + 60
    while _count(client, dlq_url) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _count(client, dlq_url) == 1 and _count(client, url) == 0
    body = client.receive_message(QueueUrl=dlq_url, MessageSystemAttributeNames=["ApproximateReceiveCount"])
    assert body["Messages"][0]["Body"] == "this is not a request"  # kept as sent, for inspection and replay
    assert "malformed message" in fleet.log("s1")

    good = GenerationRequest.create("after the poison", preset="base", width=256, height=256, steps=2,
                                    guidance_scale=5.0, seed=1)
    SqsRequestQueue(client, url, None, "base").put(good)  # the worker goes on serving
    _, jobs = fleet.redis_fleet()
    assert _wait_job(jobs, good.request_id, lambda j: j.finished).state == "done"


def test_a_space_on_sqs_serves_its_api_through_the_queue(sqs_fleet) -> None:
    fleet, client, url, _, env = sqs_fleet
    app = fleet.start_app("sqs-space", **env)
    _, meta = Client(app.url, verbose=False).predict(prompt="a queue in the cloud", seed=4, negative_prompt="",
                                                     preset="base", width=256, height=256, steps=2,
                                                     guidance_scale=5.0, api_name="/generate")
    assert meta["backend"] == "fleet" and meta["worker"] == "sqs-space" and not meta["cached"], meta
    status = json.loads(urllib.request.urlopen(f"{app.url}/healthz", timeout=5).read())
    assert status["backends"]["queue"] == "sqs" and status["consumer"]["state"] == "consuming", status
    assert _count(client, url) == 0
