"""Abuse limits: requests per user per hour, shared by the fleet through Redis (in memory alone)."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from cachetools import TTLCache
from dataclasses import dataclass
from typing import Protocol

import redis


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_seconds: float = 0.0


class RateLimiter(Protocol):
    def hit(self, user: str) -> Verdict: ...


MAX_TRACKED_USERS = 100_000  # memory per identity is bounded: the least recently seen are forgotten


class MemoryRateLimiter:
    """Sliding window: at most `limit` requests in any `window_seconds` (0: no limit)."""

    def __init__(self, limit: int, window_seconds: float = 3600.0) -> None:
        self.limit, self.window_seconds = limit, window_seconds
        self._hits: TTLCache = TTLCache(maxsize=MAX_TRACKED_USERS, ttl=window_seconds)
        self._lock = threading.Lock()

    def hit(self, user: str) -> Verdict:
        if self.limit <= 0:
            return Verdict(True)
        now = time.time()
        with self._lock:
            hits = self._hits.get(user) or deque()
            self._hits[user] = hits  # re-set: refreshes the entry's TTL
            while hits and hits[0] <= now - self.window_seconds:
                hits.popleft()
            if len(hits) >= self.limit:
                return Verdict(False, hits[0] + self.window_seconds - now)
            hits.append(now)
            return Verdict(True)


class RedisRateLimiter:
    """The same sliding window in a sorted set per user, so every Space counts the same hits. One Lua
    script checks and records atomically: two Spaces admitting at once cannot both take the last slot."""

    _HIT = """
    local key, now, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
    redis.call('ZREMRANGEBYSCORE', key, 0, now - window)
    if redis.call('ZCARD', key) >= limit then
        local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
        return {0, oldest[2]}
    end
    redis.call('ZADD', key, now, ARGV[4])
    redis.call('EXPIRE', key, math.ceil(window))
    return {1, '0'}
    """

    def __init__(self, client: redis.Redis, namespace: str, limit: int, window_seconds: float = 3600.0) -> None:
        self.client, self.namespace = client, namespace
        self.limit, self.window_seconds = limit, window_seconds
        self._hit = client.register_script(self._HIT)

    def hit(self, user: str) -> Verdict:
        if self.limit <= 0:
            return Verdict(True)
        now = time.time()
        allowed, oldest = self._hit(keys=[f"{self.namespace}:rate:{user}"],
                                    args=[now, self.window_seconds, self.limit, f"{now}:{uuid.uuid4().hex[:8]}"])
        if allowed:
            return Verdict(True)
        return Verdict(False, float(oldest) + self.window_seconds - now)


class InflightLimit(Protocol):
    def acquire(self, user: str, request_id: str, finished: Callable[[str], bool]) -> int | None:
        """None when request_id may start (or already holds a slot); else how many the user has in flight."""
        ...

    def release(self, user: str, request_id: str) -> None: ...


class MemoryInflightLimit:
    """At most `cap` requests in flight per user (0: no cap), in this process. Check and add happen under
    one lock; slots of finished jobs are given back as they are found, and every slot expires after
    `hold_seconds` (a job nobody finishes cannot block its user forever)."""

    def __init__(self, cap: int, hold_seconds: float) -> None:
        self.cap, self.hold_seconds = cap, hold_seconds
        self._held: TTLCache = TTLCache(maxsize=MAX_TRACKED_USERS, ttl=hold_seconds)
        self._lock = threading.Lock()

    def acquire(self, user: str, request_id: str, finished: Callable[[str], bool]) -> int | None:
        if self.cap <= 0:
            return None
        now = time.time()
        with self._lock:
            held = {rid: until for rid, until in (self._held.get(user) or {}).items()
                    if until > now and not finished(rid)}
            if request_id not in held and len(held) >= self.cap:
                self._held[user] = held
                return len(held)
            held[request_id] = now + self.hold_seconds
            self._held[user] = held
            return None

    def release(self, user: str, request_id: str) -> None:
        with self._lock:
            held = self._held.get(user)
            if held:
                held.pop(request_id, None)


class RedisInflightLimit:
    """The same cap for the whole fleet: a sorted set per user (request id -> expiry). One Lua script
    checks and adds, so concurrent admissions on several Spaces cannot overshoot the cap."""

    _ACQUIRE = """
    local key, now, expiry, cap, id = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if not redis.call('ZSCORE', key, id) then
        local held = redis.call('ZCARD', key)
        if held >= cap then return held end
    end
    redis.call('ZADD', key, expiry, id)
    redis.call('EXPIRE', key, math.ceil(expiry - now) + 60)
    return -1
    """

    def __init__(self, client: redis.Redis, namespace: str, cap: int, hold_seconds: float) -> None:
        self.client, self.namespace, self.cap, self.hold_seconds = client, namespace, cap, hold_seconds
        self._acquire = client.register_script(self._ACQUIRE)

    def _key(self, user: str) -> str:
        return f"{self.namespace}:inflight-user:{user}"

    def acquire(self, user: str, request_id: str, finished: Callable[[str], bool]) -> int | None:
        if self.cap <= 0:
            return None
        key = self._key(user)
        done = [rid for rid in (r.decode() for r in self.client.zrange(key, 0, -1)) if rid != request_id and finished(rid)]
        if done:  # only finished ones are removed: racing with another admission is harmless
            self.client.zrem(key, *done)
        now = time.time()
        held = self._acquire(keys=[key], args=[now, now + self.hold_seconds, self.cap, request_id])
        return None if held < 0 else int(held)

    def release(self, user: str, request_id: str) -> None:
        self.client.zrem(self._key(user), request_id)


def describe_retry(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return f"in {minutes} minute{'s' if minutes != 1 else ''}"
