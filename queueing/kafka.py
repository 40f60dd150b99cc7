"""Kafka: the fleet's shared request topic, its results topic and its dead-letter topic.

Topics: `<prefix>.requests` (the entrance for any producer), `<prefix>.requests.<preset>` (what the
workers of one preset read), `<prefix>.requests.<preset>.bulk` (the same for requests marked bulk,
read after the interactive topic: queueing.consumer), `<prefix>.results` and `<prefix>.dlq`. The consumer side lives in
queueing.consumer.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from inference.errors import QueueUnavailable
from inference.request import GenerationRequest
from queueing.messages import encode_request
from storage.keys import routing_key

logger = logging.getLogger(__name__)


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
        """The entrance any producer may write: a worker forwards each request to its preset's topic."""
        return f"{self.topic_prefix}.requests"

    def preset_group(self, preset: str) -> str:
        """The consumer group of one preset's workers (one group per topic: every member subscribes alike)."""
        return f"{self.group_id}.{preset}"

    @property
    def entrance_group(self) -> str:
        """Every worker also reads the entrance topic in this group, forwarding each request to its preset."""
        return f"{self.group_id}.entrance"

    def preset_topic(self, preset: str) -> str:
        """Requests for one preset, read only by workers that serve it: a request nobody serves yet waits
        here (and counts no attempts) until such a worker joins."""
        return f"{self.topic_prefix}.requests.{preset}"

    def bulk_topic(self, preset: str) -> str:
        """Bulk requests for one preset: the same workers and group read it, the interactive topic first."""
        return f"{self.preset_topic(preset)}.bulk"

    def topic_for(self, request: GenerationRequest) -> str:
        return self.bulk_topic(request.preset) if request.priority == "bulk" else self.preset_topic(request.preset)

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


def ensure_topics(settings: KafkaSettings, presets: tuple[str, ...] = (), topics: tuple[str, ...] = ()) -> None:
    """Create the topics when missing (enough partitions for many workers to share): the shared ones,
    both topics of each preset named, and the topics named."""
    admin = KafkaAdminClient(**settings.client_options())
    try:
        wanted = [settings.requests_topic, settings.results_topic, settings.dlq_topic, *topics]
        for preset in presets:
            wanted += [settings.preset_topic(preset), settings.bulk_topic(preset)]
        for topic in dict.fromkeys(wanted):
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
        self._ensured: set[str] = set()

    def _partition(self, topic: str) -> int:
        try:
            producer = self.producer.get()
            if topic not in self._ensured and topic != self.settings.requests_topic:
                ensure_topics(self.settings, topics=(topic,))  # a preset's topic is made by whoever first sends to it
                self._ensured.add(topic)
            partitions = sorted(producer.partitions_for(topic))
        except KafkaError as error:
            raise QueueUnavailable(f"Kafka is unreachable ({type(error).__name__})") from error
        with self._lock:
            return partitions[next(self._turn) % len(partitions)]

    def send(self, request: GenerationRequest, replayed: bool = False) -> None:
        """To the request's preset topic (or its bulk topic), where only workers serving that preset read it."""
        self.send_raw(encode_request(request, replayed=replayed), routing_key(request).encode(),
                      self.settings.topic_for(request))

    def send_raw(self, value: bytes, key: bytes | None, topic: str) -> None:
        self.producer.send(topic, key, value, partition=self._partition(topic))


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


