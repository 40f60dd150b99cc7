"""Job state by request id: what /status answers and what waiting callers watch."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from cachetools import TTLCache

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
TERMINAL_STATES = frozenset({DONE, FAILED, CANCELLED})


@dataclass(frozen=True)
class Job:
    request_id: str
    fingerprint: str
    state: str = QUEUED
    step: int = 0
    total_steps: int = 0
    request: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    cancel_requested: bool = False
    worker: str = ""
    attempts: int = 0  # generations that started (a redelivery that only waited for another worker is none)
    owner: str = ""  # identity key of who submitted it (queueing.admission.Caller.key), "kafka" for the topic
    private: bool = False  # only the owner may see or cancel it (signed-in users, chosen ids, the topic)
    backend: str = ""  # who runs it: local (this process), fleet (the shared queue) or remote (a GPU service)
    route: str = ""  # why it went there (the routing decision, in words)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    preview: str = ""  # while running: a small JPEG of the image so far, as a data: URL (inference/preview.py)
    webhook_deliveries: list[dict[str, Any]] = field(default_factory=list)  # every POST attempt (queueing.webhooks)
    feedback: str = ""  # the owner's thumbs "up" or "down" on the result (/feedback), counted per A/B arm
    version: int = 0  # bumped on every change, so waiters can tell "changed since I looked"

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class JobStore(Protocol):
    def create(self, job: Job) -> Job: ...

    def get(self, request_id: str) -> Job | None: ...

    def update(self, request_id: str, **changes: Any) -> Job: ...

    def wait(self, request_id: str, after_version: int, timeout: float) -> Job | None: ...


class MemoryJobStore:
    """Jobs of this process, kept for a day (bounded), with a condition for waiters."""

    def __init__(self, max_jobs: int = 10_000, ttl_seconds: float = 24 * 3600) -> None:
        self._jobs: TTLCache = TTLCache(maxsize=max_jobs, ttl=ttl_seconds)
        self._changed = threading.Condition()

    def create(self, job: Job) -> Job:
        """Store job unless its request id exists; return whichever is stored (idempotent retries)."""
        with self._changed:
            existing = self._jobs.get(job.request_id)
            if existing is not None:
                return existing
            self._jobs[job.request_id] = job
            self._changed.notify_all()
            return job

    def get(self, request_id: str) -> Job | None:
        with self._changed:
            return self._jobs.get(request_id)

    def put(self, job: Job) -> None:
        """Overwrite with a newer state known from elsewhere (the Redis mirror)."""
        with self._changed:
            self._jobs[job.request_id] = job
            self._changed.notify_all()

    def update(self, request_id: str, **changes: Any) -> Job:
        with self._changed:
            job = self._jobs[request_id]
            job = dataclasses.replace(job, **changes, version=job.version + 1)
            self._jobs[request_id] = job
            self._changed.notify_all()
            return job

    def wait(self, request_id: str, after_version: int, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                job = self._jobs.get(request_id)
                remaining = deadline - time.monotonic()
                if job is None or job.version > after_version or remaining <= 0:
                    return job
                self._changed.wait(remaining)
