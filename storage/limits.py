"""Abuse limits: requests per user per hour, shared by the fleet through Redis (in memory alone)."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Protocol

import redis


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_seconds: float = 0.0


class RateLimiter(Protocol):
    def hit(self, user: str) -> Verdict: ...


class MemoryRateLimiter:
    """Sliding window: at most `limit` requests in any `window_seconds`."""

    def __init__(self, limit: int, window_seconds: float = 3600.0) -> None:
        self.limit, self.window_seconds = limit, window_seconds
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def hit(self, user: str) -> Verdict:
        now = time.time()
        with self._lock:
            hits = self._hits[user]
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
        now = time.time()
        allowed, oldest = self._hit(keys=[f"{self.namespace}:rate:{user}"],
                                    args=[now, self.window_seconds, self.limit, f"{now}:{uuid.uuid4().hex[:8]}"])
        if allowed:
            return Verdict(True)
        return Verdict(False, float(oldest) + self.window_seconds - now)


def describe_retry(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return f"in {minutes} minute{'s' if minutes != 1 else ''}"
