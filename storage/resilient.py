"""Redis stores that step aside while Redis is down instead of failing requests.

Generation goes on without Redis: cache reads miss, cache writes are skipped, and job state is kept in
a local mirror (this Space answers for its own jobs). When Redis answers again, everything resumes by
itself; a job created during the outage is written to Redis at its next change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from storage.health import BackendHealth
from storage.jobs import Job, MemoryJobStore

NAME = "Redis"


def guarded(health: BackendHealth, call: Callable[..., Any], *args: Any, default: Any = None) -> Any:
    """call(*args), recording Redis as up or down; default while it is down."""
    try:
        result = call(*args)
    except redis.RedisError as error:
        health.down(NAME, error)
        return default
    health.up(NAME)
    return result


class ResilientCache:
    def __init__(self, primary: Any, health: BackendHealth) -> None:
        self.primary, self.health = primary, health

    def get(self, fingerprint: str) -> dict[str, Any] | None:
        return guarded(self.health, self.primary.get, fingerprint)

    def put(self, fingerprint: str, result: dict[str, Any]) -> None:
        guarded(self.health, self.primary.put, fingerprint, result)


class ResilientJobStore:
    def __init__(self, primary: Any, health: BackendHealth) -> None:
        self.primary, self.health = primary, health
        self.mirror = MemoryJobStore()  # every job this process touched, latest known state

    def create(self, job: Job) -> Job:
        try:
            stored = self.primary.create(job)
        except redis.RedisError as error:
            self.health.down(NAME, error)
            return self.mirror.create(job)
        self.health.up(NAME)
        self.mirror.put(stored)
        return stored

    def get(self, request_id: str) -> Job | None:
        try:
            job = self.primary.get(request_id)
        except redis.RedisError as error:
            self.health.down(NAME, error)
            return self.mirror.get(request_id)
        self.health.up(NAME)
        if job is None:  # created while Redis was down, and not written back yet
            return self.mirror.get(request_id)
        self.mirror.put(job)
        return job

    def update(self, request_id: str, **changes: Any) -> Job:
        local = self.mirror.update(request_id, **changes) if self.mirror.get(request_id) else None
        try:
            try:
                job = self.primary.update(request_id, **changes)
            except KeyError:
                if local is None:
                    raise
                job = self.primary.create(local)  # written back after an outage
        except redis.RedisError as error:
            self.health.down(NAME, error)
            if local is None:
                raise KeyError(request_id) from error
            return local
        self.health.up(NAME)
        self.mirror.put(job)
        return job

    def wait(self, request_id: str, after_version: int, timeout: float) -> Job | None:
        try:
            return self.primary.wait(request_id, after_version, timeout)
        except redis.RedisError as error:
            self.health.down(NAME, error)
            return self.mirror.wait(request_id, after_version, min(timeout, 1.0))


class ResilientClaims:
    """Without Redis no claim can be checked: generate anyway (at worst an image is made twice)."""

    def __init__(self, primary: Any, health: BackendHealth) -> None:
        self.primary, self.health = primary, health

    def claim(self, fingerprint: str, holder: str) -> str | None:
        return guarded(self.health, self.primary.claim, fingerprint, holder)

    def renew(self, fingerprint: str, holder: str) -> None:
        guarded(self.health, self.primary.renew, fingerprint, holder)

    def release(self, fingerprint: str, holder: str) -> None:
        guarded(self.health, self.primary.release, fingerprint, holder)


class ResilientRateLimiter:
    """Counts in Redis (fleet-wide); while Redis is down, in this process's memory instead."""

    def __init__(self, primary: Any, fallback: Any, health: BackendHealth) -> None:
        self.primary, self.fallback, self.health = primary, fallback, health

    def hit(self, user: str):
        try:
            verdict = self.primary.hit(user)
        except redis.RedisError as error:
            self.health.down(NAME, error)
            return self.fallback.hit(user)
        self.health.up(NAME)
        return verdict
