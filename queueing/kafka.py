"""Kafka: the fleet's shared request topic, its results topic and its dead-letter topic.

Every app process runs a KafkaWorkerLoop, a member of one consumer group, so cloning the Space adds
capacity. Delivery is at least once: the offset is committed only after the result is stored and
published, and a request id already done is not redone.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError

from inference.errors import QueueUnavailable
from inference.request import GenerationRequest
from queueing.messages import (
    MalformedMessage,
    decode_request,
    encode_dead_letter,
    encode_request,
    encode_result,
)
from queueing.worker import Interrupted, RetryLater, Worker
from storage.jobs import CANCELLED, DONE, FAILED, QUEUED, Job, JobStore
from storage.keys import fingerprint, routing_key

logger = logging.getLogger(__name__)

PAUSE_AFTER_SECONDS = 1.0  # well inside any max_poll_interval_ms; heartbeats run on their own thread


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    topic_prefix: str = "image_generation"
    group_id: str = "image_generation-workers"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    partitions: int = 12
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 45_000
    max_attempts: int = 3

    @property
    def requests_topic(self) -> str:
        return f"{self.topic_prefix}.requests"

    @property
    def results_topic(self) -> str:
        return f"{self.topic_prefix}.results"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    def client_options(self) -> dict[str, Any]:
        # Fail in seconds, not kafka-python's default 30 s, when the broker is away: callers say so.
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers.split(","),
                                   "security_protocol": self.security_protocol, "bootstrap_timeout_ms": 5000}
        if self.sasl_mechanism:
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                           sasl_plain_password=self.sasl_password)
        return options


def ensure_topics(settings: KafkaSettings) -> None:
    """Create the three topics when missing (enough partitions for many workers to share)."""
    admin = KafkaAdminClient(**settings.client_options())
    try:
        for topic in (settings.requests_topic, settings.results_topic, settings.dlq_topic):
            try:
                admin.create_topics([NewTopic(topic, settings.partitions, 1)])
                logger.info("created topic %s with %d partitions", topic, settings.partitions)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


class RequestSender:
    """Writes requests to the request topic. The key stays the request hash (for inspection), but
    the partition is chosen round-robin: hashing keys spreads 480 requests over 4 workers as
    unevenly as 101..148, and the busiest worker then sets the fleet's pace. Identical requests that
    meet on two workers are generated once through the fleet-wide claim (storage.redis_store)."""

    def __init__(self, settings: KafkaSettings, producer: LazyProducer) -> None:
        self.settings, self.producer = settings, producer
        self._turn = itertools.count(random.randrange(1 << 16))
        self._lock = threading.Lock()

    def _partition(self) -> int:
        try:
            partitions = sorted(self.producer.get().partitions_for(self.settings.requests_topic))
        except KafkaError as error:
            raise QueueUnavailable(f"Kafka is unreachable ({type(error).__name__})") from error
        with self._lock:
            return partitions[next(self._turn) % len(partitions)]

    def send(self, request: GenerationRequest) -> None:
        self.send_raw(encode_request(request), routing_key(request).encode())

    def send_raw(self, value: bytes, key: bytes | None) -> None:
        self.producer.send(self.settings.requests_topic, key, value, partition=self._partition())


def make_producer(settings: KafkaSettings) -> KafkaProducer:
    # acks=all: a request counts as accepted only once every in-sync replica has it.
    return KafkaProducer(acks="all", retries=5, linger_ms=0, max_block_ms=10_000, **settings.client_options())


class LazyProducer:
    """Connects on first use and again after a failure, so the app starts (and says so) while Kafka
    is away, and reconnects by itself when it is back."""

    RETRY_AFTER_SECONDS = 5.0  # after a failed connect, fail fast for a while instead of blocking callers

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        self._failed_at = 0.0

    def get(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                if time.monotonic() - self._failed_at < self.RETRY_AFTER_SECONDS:
                    raise QueueUnavailable("Kafka is unreachable; try again shortly")
                try:
                    ensure_topics(self.settings)
                    self._producer = make_producer(self.settings)
                except KafkaError as error:
                    self._failed_at = time.monotonic()
                    raise QueueUnavailable(f"Kafka is unreachable ({type(error).__name__}); try again shortly") \
                        from error
            return self._producer

    def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None) -> None:
        """Send and wait for the acknowledgement (at least once: nothing counts until it is stored)."""
        try:
            self.get().send(topic, key=key, value=value, partition=partition).get(timeout=15)
        except KafkaError as error:
            raise QueueUnavailable(f"Kafka did not accept the message ({type(error).__name__}); "
                                   "try again shortly") from error

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout)
                self._producer = None


class KafkaRequestQueue:
    """The gateway's queue in the fleet: requests go to the shared topic; any worker may take them."""

    running_id = None

    def __init__(self, settings: KafkaSettings, producer: LazyProducer, backlog: Any) -> None:
        self.settings, self.producer, self.backlog = settings, producer, backlog
        self.sender = RequestSender(settings, producer)
        self.max_size = 0  # bounded by the fleet's capacity, not by this process

    def put(self, request: GenerationRequest) -> None:
        self.sender.send(request)

    def depth(self) -> int:
        return self.backlog.lag()

    def position(self, request_id: str) -> int | None:
        return None  # the topic has no per-request position; wait_estimate gives the fleet's backlog

    def wait_estimate(self) -> dict[str, Any]:
        return self.backlog.estimate()

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 10.0) -> None:
        self.producer.close(timeout)


class KafkaWorkerLoop:
    """One consumer-group member. While a job runs (on a separate thread) it keeps polling with
    its partitions paused, so a minutes-long CPU job never trips max_poll_interval_ms."""

    def __init__(self, settings: KafkaSettings, worker: Worker, jobs: JobStore, producer: LazyProducer,
                 metrics: Any = None, shutdown_grace_seconds: float = 20.0) -> None:
        self.settings, self.worker, self.jobs, self.producer = settings, worker, jobs, producer
        self.sender = RequestSender(settings, producer)
        self.metrics, self.shutdown_grace_seconds = metrics, shutdown_grace_seconds
        self.current_request_id: str | None = None
        self.connected = False
        self.assigned = 0  # partitions held, for heartbeats
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kafka-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Warm shutdown: the job in hand may finish (and is committed) within the grace period; past
        it the job is interrupted and handed back uncommitted, so another worker takes it. Then the
        group is left cleanly, so its partitions move at once."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(self.shutdown_grace_seconds)
        if self._thread.is_alive():
            logger.warning("job %s still running after %.0f s: handing it back", self.current_request_id,
                           self.shutdown_grace_seconds)
            self.worker.interrupt()
            self._thread.join(30)

    def _connect(self) -> KafkaConsumer | None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                ensure_topics(self.settings)
                consumer = KafkaConsumer(
                    self.settings.requests_topic, group_id=self.settings.group_id, enable_auto_commit=False,
                    auto_offset_reset="earliest", max_poll_records=1, fetch_max_wait_ms=20,
                    max_poll_interval_ms=self.settings.max_poll_interval_ms,
                    session_timeout_ms=self.settings.session_timeout_ms,
                    heartbeat_interval_ms=max(1000, self.settings.session_timeout_ms // 4),
                    client_id=self.worker.name, **self.settings.client_options())
                self.connected = True
                return consumer
            except KafkaError as error:
                logger.warning("Kafka unreachable (%s); retrying in %.0f s", type(error).__name__, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
        return None

    def _run(self) -> None:
        consumer = self._connect()
        if consumer is None:
            return
        try:
            while not self._stop.is_set():
                records = consumer.poll(timeout_ms=500, max_records=1)
                self.assigned = len(consumer.assignment())
                for partition, messages in records.items():
                    for message in messages:
                        self._process(consumer, partition, message)
        except Exception:
            logger.exception("Kafka worker loop crashed")
        finally:
            consumer.close()  # leaves the group now, so its partitions move without a session timeout
            self.connected = False
            logger.info("left the consumer group %s", self.settings.group_id)

    def _process(self, consumer: KafkaConsumer, partition: TopicPartition, message) -> None:
        self._handed_back = False
        done = threading.Event()
        thread = threading.Thread(target=self._handle_then_set, args=(message, done), name="generate", daemon=True)
        thread.start()
        # Short jobs (cache hits, GPU renders) finish within the grace period without pausing: pausing
        # drops the records already fetched, and each message would then cost a fetch round trip.
        # Longer ones pause and keep polling, so max_poll_interval_ms never expires mid-job.
        if not done.wait(PAUSE_AFTER_SECONDS):
            consumer.pause(*consumer.assignment())
            while not done.wait(0.1):
                self._poll_paused(consumer)
            consumer.resume(*consumer.assignment())
        if self._handed_back:
            return  # uncommitted: after this member leaves, another one gets the message again
        try:
            consumer.commit({partition: OffsetAndMetadata(message.offset + 1, "", -1)})
        except CommitFailedError:
            # The partition moved during a rebalance; its new owner will find the job done.
            logger.warning("could not commit offset %d of %s (partition reassigned)", message.offset, partition)

    def _poll_paused(self, consumer: KafkaConsumer) -> None:
        """Keeps group membership alive. A rebalance may hand back partitions unpaused: anything they
        return is put back (seek) untouched, and everything is paused again."""
        records = consumer.poll(timeout_ms=50)
        for partition, messages in records.items():
            consumer.seek(partition, messages[0].offset)
        if records or consumer.assignment() - consumer.paused():
            consumer.pause(*consumer.assignment())

    def _handle_then_set(self, message, done: threading.Event) -> None:
        try:
            self.handle_message(message.value, message.key)
        except Exception:
            logger.exception("unexpected error handling offset %d", message.offset)
        finally:
            done.set()

    def handle_message(self, raw: bytes | None, key: bytes | None = None) -> None:
        try:
            envelope = decode_request(raw)
        except MalformedMessage as error:
            logger.warning("malformed message sent to the dead-letter topic: %s", error)
            self._dead_letter(raw, key, str(error))
            return
        request = envelope.request
        job = self._job_for(request)
        if envelope.replayed and job.state == FAILED:  # an operator replayed it after fixing the cause
            job = self.jobs.update(request.request_id, state=QUEUED, attempts=0, error=None, finished_at=None)
        if job.state == DONE:
            self._publish_result(job)  # a redelivery: the client may have missed the first one
            return
        if job.state == CANCELLED or job.cancel_requested:
            self._finish_cancelled(job)
            return
        self._attempt(request, job, raw, key)

    def _job_for(self, request: GenerationRequest) -> Job:
        fp = fingerprint(request, self.worker.identity)
        # Producers outside the app (the game backend) create no job: make it here.
        return self.jobs.create(Job(request_id=request.request_id, fingerprint=fp, total_steps=request.steps,
                                    request=request.to_dict()))

    def _attempt(self, request: GenerationRequest, job: Job, raw: bytes | None, key: bytes | None) -> None:
        attempts = job.attempts + 1
        job = self.jobs.update(request.request_id, attempts=attempts)
        if attempts > self.settings.max_attempts:  # earlier attempts died with their worker
            self._give_up(request, raw, key, attempts, job.error or "the worker stopped during every attempt")
            return
        self.current_request_id = request.request_id
        if self.metrics:
            self.metrics.attempts.inc()
        try:
            self.worker.handle(request, final_attempt=attempts >= self.settings.max_attempts)
        except RetryLater:
            self.sender.send_raw(raw, key)  # maybe another worker (serving that preset, or healthy) takes it
            return
        except Interrupted:
            self._handed_back = True
            return
        finally:
            self.current_request_id = None
        job = self.jobs.get(request.request_id) or job
        if job.state == FAILED:  # final: out of attempts, or an error that retrying cannot fix
            self._dead_letter(raw, key, job.error or "failed", attempts, request.request_id)
            job = self.jobs.update(request.request_id, error=(
                f"{job.error} (attempt {attempts} of {self.settings.max_attempts}; the request is in the "
                f"dead-letter topic {self.settings.dlq_topic} for replay once the cause is fixed)"))
        self._publish_result(job)

    def _give_up(self, request: GenerationRequest, raw, key, attempts: int, last_error: str) -> None:
        message = (f"failed after {attempts - 1} attempts: {last_error}. The request is in the dead-letter "
                   f"topic {self.settings.dlq_topic}; fix the cause and replay it, or send it again.")
        job = self.jobs.update(request.request_id, state=FAILED, error=message, finished_at=time.time())
        self._dead_letter(raw, key, last_error, attempts - 1, request.request_id)
        self._publish_result(job)

    def _finish_cancelled(self, job: Job) -> None:
        if not job.finished:
            job = self.jobs.update(job.request_id, state=CANCELLED, error="cancelled by request",
                                   finished_at=time.time())
        self._publish_result(job)

    def _publish_result(self, job: Job) -> None:
        self.producer.send(self.settings.results_topic, job.request_id.encode(),
                           encode_result(job.request_id, job.state, job.result, job.error))

    def _dead_letter(self, raw, key, reason: str, attempts: int = 0, request_id: str | None = None) -> None:
        if self.metrics:
            self.metrics.dead_letters.labels("malformed" if not request_id else "failed").inc()
        self.producer.send(self.settings.dlq_topic, key,
                           encode_dead_letter(raw, reason, self.worker.name, attempts, request_id))
