"""A small client for the game backend: submit requests to Kafka and wait for their results.

    from queueing.client import BackendClient
    from inference.request import GenerationRequest

    with BackendClient("broker:9092") as client:
        result = client.generate(GenerationRequest.create("a crystal sword icon"), timeout=300)
        print(result["state"], result["result"]["url"])

It needs only Kafka (no Redis, no model): results come back on the results topic, keyed by request id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from inference.request import GenerationRequest
from queueing.kafka import KafkaSettings, LazyProducer, RequestSender, ensure_topics
from queueing.messages import decode_result, encode_request
from storage.keys import routing_key

logger = logging.getLogger(__name__)

TERMINAL = {"done", "failed", "cancelled"}


class BackendClient:
    def __init__(self, bootstrap_servers: str, topic_prefix: str = "image_generation", **kafka_options: Any):
        self.settings = KafkaSettings(bootstrap_servers=bootstrap_servers, topic_prefix=topic_prefix, **kafka_options)
        ensure_topics(self.settings)
        self._producer = LazyProducer(self.settings)
        self._sender = RequestSender(self.settings, self._producer)
        self._results = KafkaConsumer(enable_auto_commit=False, **self.settings.client_options())
        partitions = self._results.partitions_for_topic(self.settings.results_topic) or set()
        self._partitions = [TopicPartition(self.settings.results_topic, p) for p in sorted(partitions)]
        self._results.assign(self._partitions)
        self._results.seek_to_end(*self._partitions)
        for partition in self._partitions:  # resolve "end" now: results published from here on are seen
            self._results.position(partition)
        self._seen: dict[str, dict[str, Any]] = {}

    def submit(self, request: GenerationRequest, allow_remote: bool = False) -> str:
        """Queue the request (acknowledged by all in-sync replicas) and return its request id.
        allow_remote: let the fleet send it to its GPU service when the queue is deep (route "auto",
        through the entrance topic); otherwise it goes straight to its preset's topic."""
        if allow_remote:
            self._sender.send_raw(encode_request(request, route="auto"), routing_key(request).encode(),
                                  self.settings.requests_topic)
        else:
            self._sender.send(request)
        return request.request_id

    def wait(self, request_id: str, timeout: float) -> dict[str, Any]:
        return self.wait_all([request_id], timeout)[request_id]

    def wait_all(self, request_ids: Iterable[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Final result message of each request: {"request_id", "state", "result", "error"}."""
        wanted = set(request_ids)
        deadline = time.monotonic() + timeout
        while not wanted <= self._seen.keys():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(wanted - self._seen.keys())
                raise TimeoutError(f"no result within {timeout:.0f} s for {len(missing)} request(s): {missing[:5]}")
            for messages in self._results.poll(timeout_ms=int(min(remaining, 1.0) * 1000)).values():
                for message in messages:
                    self._remember(message.value)
        return {rid: self._seen[rid] for rid in wanted}

    def _remember(self, raw: bytes) -> None:
        try:
            result = decode_result(raw)
        except ValueError:
            return
        if result.get("state") in TERMINAL:
            self._seen.setdefault(result["request_id"], result)  # redeliveries repeat the same outcome

    def generate(self, request: GenerationRequest, timeout: float = 600) -> dict[str, Any]:
        return self.wait(self.submit(request), timeout)

    def attach(self, request_id: str, since: float, timeout: float) -> dict[str, Any]:
        """Re-attach after a dropped connection: read results published since the given Unix time."""
        offsets = self._results.offsets_for_times({p: int(since * 1000) for p in self._partitions})
        for partition, found in offsets.items():
            if found is not None:
                self._results.seek(partition, found.offset)
            else:
                self._results.seek_to_end(partition)
        return self.wait(request_id, timeout)

    def close(self) -> None:
        self._producer.close()
        self._results.close()

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
