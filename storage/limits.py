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
    """The same sliding window in a sorted set per user, so every Space counts the same hits."""

    def __init__(self, client: redis.Redis, namespace: str, limit: int, window_seconds: float = 3600.0) -> None:
        self.client, self.namespace = client, namespace
        self.limit, self.window_seconds = limit, window_seconds

    def hit(self, user: str) -> Verdict:
        key = f"{self.namespace}:rate:{user}"
        now = time.time()
        pipe = self.client.pipeline()
        pipe.zremrangebyscore(key, 0, now - self.window_seconds)
        pipe.zcard(key)
        pipe.zrange(key, 0, 0, withscores=True)
        _, count, oldest = pipe.execute()
        if count >= self.limit:
            return Verdict(False, oldest[0][1] + self.window_seconds - now if oldest else self.window_seconds)
        pipe = self.client.pipeline()
        pipe.zadd(key, {f"{now}:{uuid.uuid4().hex[:8]}": now})
        pipe.expire(key, math.ceil(self.window_seconds))
        pipe.execute()
        return Verdict(True)


def describe_retry(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return f"in {minutes} minute{'s' if minutes != 1 else ''}"
