"""The fleet's consumer: one consumer-group member per worker process, so cloning the Space adds capacity.

Delivery is at least once, and an offset is committed only once the message's outcome is durable:
the result stored and published, the request forwarded or re-queued, or a dead letter written. Any
broker error (a timeout while the broker is away, a rejoin in progress) is retried with backoff and
the consumer reconnects; it never ends quietly while the process lives. A worker joins the group only
once its model is loaded, and leaves it if the model fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import CommitFailedError, KafkaError

from inference.errors import QueueUnavailable
from inference.request import GenerationRequest
from queueing.kafka import KafkaSettings, LazyProducer, RequestSender, ensure_topics
from queueing.messages import MalformedMessage, Origin, decode_request, encode_dead_letter, encode_result
from queueing.worker import Interrupted, RetryLater, Worker
from storage.jobs import CANCELLED, DONE, FAILED, QUEUED, Job, JobStore
from storage.keys import fingerprint, routing_key

logger = logging.getLogger(__name__)

PAUSE_AFTER_SECONDS = 1.0  # well inside any max_poll_interval_ms; heartbeats run on their own thread
MAX_BACKOFF_SECONDS = 10.0
STALE_POLL_SECONDS = 30.0  # a consumer that has not polled for this long is reported unhealthy
PRIORITY_WINDOW = 500  # records one poll may return to choose from (bounded by max_partition_fetch_bytes)


class NotDurable(Exception):
    """The outcome could not be written before the worker had to stop: leave the offset uncommitted."""


@dataclass
class ConsumerStatus:
    """What /healthz and the banner say about the consumer (no request ids: they are capabilities)."""

    state: str = "waiting for the model"
    partitions: int = 0
    last_poll_at: float | None = None
    last_error: str | None = None

    def polled(self, partitions: int) -> None:
        self.state, self.partitions, self.last_poll_at = "consuming", partitions, time.time()

    def failed(self, error: BaseException) -> None:
        self.last_error = type(error).__name__

    @property
    def healthy(self) -> bool:
        fresh = self.last_poll_at is not None and time.time() - self.last_poll_at < STALE_POLL_SECONDS
        return self.state == "consuming" and fresh

    def as_dict(self) -> dict[str, Any]:
        age = None if self.last_poll_at is None else round(time.time() - self.last_poll_at, 1)
        return {"state": self.state, "partitions": self.partitions, "last_poll_age_s": age,
                "last_error": self.last_error}


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, loop: KafkaWorkerLoop) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked) -> None:
        self.loop.revoked.update(revoked)
        logger.info("rebalance: %d partitions revoked", len(revoked))

    def on_partitions_assigned(self, assigned) -> None:
        self.loop.revoked.difference_update(assigned)
        self.loop.status.partitions = len(assigned)
        logger.info("rebalance: %d partitions assigned", len(assigned))


class KafkaWorkerLoop:
    """While a job runs (on a separate thread) the loop keeps polling with its partitions paused, so a
    minutes-long CPU job never trips max_poll_interval_ms."""

    def __init__(self, settings: KafkaSettings, worker: Worker, jobs: JobStore, producer: LazyProducer,
                 metrics: Any = None, shutdown_grace_seconds: float = 20.0,
                 wait_ready: Callable[[float], bool] | None = None, entrance: bool = False,
                 bulk_every: int = 4) -> None:
        self.settings, self.worker, self.jobs, self.producer = settings, worker, jobs, producer
        self.sender = RequestSender(settings, producer)
        self.metrics, self.shutdown_grace_seconds = metrics, shutdown_grace_seconds
        self.wait_ready = wait_ready  # the model's readiness: no group membership before it
        self.preset = worker.identity.preset
        # entrance: read <prefix>.requests and forward every request to its preset's topic (fast, no
        # generation); else: read this preset's topic, in this preset's group, and generate.
        self.entrance = entrance
        if entrance:
            self.topics, self.group_id = [settings.requests_topic], settings.entrance_group
        else:
            self.topics = [settings.preset_topic(self.preset), settings.bulk_topic(self.preset)]
            self.group_id = settings.preset_group(self.preset)
        self.bulk_every = bulk_every  # while both topics wait, 1 take in this many is from the bulk topic
        self._interactive_streak = 0
        self.status = ConsumerStatus()
        # The entrance of a Space with a GPU service routes requests whose producer opted in (route
        # "auto"): queueing.routing.Router and queueing.remote.RemoteBackend, set by the app.
        self.router: Any = None
        self.remote: Any = None
        self.revoked: set[TopicPartition] = set()
        self.busy = False
        self._stop = threading.Event()
        self._abandon = threading.Event()  # past the grace period: stop retrying, hand work back
        self._thread: threading.Thread | None = None

    @property
    def assigned(self) -> int:
        return self.status.partitions

    def start(self) -> None:
        name = "kafka-entrance" if self.entrance else "kafka-worker"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
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
            logger.warning("job still running after %.0f s: handing it back", self.shutdown_grace_seconds)
            self._abandon.set()
            self.worker.interrupt()
            self._thread.join(30)

    # ---- membership -------------------------------------------------------------------------
    def _run(self) -> None:
        if not self._model_ready():
            return
        delay = 1.0
        while not self._stop.is_set():
            consumer = self._connect()
            if consumer is None:
                break
            try:
                self._consume(consumer)
                delay = 1.0
            except Exception as error:  # never end quietly: whatever broke, reconnect
                self.status.failed(error)
                self.status.state = "reconnecting"
                logger.warning("consumer error (%s: %s); reconnecting in %.0f s", type(error).__name__, error, delay)
            finally:
                self._close(consumer)
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)
        self.status.state = "stopped"

    def _model_ready(self) -> bool:
        while self.wait_ready is not None and not self._stop.is_set():
            try:
                if self.wait_ready(1.0):
                    return True
            except Exception as error:  # the model failed: this worker must take no requests
                self.status.state = "model failed"
                logger.error("not joining the consumer group: %s", error)
                return False
        return not self._stop.is_set()

    def _connect(self) -> KafkaConsumer | None:
        delay = 1.0
        while not self._stop.is_set():
            self.status.state = "connecting"
            try:
                ensure_topics(self.settings, (self.preset,))
                consumer = KafkaConsumer(
                    group_id=self.group_id, enable_auto_commit=False,
                    auto_offset_reset="earliest", max_poll_records=1, fetch_max_wait_ms=20,
                    # a priority window refetches what it did not take: keep each partition's fetch small
                    max_partition_fetch_bytes=32 * 1024,
                    max_poll_interval_ms=self.settings.max_poll_interval_ms,
                    session_timeout_ms=self.settings.session_timeout_ms,
                    heartbeat_interval_ms=max(1000, self.settings.session_timeout_ms // 4),
                    client_id=self.worker.name, **self.settings.client_options())
                consumer.subscribe(self.topics, listener=_Rebalance(self))
                return consumer
            except KafkaError as error:
                self.status.failed(error)
                logger.warning("Kafka unreachable (%s); retrying in %.0f s", type(error).__name__, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
        return None

    def _close(self, consumer: KafkaConsumer) -> None:
        try:
            consumer.close()  # leaves the group now, so its partitions move without a session timeout
        except Exception as error:
            logger.warning("closing the consumer failed (%s)", type(error).__name__)
        self.status.partitions = 0
        logger.info("left the consumer group %s", self.group_id)

    def _consume(self, consumer: KafkaConsumer) -> None:
        while not self._stop.is_set():
            records = consumer.poll(timeout_ms=500, max_records=1) if self.entrance else self._poll_by_priority(consumer)
            self.status.polled(len(consumer.assignment()))
            for partition, messages in records.items():
                for message in messages:
                    self._count_pick(partition)
                    self._process(consumer, partition, message)

    # ---- priorities ---------------------------------------------------------------------------
    def _poll_by_priority(self, consumer: KafkaConsumer) -> dict:
        """One record, interactive first: the poll returns what is buffered for both topics (a window
        of records), the first interactive one is taken, and every partition is sought back to its first
        record not taken, so nothing is skipped and no offset moves (at least once is untouched; the rest
        is fetched again). After bulk_every - 1 interactive takes in a row a bulk record goes first, so
        bulk work is slowed by a busy UI, never starved. (Pausing the bulk topic instead loses records
        in kafka-python 3.0.12: partitions parked while paused are never fetched again.)"""
        records = consumer.poll(timeout_ms=500, max_records=PRIORITY_WINDOW)
        if not records:
            return {}
        interactive = [(tp, batch) for tp, batch in records.items() if tp.topic != self.topics[1]]
        bulk = [(tp, batch) for tp, batch in records.items() if tp.topic == self.topics[1]]
        bulk_turn = self.bulk_every > 0 and self._interactive_streak >= self.bulk_every - 1
        chosen, batch = next(iter(bulk or interactive)) if bulk_turn else next(iter(interactive or bulk))
        for partition, messages in records.items():
            untaken = messages[1:] if partition == chosen else messages
            if untaken:
                consumer.seek(partition, untaken[0].offset)
        return {chosen: batch[:1]}

    def _count_pick(self, partition: TopicPartition) -> None:
        lane = "bulk" if not self.entrance and partition.topic == self.topics[-1] else "interactive"
        self._interactive_streak = 0 if lane == "bulk" else self._interactive_streak + 1
        if self.metrics and not self.entrance:
            self.metrics.priority_picks.labels(lane).inc()

    # ---- one message ------------------------------------------------------------------------
    def _process(self, consumer: KafkaConsumer, partition: TopicPartition, message) -> None:
        outcome: dict[str, bool] = {}
        done = threading.Event()
        origin = Origin(message.topic, message.partition, message.offset)
        thread = threading.Thread(target=self._handle_then_set, args=(message, origin, done, outcome),
                                  name="generate", daemon=True)
        self.busy = True
        thread.start()
        try:
            self._wait_polling(consumer, done)
        finally:
            self.busy = False
        if outcome.get("handed_back"):
            return  # uncommitted: after this member leaves, another one gets the message again
        self._commit(consumer, partition, message.offset + 1)

    def _wait_polling(self, consumer: KafkaConsumer, done: threading.Event) -> None:
        """Short jobs (cache hits, GPU renders) finish within the grace period without pausing: pausing
        drops the records already fetched, and each message would then cost a fetch round trip. Longer
        ones pause and keep polling, so max_poll_interval_ms never expires mid-job."""
        if done.wait(PAUSE_AFTER_SECONDS):
            return
        consumer.pause(*consumer.assignment())
        while not done.wait(0.1):
            try:
                self._poll_paused(consumer)
            except Exception as error:  # the broker went away mid-job: the job goes on regardless
                self.status.failed(error)
                done.wait(0.5)
        consumer.resume(*consumer.assignment())

    def _poll_paused(self, consumer: KafkaConsumer) -> None:
        """Keeps group membership alive. A rebalance may hand back partitions unpaused: anything they
        return is put back (seek) untouched, and everything is paused again."""
        records = consumer.poll(timeout_ms=50)
        self.status.polled(len(consumer.assignment()))
        for partition, messages in records.items():
            consumer.seek(partition, messages[0].offset)
        if records or consumer.assignment() - consumer.paused():
            consumer.pause(*consumer.assignment())

    def _commit(self, consumer: KafkaConsumer, partition: TopicPartition, offset: int) -> None:
        delay = 0.5
        while True:
            if partition in self.revoked and partition not in consumer.assignment():
                logger.info("partition %s moved during the job: its new owner finds the job finished", partition)
                return
            try:
                consumer.commit({partition: OffsetAndMetadata(offset, "", -1)}, timeout_ms=5000)
                return
            except CommitFailedError:
                logger.warning("offset %d of %s not committed: the group moved it to another member", offset - 1,
                               partition)
                return
            except KafkaError as error:  # broker away, rejoin in progress: the outcome is durable, retry
                self.status.failed(error)
                if self._abandon.is_set():
                    return
                logger.warning("commit of offset %d failed (%s); retrying in %.1f s", offset - 1,
                               type(error).__name__, delay)
                self._keep_polling(consumer, delay)  # a rejoin completes only inside poll(), so never sleep
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    def _keep_polling(self, consumer: KafkaConsumer, seconds: float) -> None:
        """Poll with every partition paused for `seconds`: group membership (and a rejoin) goes on,
        no new record is taken."""
        deadline = time.monotonic() + seconds
        consumer.pause(*consumer.assignment())
        while time.monotonic() < deadline and not self._abandon.is_set():
            try:
                self._poll_paused(consumer)
            except Exception as error:
                self.status.failed(error)
                time.sleep(0.2)
        consumer.resume(*consumer.assignment())

    def _handle_then_set(self, message, origin: Origin, done: threading.Event, outcome: dict[str, bool]) -> None:
        try:
            self.handle_message(message.value, message.key, origin)
        except (Interrupted, NotDurable) as error:
            logger.warning("offset %d handed back uncommitted: %s", message.offset, error)
            outcome["handed_back"] = True
        except Exception as error:  # a bug must not lose the message: it goes to the dead-letter topic
            logger.exception("unexpected error handling offset %d", message.offset)
            try:
                self._dead_letter(message.value, message.key, f"internal error ({type(error).__name__})",
                                  origin=origin)
            except NotDurable:
                outcome["handed_back"] = True
        finally:
            done.set()

    def handle_message(self, raw: bytes | None, key: bytes | None = None, origin: Origin = Origin()) -> None:
        try:
            envelope = decode_request(raw)
        except MalformedMessage as error:
            logger.warning("malformed message sent to the dead-letter topic: %s", error)
            self._dead_letter(raw, key, str(error), origin=origin)
            return
        request = envelope.request
        if self.entrance and envelope.route == "auto" and self._sent_remote(request, raw, key, origin):
            return
        if self.entrance or request.preset != self.preset:  # to the workers that serve its preset
            target = self.settings.topic_for(request)
            self._durably(lambda: self.sender.send_raw(raw, key, target), f"forwarding to {target}")
            logger.info("request %s forwarded to %s", request.request_id, target)
            return
        job = self._job_for(request)
        if not _same_request(job, request):
            self._refuse_conflict(request, raw, key, origin)
            return
        if envelope.replayed and job.state == FAILED:  # an operator replayed it after fixing the cause
            job = self.jobs.update(request.request_id, state=QUEUED, attempts=0, error=None, finished_at=None)
        if job.state == DONE:
            self._publish_result(job)  # a redelivery: the client may have missed the first one
        elif job.state == CANCELLED or job.cancel_requested:
            self._finish_cancelled(job)
        elif job.state == FAILED:
            self._publish_result(job)
        else:
            self._attempt(request, job, raw, key, origin)

    def _sent_remote(self, request: GenerationRequest, raw, key, origin: Origin) -> bool:
        """True when the router sent the request to the GPU service (its job says so; the result is
        published like any other). A redelivered request whose job is already under way goes to its
        preset's topic as usual: whoever holds it finishes it, or the fleet does."""
        if self.router is None or request.preset != self.preset:
            return False
        fresh = self.jobs.get(request.request_id) is None
        job = self._job_for(request)
        if not _same_request(job, request):
            self._refuse_conflict(request, raw, key, origin)
            return True
        if not fresh or job.finished:
            return False
        decision = self.router.decide(request)
        self.jobs.update(request.request_id, backend=decision.backend, route=decision.reason)
        if not decision.remote:
            return False
        self.remote.put(request)
        return True

    def publish_outcome(self, job: Job) -> None:
        """The result message of a topic request that the GPU service finished."""
        self._publish_result(job)

    def _job_for(self, request: GenerationRequest) -> Job:
        fp = fingerprint(request, self.worker.identity)
        # Producers outside the app (the game backend) create no job: make it here.
        return self.jobs.create(Job(request_id=request.request_id, fingerprint=fp, total_steps=request.steps,
                                    request=request.to_dict(), owner="kafka"))

    def _refuse_conflict(self, request: GenerationRequest, raw, key, origin: Origin) -> None:
        reason = (f"request_id {request.request_id!r} already names a different request; an id is an "
                  "idempotency key for one request: send this one under a new id")
        logger.warning("%s", reason)
        self._dead_letter(raw, key, reason, request_id=request.request_id, origin=origin)
        self._send_result(request.request_id, FAILED, None, reason)

    def _attempt(self, request: GenerationRequest, job: Job, raw, key, origin: Origin) -> None:
        """Attempts count generations that started and did not finish: a redelivery after a rebalance,
        while another worker still runs the job, waits for that worker's result and counts none."""
        if job.attempts >= self.settings.max_attempts:  # every earlier attempt died with its worker
            self._give_up(request, raw, key, origin, job.attempts, job.error or "the worker stopped during every attempt")
            return
        try:
            self.worker.handle(request, final_attempt=job.attempts + 1 >= self.settings.max_attempts)
        except RetryLater:
            target = self.settings.topic_for(request)
            self._durably(lambda: self.sender.send_raw(raw, key, target), "re-queueing after a failed attempt")
            return
        job = self.jobs.get(request.request_id) or job
        if job.state == FAILED:  # final: out of attempts, or an error that retrying cannot fix
            self._dead_letter(raw, key, job.error or "failed", job.attempts, request.request_id, origin)
            job = self.jobs.update(request.request_id, error=(
                f"{job.error} (attempt {job.attempts} of {self.settings.max_attempts}; the request is in the "
                f"dead-letter topic {self.settings.dlq_topic} for replay once the cause is fixed)"))
        self._publish_result(job)

    def _give_up(self, request: GenerationRequest, raw, key, origin: Origin, attempts: int, last_error: str) -> None:
        message = (f"failed after {attempts} attempts: {last_error}. The request is in the dead-letter "
                   f"topic {self.settings.dlq_topic}; fix the cause and replay it, or send it again.")
        self._dead_letter(raw, key, last_error, attempts, request.request_id, origin)
        job = self.jobs.update(request.request_id, state=FAILED, error=message, finished_at=time.time())
        self._publish_result(job)

    def _finish_cancelled(self, job: Job) -> None:
        if not job.finished:
            job = self.jobs.update(job.request_id, state=CANCELLED, error="cancelled by request",
                                   finished_at=time.time())
        self._publish_result(job)

    # ---- durable outcomes ---------------------------------------------------------------------
    def _publish_result(self, job: Job) -> None:
        self._send_result(job.request_id, job.state, job.result, job.error)

    def _send_result(self, request_id: str, state: str, result: dict | None, error: str | None) -> None:
        value = encode_result(request_id, state, result, error)
        self._durably(lambda: self.producer.send(self.settings.results_topic, request_id.encode(), value),
                      "publishing the result")

    def _dead_letter(self, raw, key, reason: str, attempts: int = 0, request_id: str | None = None,
                     origin: Origin = Origin()) -> None:
        value = encode_dead_letter(raw, reason, self.worker.name, attempts, request_id, origin)
        self._durably(lambda: self.producer.send(self.settings.dlq_topic, key, value), "writing the dead letter")
        if self.metrics:
            self.metrics.dead_letters.labels("malformed" if not request_id else "failed").inc()

    def _durably(self, action: Callable[[], None], what: str) -> None:
        """Retry action until it succeeds; past the shutdown grace period, raise NotDurable instead."""
        delay = 0.5
        while True:
            try:
                action()
                return
            except (QueueUnavailable, KafkaError) as error:
                self.status.failed(error)
                if self._abandon.is_set():
                    raise NotDurable(f"{what} failed during shutdown ({error})") from error
                logger.warning("%s failed (%s); retrying in %.1f s", what, error, delay)
                self._abandon.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)


def _same_request(job: Job, request: GenerationRequest) -> bool:
    """The stored job is for these pixels (whatever model the producer's side computed its fingerprint for)."""
    try:
        stored = GenerationRequest.from_dict(job.request)
    except Exception:
        return False
    return routing_key(stored) == routing_key(request)
