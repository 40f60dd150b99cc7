"""Amazon SQS as the fleet's queue (SQS_QUEUE_URL), for the managed variant: the same worker semantics
as the Kafka consumer, in SQS's own terms.

- A received message is invisible to the other workers for SQS_VISIBILITY_TIMEOUT seconds; while its
  job runs the worker extends that in the background, so a long CPU job is never delivered twice. A
  worker that dies (kill -9) stops extending: the message reappears and another worker takes it (the
  fleet-wide claim in Redis keeps a still-running generation from starting twice).
- A message is deleted only once its outcome is durable (the job done or cancelled in Redis).
- A failed attempt, a poison message or a request that ran out of attempts is made visible again at
  once and not deleted: after MAX_ATTEMPTS receives, the queue's redrive policy moves it to the
  dead-letter queue (configure the queue with a RedrivePolicy, maxReceiveCount = MAX_ATTEMPTS;
  `ensure_queue` does so).
One queue serves one preset: give each preset's workers their own queue.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from inference.errors import QueueUnavailable
from inference.request import GenerationRequest
from queueing.consumer import ConsumerStatus
from queueing.messages import MalformedMessage, decode_request, encode_request
from queueing.worker import Interrupted, RetryLater, Worker
from storage.jobs import CANCELLED, DONE, FAILED, Job, JobStore
from storage.keys import fingerprint

logger = logging.getLogger(__name__)

RECEIVE_WAIT_SECONDS = 2  # long polling: few empty receives, and a stop is noticed within seconds
AWS_ERRORS = (BotoCoreError, ClientError)


def make_sqs_client(region: str, endpoint_url: str | None = None, access_key_id: str | None = None,
                    secret_access_key: str | None = None):
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5,
                    read_timeout=RECEIVE_WAIT_SECONDS + 10)
    return boto3.client("sqs", region_name=region, endpoint_url=endpoint_url, aws_access_key_id=access_key_id,
                        aws_secret_access_key=secret_access_key, config=config)


def ensure_queue(client, name: str, max_attempts: int, visibility_timeout: int) -> str:
    """A request queue with its dead-letter queue and redrive policy (for tests and first setups)."""
    dlq_url = client.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_attempts)})
    return client.create_queue(QueueName=name, Attributes={"RedrivePolicy": policy,
                                                           "VisibilityTimeout": str(visibility_timeout)})["QueueUrl"]


class SqsRequestQueue:
    """What the gateway puts requests into; its depth and wait estimate come from the queue's counters
    (asked at most every 2 s) and the workers' heartbeats."""

    def __init__(self, client, queue_url: str, fleet: Any, preset: str) -> None:
        self.client, self.queue_url, self.fleet, self.preset = client, queue_url, fleet, preset
        self.max_size = 0
        self._depth: tuple[float, int] = (0.0, 0)

    def put(self, request: GenerationRequest) -> None:
        try:
            self.client.send_message(QueueUrl=self.queue_url, MessageBody=encode_request(request).decode())
        except AWS_ERRORS as error:
            raise QueueUnavailable(f"the SQS queue did not take the request ({type(error).__name__}); "
                                   "try again in a minute") from error

    def depth(self) -> int:
        measured_at, depth = self._depth
        if time.monotonic() - measured_at < 2.0:
            return depth
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attributes = self.client.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=names)["Attributes"]
        depth = sum(int(attributes.get(name, 0)) for name in names)
        self._depth = (time.monotonic(), depth)
        return depth

    def position(self, request_id: str) -> int | None:
        return None  # SQS has no order to report

    def wait_estimate(self) -> dict[str, Any]:
        try:
            workers = [w for w in self.fleet.workers() if w.get("preset") == self.preset] if self.fleet else []
            backlog = self.depth()
        except Exception:  # Redis or SQS away: say what is known
            workers, backlog = [], 0
        per_request = sum(w.get("mean_seconds", 10.0) for w in workers) / len(workers) if workers else 10.0
        return {"backlog": backlog, "workers": len(workers),
                "estimated_wait_s": round(backlog * per_request / max(1, len(workers)), 1)}

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 10.0) -> None:
        pass


class SqsWorkerLoop:
    """One worker's receive loop: one message at a time, the pipeline's one caller."""

    def __init__(self, client, queue_url: str, worker: Worker, jobs: JobStore, max_attempts: int,
                 visibility_timeout: int, shutdown_grace_seconds: float = 20.0,
                 wait_ready: Callable[[float], bool] | None = None) -> None:
        self.client, self.queue_url, self.worker, self.jobs = client, queue_url, worker, jobs
        self.max_attempts, self.visibility_timeout = max_attempts, visibility_timeout
        self.shutdown_grace_seconds, self.wait_ready = shutdown_grace_seconds, wait_ready
        self.topics = [queue_url.rsplit("/", 1)[-1]]
        self.status = ConsumerStatus()
        self.busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def assigned(self) -> int:
        return 1 if self.status.state == "consuming" else 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sqs-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Warm: the job in hand may finish within the grace period; past it, it is handed back."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(self.shutdown_grace_seconds)
        if self._thread.is_alive():
            self.worker.interrupt()
            self._thread.join(30)

    def _run(self) -> None:
        while self.wait_ready is not None and not self.wait_ready(1.0):
            if self._stop.is_set():
                return
        delay = 1.0
        while not self._stop.is_set():
            try:
                self._receive_one()
                delay = 1.0
            except AWS_ERRORS as error:  # SQS away: retry with backoff, never end quietly
                self.status.failed(error)
                logger.warning("SQS receive failed (%s); retrying in %.0f s", type(error).__name__, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def _receive_one(self) -> None:
        response = self.client.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=RECEIVE_WAIT_SECONDS,
            VisibilityTimeout=self.visibility_timeout, MessageSystemAttributeNames=["ApproximateReceiveCount"])
        self.status.polled(1)
        for message in response.get("Messages", []):
            self.busy = True
            try:
                self._process(message)
            finally:
                self.busy = False

    def _process(self, message: dict[str, Any]) -> None:
        receives = int(message.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        handle = message["ReceiptHandle"]
        try:
            request = decode_request(message["Body"].encode()).request
        except MalformedMessage as error:
            self._bounce(handle, f"malformed message: {error}")
            return
        if request.preset != self.worker.identity.preset:
            self._bounce(handle, f"preset {request.preset!r} is not served here (one queue per preset)")
            return
        job = self._job_for(request)
        if job.state in (DONE, CANCELLED) or job.cancel_requested:
            self._finish(job, handle)
            return
        if job.state == FAILED or receives > self.max_attempts:
            self._bounce(handle, f"request {request.request_id} failed ({job.error}); on to the dead-letter queue")
            return
        self._attempt(request, handle, final_attempt=receives >= self.max_attempts)

    def _attempt(self, request: GenerationRequest, handle: str, final_attempt: bool) -> None:
        stop_extending = threading.Event()
        threading.Thread(target=self._extend_visibility, args=(handle, stop_extending),
                         name="sqs-visibility", daemon=True).start()
        try:
            self.worker.handle(request, final_attempt=final_attempt)
        except (Interrupted, RetryLater) as error:
            self._bounce(handle, f"handed back: {error}")
            return
        finally:
            stop_extending.set()
        job = self.jobs.get(request.request_id)
        if job is not None and job.state == FAILED:
            self._bounce(handle, f"request {request.request_id} failed: {job.error}")
            return
        self._delete(handle)

    def _job_for(self, request: GenerationRequest) -> Job:
        fp = fingerprint(request, self.worker.identity)
        return self.jobs.create(Job(request_id=request.request_id, fingerprint=fp, total_steps=request.steps,
                                    request=request.to_dict(), owner="sqs", backend="fleet"))

    def _extend_visibility(self, handle: str, stop: threading.Event) -> None:
        while not stop.wait(max(1.0, self.visibility_timeout / 3)):
            try:
                self.client.change_message_visibility(QueueUrl=self.queue_url, ReceiptHandle=handle,
                                                      VisibilityTimeout=self.visibility_timeout)
            except AWS_ERRORS as error:  # the next try may work; the claim in Redis guards meanwhile
                logger.warning("could not extend the message's visibility: %s", type(error).__name__)

    def _finish(self, job: Job, handle: str) -> None:
        if job.cancel_requested and not job.finished:
            self.jobs.update(job.request_id, state=CANCELLED, error="cancelled by request", finished_at=time.time())
        self._delete(handle)

    def _delete(self, handle: str) -> None:
        """After the outcome is durable; a failed delete only means one more (harmless) delivery."""
        try:
            self.client.delete_message(QueueUrl=self.queue_url, ReceiptHandle=handle)
        except AWS_ERRORS as error:
            logger.warning("could not delete a handled message (%s); it will come back once, as a "
                           "cache hit", type(error).__name__)

    def _bounce(self, handle: str, reason: str) -> None:
        """Visible again now: another receive, until the redrive policy moves it to the dead-letter queue."""
        logger.warning("%s", reason)
        try:
            self.client.change_message_visibility(QueueUrl=self.queue_url, ReceiptHandle=handle, VisibilityTimeout=0)
        except AWS_ERRORS as error:
            logger.warning("could not hand the message back (%s); it reappears after its visibility timeout",
                           type(error).__name__)
