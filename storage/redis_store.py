"""Redis twins of the in-memory cache and job store, shared by every Space in the fleet.

Values are small JSON documents (URLs and metadata, never image bytes: free tiers hold ~30 MB).
Every job change is published on the job's channel so a UI on one Space follows a job run by another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.cluster import ClusterNode

from storage.jobs import ChangeListeners, Job
from storage.keys import inflight_key, job_channel, job_key, result_key, worker_key

logger = logging.getLogger(__name__)


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def redis_client(url: str, cluster: bool = False) -> redis.Redis | redis.RedisCluster:
    """A single Redis, or a Redis Cluster (cluster=True or a redis+cluster:// URL). A cluster URL may
    name several nodes, `redis+cluster://[user:password@]host1:port1,host2:port2/0`: the client needs one
    live node to discover the others, so naming more than one survives the loss of the first. Every store
    works on both: each Lua script and WATCH transaction touches one key, and keys read together share a
    hash tag (storage.keys). Short timeouts: a Redis that hangs must cost seconds, not tens of them (the
    circuit breaker in storage.resilient then skips it for a while)."""
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.retry import Retry

    options: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2}
    if cluster or url.startswith(CLUSTER_SCHEMES):
        first_node_url, other_nodes = split_cluster_url(url.replace("+cluster://", "://", 1))
        # A failover moves slots: retries with backoff let the client find the promoted replica.
        return redis.RedisCluster.from_url(first_node_url, startup_nodes=other_nodes,
                                           retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), 6), **options)
    return redis.Redis.from_url(url, health_check_interval=30, retry=Retry(NoBackoff(), 1), **options)


def split_cluster_url(url: str) -> tuple[str, list[ClusterNode]]:
    """`redis://[credentials@]h1:p1,h2:p2/0` -> (`redis://[credentials@]h1:p1/0`, [ClusterNode(h2, p2)]):
    redis-py parses one host per URL; the credentials and options of the URL apply to every node."""
    scheme, _, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    first, *others = [host.strip() for host in hosts.split(",") if host.strip()] or [""]
    nodes = []
    for host in others:
        parsed = urlsplit(f"//{host}")
        if not parsed.hostname:
            raise ValueError(f"REDIS_URL: {host!r} is not a host[:port] of the cluster")
        nodes.append(ClusterNode(parsed.hostname, parsed.port or 6379))
    return f"{scheme}://{credentials}{at}{first}{slash}{tail}", nodes


class RedisResultCache:
    def __init__(self, client: redis.Redis, namespace: str, ttl_seconds: int) -> None:
        self.client, self.namespace, self.ttl_seconds = client, namespace, ttl_seconds

    def get(self, fingerprint: str) -> dict[str, Any] | None:
        raw = self.client.get(result_key(self.namespace, fingerprint))
        return json.loads(raw) if raw else None

    def put(self, fingerprint: str, result: dict[str, Any]) -> None:
        self.client.set(result_key(self.namespace, fingerprint), json.dumps(result), ex=self.ttl_seconds)


class JobEvents:
    """One pub/sub connection per process for every waiter: a thread reads the job channels and wakes
    the waiters of the job that changed (a connection per wait would not survive 40 waiting users)."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client, self.pattern = client, job_channel(namespace, "*")
        self._prefix = job_channel(namespace, "")
        self._waiters: dict[str, list[threading.Event]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.listeners = ChangeListeners()  # told the request id of every change in the fleet

    def add_listener(self, callback: Callable[[str], None]) -> None:
        self.listeners.add(callback)
        self._listen()

    def _listen(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="job-events", daemon=True)
                self._thread.start()

    def wait(self, channel: str, seconds: float, changed: Callable[[], bool]) -> None:
        """Wait up to seconds for a message on channel, unless changed() already holds once registered."""
        event = threading.Event()
        self._listen()
        with self._lock:
            self._waiters.setdefault(channel, []).append(event)
        try:
            if not changed():  # read after registering: a change in between is seen, not lost
                event.wait(seconds)
        finally:
            with self._lock:
                waiters = self._waiters.get(channel, [])
                if event in waiters:
                    waiters.remove(event)
                if not waiters:
                    self._waiters.pop(channel, None)

    def _run(self) -> None:
        while True:
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(self.pattern)
                for message in pubsub.listen():
                    self._wake(message.get("channel"))
            except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as error:  # away: waiters poll
                logger.debug("job events: %s; resubscribing", type(error).__name__)
                time.sleep(1.0)

    def _wake(self, channel: bytes | str | None) -> None:
        if isinstance(channel, bytes):
            channel = channel.decode()
        with self._lock:
            for event in self._waiters.get(channel or "", []):
                event.set()
        if channel and channel.startswith(self._prefix):
            self.listeners.notify(channel[len(self._prefix):])


class RedisJobStore:
    def __init__(self, client: redis.Redis, namespace: str, ttl_seconds: int) -> None:
        self.client, self.namespace, self.ttl_seconds = client, namespace, ttl_seconds
        self.events = JobEvents(client, namespace)

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """callback(request_id) at every job change of the fleet (pub/sub, from its reader thread)."""
        self.events.add_listener(callback)

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

    def put_if_newer(self, job: Job) -> Job:
        """Write back a state kept locally during an outage. The newer state wins: a finished job over
        an unfinished one, else the higher version; the stored version then moves past both."""
        key = self._key(job.request_id)

        def apply(pipe: redis.client.Pipeline) -> Job:
            raw = pipe.get(key)
            current = Job.from_dict(json.loads(raw)) if raw else None
            if current is not None and not _newer(job, current):
                return current
            merged = dataclasses.replace(job, version=max(job.version, current.version if current else 0) + 1)
            pipe.multi()
            pipe.set(key, json.dumps(merged.to_dict()), ex=self.ttl_seconds)
            return merged

        stored = self.client.transaction(apply, key, value_from_callable=True)
        self._publish(stored)
        return stored

    def _publish(self, job: Job) -> None:
        self.client.publish(job_channel(self.namespace, job.request_id), job.version)

    def wait(self, request_id: str, after_version: int, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        channel = job_channel(self.namespace, request_id)
        while True:
            job = self.get(request_id)
            remaining = deadline - time.monotonic()
            if job is None or job.version > after_version or remaining <= 0:
                return job
            self.events.wait(channel, min(remaining, 1.0), lambda: self._changed(request_id, after_version))

    def _changed(self, request_id: str, after_version: int) -> bool:
        job = self.get(request_id)
        return job is None or job.version > after_version


def _newer(candidate: Job, current: Job) -> bool:
    if candidate.finished != current.finished:
        return candidate.finished
    return candidate.version > current.version


class RedisFleet:
    """Worker heartbeats: which workers are alive, what they serve, how busy they are. A sorted set of
    names by last beat plus a hash of descriptions: reading the fleet costs two commands, whatever
    else the database holds (no SCAN of the keyspace), and dead workers are pruned as others beat."""

    def __init__(self, client: redis.Redis, namespace: str, ttl_seconds: float = 30.0) -> None:
        self.client, self.namespace, self.ttl_seconds = client, namespace, ttl_seconds
        self._seen, self._info = worker_key(namespace, "seen"), worker_key(namespace, "info")

    def beat(self, worker: str, info: dict[str, Any]) -> None:
        now = time.time()
        dead = self.client.zrangebyscore(self._seen, "-inf", now - self.ttl_seconds)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self._info, worker, json.dumps({**info, "worker": worker, "seen_at": now}))
        pipe.zadd(self._seen, {worker: now})
        if dead:
            pipe.zrem(self._seen, *dead)
            pipe.hdel(self._info, *dead)
        for key in (self._seen, self._info):
            pipe.expire(key, 24 * 3600)
        pipe.execute()

    def forget(self, worker: str) -> None:
        """A worker leaving cleanly disappears at once instead of after its heartbeat TTL."""
        self.client.zrem(self._seen, worker)
        self.client.hdel(self._info, worker)

    def workers(self) -> list[dict[str, Any]]:
        names = self.client.zrangebyscore(self._seen, time.time() - self.ttl_seconds, "+inf")
        values = self.client.hmget(self._info, names) if names else []
        return sorted((json.loads(v) for v in values if v), key=lambda w: w["worker"])


class RedisClaims:
    """Which worker is generating a fingerprint right now, fleet-wide. Requests are spread evenly over
    partitions, so identical ones can reach two workers at once, and a rebalance can hand a running
    request to a second worker: the second waits for the first one's result instead of running it
    again. The holder is a token "<request id>@<worker>": only that worker renews or releases it, and a
    dead holder's claim expires within ttl_seconds (the holder renews it in the background)."""

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
    _RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) "
              "end return 0")

    def __init__(self, client: redis.Redis, namespace: str, ttl_seconds: int = 30) -> None:
        self.client, self.namespace, self.ttl_seconds = client, namespace, ttl_seconds
        self._release = client.register_script(self._RELEASE)
        self._renew = client.register_script(self._RENEW)

    def claim(self, fingerprint: str, holder: str) -> str | None:
        """None when holder has the claim now; else the token holding it."""
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
        self._renew(keys=[inflight_key(self.namespace, fingerprint)], args=[holder, self.ttl_seconds])

    def release(self, fingerprint: str, holder: str) -> None:
        self._release(keys=[inflight_key(self.namespace, fingerprint)], args=[holder])


class RemoteLeases:
    """Requests a Space has sent to the GPU service, each with a lease that Space renews while it
    follows the prediction. A lease that runs out means that Space died (kill -9) with the request in
    hand: any other fleet member takes it over (ZREM decides who) and hands it to the fleet queue."""

    def __init__(self, client: redis.Redis, namespace: str, ttl_seconds: float = 30.0) -> None:
        self.client, self.ttl_seconds = client, ttl_seconds
        self._key = f"{namespace}:remote:leases"

    def hold(self, *request_ids: str) -> None:
        if request_ids:
            until = time.time() + self.ttl_seconds
            self.client.zadd(self._key, {request_id: until for request_id in request_ids})

    def release(self, request_id: str) -> None:
        self.client.zrem(self._key, request_id)

    def expired(self, limit: int = 20) -> list[str]:
        return [name.decode() if isinstance(name, bytes) else name
                for name in self.client.zrangebyscore(self._key, "-inf", time.time(), start=0, num=limit)]

    def take(self, request_id: str) -> bool:
        """True for the one caller that removed the expired lease: it owns the hand-over."""
        return bool(self.client.zrem(self._key, request_id))
