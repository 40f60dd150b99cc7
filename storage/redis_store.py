"""Redis twins of the in-memory cache and job store, shared by every Space in the fleet.

Values are small JSON documents (URLs and metadata, never image bytes: free tiers hold ~30 MB).
Every job change is published on the job's channel so a UI on one Space follows a job run by another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import redis

from storage.jobs import Job
from storage.keys import inflight_key, job_channel, job_key, result_key, worker_key

logger = logging.getLogger(__name__)


class RedisResultCache:
    def __init__(self, client: redis.Redis, namespace: str, ttl_seconds: int) -> None:
        self.client, self.namespace, self.ttl_seconds = client, namespace, ttl_seconds

    def get(self, fingerprint: str) -> dict[str, Any] | None:
        raw = self.client.get(result_key(self.namespace, fingerprint))
        return json.loads(raw) if raw else None

    def put(self, fingerprint: str, result: dict[str, Any]) -> None:
        self.client.set(result_key(self.namespace, fingerprint), json.dumps(result), ex=self.ttl_seconds)


class RedisJobStore:
    def __init__(self, client: redis.Redis, namespace: str, ttl_seconds: int) -> None:
        self.client, self.namespace, self.ttl_seconds = client, namespace, ttl_seconds

    def _key(self, request_id: str) -> str:
        return job_key(self.namespace, request_id)

    def create(self, job: Job) -> Job:
        """Store job unless its request id exists (SET NX); return whichever is stored."""
        if self.client.set(self._key(job.request_id), json.dumps(job.to_dict()), ex=self.ttl_seconds, nx=True):
            self._publish(job)
            return job
        return self.get(job.request_id) or job

    def get(self, request_id: str) -> Job | None:
        raw = self.client.get(self._key(request_id))
        return Job.from_dict(json.loads(raw)) if raw else None

    def update(self, request_id: str, **changes: Any) -> Job:
        """Read-modify-write under WATCH, so a cancel from one Space and a step from another both land."""
        key = self._key(request_id)

        def apply(pipe: redis.client.Pipeline) -> Job:
            raw = pipe.get(key)
            if raw is None:
                raise KeyError(request_id)
            job = Job.from_dict(json.loads(raw))
            job = dataclasses.replace(job, **changes, version=job.version + 1)
            pipe.multi()
            pipe.set(key, json.dumps(job.to_dict()), ex=self.ttl_seconds)
            return job

        job = self.client.transaction(apply, key, value_from_callable=True)
        self._publish(job)
        return job

    def _publish(self, job: Job) -> None:
        self.client.publish(job_channel(self.namespace, job.request_id), job.version)

    def wait(self, request_id: str, after_version: int, timeout: float) -> Job | None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(job_channel(self.namespace, request_id))
            deadline = time.monotonic() + timeout
            while True:
                # Read after subscribing: a change made in between is seen here, not lost.
                job = self.get(request_id)
                remaining = deadline - time.monotonic()
                if job is None or job.version > after_version or remaining <= 0:
                    return job
                pubsub.get_message(timeout=min(remaining, 1.0))
        finally:
            pubsub.close()


class RedisFleet:
    """Worker heartbeats: which workers are alive, what they serve, how busy they are."""

    def __init__(self, client: redis.Redis, namespace: str, ttl_seconds: int = 30) -> None:
        self.client, self.namespace, self.ttl_seconds = client, namespace, ttl_seconds

    def beat(self, worker: str, info: dict[str, Any]) -> None:
        self.client.set(worker_key(self.namespace, worker), json.dumps({**info, "worker": worker,
                                                                        "seen_at": time.time()}),
                        ex=self.ttl_seconds)

    def workers(self) -> list[dict[str, Any]]:
        keys = list(self.client.scan_iter(match=worker_key(self.namespace, "*"), count=100))
        values = self.client.mget(keys) if keys else []
        return sorted((json.loads(v) for v in values if v), key=lambda w: w["worker"])


class RedisClaims:
    """Which request is generating a fingerprint right now, fleet-wide. Requests are spread evenly
    over partitions, so identical ones can reach two workers at once: the second waits for the first
    one's result instead of spending minutes of CPU on the same image. A claim expires if its holder
    dies (it is renewed at every step), and the same request id may always take its own claim over
    (a redelivery after its worker died)."""

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, client: redis.Redis, namespace: str, ttl_seconds: int = 120) -> None:
        self.client, self.namespace, self.ttl_seconds = client, namespace, ttl_seconds
        self._release = client.register_script(self._RELEASE)

    def claim(self, fingerprint: str, holder: str) -> str | None:
        """None when holder has the claim now; else the request id holding it."""
        key = inflight_key(self.namespace, fingerprint)
        for _ in range(3):  # the other holder may release between our SET and GET
            if self.client.set(key, holder, nx=True, ex=self.ttl_seconds):
                return None
            current = self.client.get(key)
            if current is not None:
                current = current.decode()
                if current == holder:
                    self.client.expire(key, self.ttl_seconds)
                    return None
                return current
        return None

    def renew(self, fingerprint: str, holder: str) -> None:
        key = inflight_key(self.namespace, fingerprint)
        if (self.client.get(key) or b"").decode() == holder:
            self.client.expire(key, self.ttl_seconds)

    def release(self, fingerprint: str, holder: str) -> None:
        self._release(keys=[inflight_key(self.namespace, fingerprint)], args=[holder])
