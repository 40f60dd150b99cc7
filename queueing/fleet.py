"""What the fleet looks like from any one Space: live workers (heartbeats) and the backlog (lag)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from queueing.kafka import KafkaSettings
from storage.redis_store import RedisFleet

logger = logging.getLogger(__name__)


class Heartbeat:
    """Announces this worker in Redis every few seconds; the entry expires if the process dies."""

    def __init__(self, fleet: RedisFleet, name: str, describe: Callable[[], dict[str, Any]],
                 interval: float = 5.0) -> None:
        self.fleet, self.name, self.describe, self.interval = fleet, name, describe, interval
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.fleet.forget(self.name)
        except Exception as error:  # Redis away: the entry expires by itself
            logger.warning("could not leave the fleet registry: %s", type(error).__name__)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.fleet.beat(self.name, self.describe())
            except Exception as error:  # Redis away: the fleet view degrades, the worker goes on
                logger.warning("heartbeat failed: %s", type(error).__name__)
            self._stop.wait(self.interval)


class FleetBacklog:
    """Consumer lag of the request topic (messages not yet committed by the group). Measured in the
    background every few seconds, so /healthz and /status never wait on Kafka."""

    def __init__(self, settings: KafkaSettings, fleet: RedisFleet | None, preset: str,
                 every_seconds: float = 3.0) -> None:
        self.settings, self.fleet, self.preset, self.every_seconds = settings, fleet, preset, every_seconds
        self._estimate: tuple[float, dict[str, Any]] | None = None
        self._lag = 0
        self._started = False
        self._lock = threading.Lock()
        self._admin: KafkaAdminClient | None = None
        self._consumer: KafkaConsumer | None = None

    def lag(self) -> int:
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="backlog", daemon=True).start()
            return self._lag

    def _run(self) -> None:
        while True:
            try:
                self._lag = self._measure()
            except Exception as error:  # Kafka away: keep the last figure, try again later
                logger.debug("could not measure the backlog: %s", type(error).__name__)
                self._close_clients()  # each client holds a network thread and sockets: never leak them
            time.sleep(self.every_seconds)

    def _close_clients(self) -> None:
        for client in (self._admin, self._consumer):
            try:
                if client is not None:
                    client.close()
            except Exception as error:
                logger.debug("closing a backlog client failed: %s", type(error).__name__)
        self._admin = self._consumer = None

    def _measure(self) -> int:
        if self._admin is None:
            self._admin = KafkaAdminClient(**self.settings.client_options())
            self._consumer = KafkaConsumer(**self.settings.client_options())
        settings = self.settings
        return sum(self._group_lag(group, topic) for group, topic in (
            (settings.entrance_group, settings.requests_topic),
            (settings.preset_group(self.preset), settings.preset_topic(self.preset)),
            (settings.preset_group(self.preset), settings.bulk_topic(self.preset))))

    def _group_lag(self, group: str, topic: str) -> int:
        partitions = [TopicPartition(topic, p) for p in self._consumer.partitions_for_topic(topic) or ()]
        ends = self._consumer.end_offsets(partitions)
        committed = self._admin.list_group_offsets({group: None}).get(group, {})
        return sum(max(0, end - _offset(committed.get(tp))) for tp, end in ends.items())

    def estimate(self) -> dict[str, Any]:
        """Backlog, live workers of this preset and a rough wait; computed at most once a second, since
        every waiting user's progress asks for it."""
        cached = self._estimate
        if cached is not None and time.monotonic() - cached[0] < 1.0:
            return cached[1]
        estimate = self._compute_estimate()
        self._estimate = (time.monotonic(), estimate)
        return estimate

    def _compute_estimate(self) -> dict[str, Any]:
        try:
            workers = [w for w in (self.fleet.workers() if self.fleet else []) if w.get("preset") == self.preset]
        except Exception:  # Redis away
            workers = []
        seconds = [w.get("mean_seconds", 10.0) for w in workers] or [10.0]
        lag = self.lag()
        per_request = sum(seconds) / len(seconds)
        return {"backlog": lag, "workers": len(workers),
                "estimated_wait_s": round(lag * per_request / max(1, len(workers)), 1)}


def _offset(committed: Any) -> int:
    if committed is None:
        return 0
    return getattr(committed, "offset", committed) if not isinstance(committed, int) else committed
