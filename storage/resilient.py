"""Redis stores that step aside while Redis is down instead of failing requests.

Generation goes on without Redis: cache reads miss, cache writes are skipped, and job state is kept in
a local mirror (this Space answers for its own jobs). A circuit breaker makes a Redis that hangs cost
one timeout per few seconds instead of one per call. When Redis answers again, every job changed
meanwhile is written back (the newer state wins: see RedisJobStore.put_if_newer)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from storage.health import BackendHealth
from storage.jobs import Job, MemoryJobStore

logger = logging.getLogger(__name__)

NAME = "Redis"


class CircuitOpen(redis.ConnectionError):
    """Redis failed moments ago: calls fail at once until the breaker lets one through again."""


class RedisGuard:
    """Health bookkeeping plus a circuit breaker shared by every Redis wrapper of the process."""

    OPEN_SECONDS = 5.0

    def __init__(self, health: BackendHealth, open_seconds: float = OPEN_SECONDS) -> None:
        self.health, self.open_seconds = health, open_seconds
        self._open_until = 0.0

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() < self._open_until:
            raise CircuitOpen("Redis failed moments ago; not retrying yet")
        try:
            result = function(*args, **kwargs)
        except redis.RedisError as error:
            self._open_until = time.monotonic() + self.open_seconds
            self.health.down(NAME, error)
            raise
        except RedisClusterException as error:  # no node for a slot (mid-failover): Redis is away, too
            self._open_until = time.monotonic() + self.open_seconds
            self.health.down(NAME, error)
            raise redis.ConnectionError(f"Redis Cluster: {error}") from error
        self._open_until = 0.0
        self.health.up(NAME)
        return result

    def quietly(self, function: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        """function(*args), or default while Redis is down."""
        try:
            return self.call(function, *args)
        except redis.RedisError:
            return default


class ResilientCache:
    def __init__(self, primary: Any, guard: RedisGuard) -> None:
        self.primary, self.guard = primary, guard

    def get(self, fingerprint: str) -> dict[str, Any] | None:
        return self.guard.quietly(self.primary.get, fingerprint)

    def put(self, fingerprint: str, result: dict[str, Any]) -> None:
        self.guard.quietly(self.primary.put, fingerprint, result)


class ResilientJobStore:
    def __init__(self, primary: Any, guard: RedisGuard, sync_seconds: float = 1.0) -> None:
        self.primary, self.guard, self.sync_seconds = primary, guard, sync_seconds
        self.mirror = MemoryJobStore()  # every job this process touched, latest known state
        self._unsynced: dict[str, None] = {}  # jobs changed while Redis was away (ordered set)
        self._lock = threading.Lock()
        self._syncing = False

    def create(self, job: Job) -> Job:
        try:
            stored = self.guard.call(self.primary.create, job)
        except redis.RedisError:
            stored = self.mirror.create(job)
            self._remember_unsynced(job.request_id)
            return stored
        self.mirror.put(stored)
        return stored

    def get(self, request_id: str) -> Job | None:
        local = self.mirror.get(request_id)
        if request_id in self._unsynced:  # ours is newer than Redis until written back
            return local
        try:
            job = self.guard.call(self.primary.get, request_id)
        except redis.RedisError:
            return local
        if job is None:
            return local
        self.mirror.put(job)
        return job

    def update(self, request_id: str, **changes: Any) -> Job:
        if request_id not in self._unsynced:
            try:
                job = self.guard.call(self.primary.update, request_id, **changes)
                self.mirror.put(job)
                return job
            except KeyError:
                if self.mirror.get(request_id) is None:
                    raise
            except redis.RedisError:
                if self.mirror.get(request_id) is None:
                    raise KeyError(request_id) from None
        job = self.mirror.update(request_id, **changes)
        self._remember_unsynced(request_id)
        return job

    def add_listener(self, callback: Any) -> None:
        """Changes seen through Redis (the fleet's) and those kept here while it is away."""
        self.primary.add_listener(callback)
        self.mirror.add_listener(callback)

    def wait(self, request_id: str, after_version: int, timeout: float) -> Job | None:
        if request_id not in self._unsynced:
            try:
                return self.guard.call(self.primary.wait, request_id, after_version, timeout)
            except redis.RedisError:
                pass
        return self.mirror.wait(request_id, after_version, min(timeout, 1.0))

    # ---- write-back -----------------------------------------------------------------------------
    def _remember_unsynced(self, request_id: str) -> None:
        with self._lock:
            self._unsynced[request_id] = None
            if self._syncing:
                return
            self._syncing = True
        threading.Thread(target=self._sync_until_clean, name="redis-writeback", daemon=True).start()

    def _sync_until_clean(self) -> None:
        while True:
            time.sleep(self.sync_seconds)
            with self._lock:
                pending = list(self._unsynced)
                if not pending:
                    self._syncing = False
                    return
            for request_id in pending:
                if not self._write_back(request_id):
                    break

    def _write_back(self, request_id: str) -> bool:
        local = self.mirror.get(request_id)
        try:
            stored = local and self.guard.call(self.primary.put_if_newer, local)
        except redis.RedisError:
            return False
        with self._lock:
            # a change made while we wrote stays pending for the next round
            if self.mirror.get(request_id) is local:
                self._unsynced.pop(request_id, None)
        if stored:
            self.mirror.put(stored)
            logger.info("job %s written back to Redis (version %d)", request_id, stored.version)
        return True


class ResilientClaims:
    """Without Redis no claim can be checked: generate anyway (at worst an image is made twice)."""

    def __init__(self, primary: Any, guard: RedisGuard) -> None:
        self.primary, self.guard = primary, guard
        self.ttl_seconds = primary.ttl_seconds

    def claim(self, fingerprint: str, holder: str) -> str | None:
        return self.guard.quietly(self.primary.claim, fingerprint, holder)

    def renew(self, fingerprint: str, holder: str) -> None:
        self.guard.quietly(self.primary.renew, fingerprint, holder)

    def release(self, fingerprint: str, holder: str) -> None:
        self.guard.quietly(self.primary.release, fingerprint, holder)


class ResilientLimit:
    """A fleet-wide limit kept in Redis; while Redis is down, this process's own count stands in."""

    def __init__(self, primary: Any, fallback: Any, guard: RedisGuard) -> None:
        self.primary, self.fallback, self.guard = primary, fallback, guard

    def __getattr__(self, method: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return self.guard.call(getattr(self.primary, method), *args, **kwargs)
            except redis.RedisError:
                return getattr(self.fallback, method)(*args, **kwargs)
        return call
