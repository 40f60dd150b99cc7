"""Job state by request id: what /status answers and what waiting callers watch."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cachetools import TTLCache

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
TERMINAL_STATES = frozenset({DONE, FAILED, CANCELLED})

logger = logging.getLogger(__name__)


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


class ChangeListeners:
    """Callbacks told the request id of each job change a store sees, from whichever thread made it
    (JobWaiters turns them into asyncio wake-ups). A failing callback is logged, never the writer's error."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[str], None]] = []

    def add(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)

    def notify(self, request_id: str) -> None:
        for callback in list(self._callbacks):
            try:
                callback(request_id)
            except Exception:
                logger.exception("job change listener failed")


class MemoryJobStore:
    """Jobs of this process, kept for a day (bounded), with a condition for waiters."""

    def __init__(self, max_jobs: int = 10_000, ttl_seconds: float = 24 * 3600) -> None:
        self._jobs: TTLCache = TTLCache(maxsize=max_jobs, ttl=ttl_seconds)
        self._changed = threading.Condition()
        self.listeners = ChangeListeners()

    def add_listener(self, callback: Callable[[str], None]) -> None:
        self.listeners.add(callback)

    def create(self, job: Job) -> Job:
        """Store job unless its request id exists; return whichever is stored (idempotent retries)."""
        with self._changed:
            existing = self._jobs.get(job.request_id)
            if existing is not None:
                return existing
            self._jobs[job.request_id] = job
            self._changed.notify_all()
        self.listeners.notify(job.request_id)
        return job

    def get(self, request_id: str) -> Job | None:
        with self._changed:
            return self._jobs.get(request_id)

    def put(self, job: Job) -> None:
        """Overwrite with a newer state known from elsewhere (the Redis mirror). Only a different state
        tells listeners: the mirror re-puts what every read returns, and a waiter reads when woken."""
        with self._changed:
            if self._jobs.get(job.request_id) == job:
                return
            self._jobs[job.request_id] = job
            self._changed.notify_all()
        self.listeners.notify(job.request_id)

    def update(self, request_id: str, **changes: Any) -> Job:
        with self._changed:
            job = self._jobs[request_id]
            job = dataclasses.replace(job, **changes, version=job.version + 1)
            self._jobs[request_id] = job
            self._changed.notify_all()
        self.listeners.notify(request_id)
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


class JobWaiters:
    """Lets coroutines wait for a change to any of some jobs without holding a thread and without
    polling: the job store's listener (this process's writes; the fleet's through Redis pub/sub) sets
    their asyncio events. A store without listeners, or a lost notification, is covered by the caller's
    timeout, after which it reads the jobs anyway."""

    def __init__(self, store: Any) -> None:
        self._waiting: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._lock = threading.Lock()
        add_listener = getattr(store, "add_listener", None)
        self.listening = add_listener is not None
        if add_listener is not None:
            add_listener(self._changed)

    def _changed(self, request_id: str) -> None:
        with self._lock:
            waiting = list(self._waiting.get(request_id, ()))
        for loop, event in waiting:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: its waiter is gone
                pass

    def watch(self, request_ids: Iterable[str]) -> JobWatch:
        """Registers now: a change from here on is seen even if it comes before the caller waits (so
        watch first, then read the jobs, then wait). Use as a context manager."""
        watch = JobWatch(self, list(request_ids), asyncio.get_running_loop())
        with self._lock:
            for request_id in watch.request_ids:
                self._waiting.setdefault(request_id, set()).add((watch.loop, watch.event))
        return watch

    def _unwatch(self, watch: JobWatch) -> None:
        with self._lock:
            for request_id in watch.request_ids:
                entries = self._waiting.get(request_id, set())
                entries.discard((watch.loop, watch.event))
                if not entries:
                    self._waiting.pop(request_id, None)


@dataclass(eq=False)
class JobWatch:
    waiters: JobWaiters
    request_ids: list[str]
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event = field(default_factory=asyncio.Event)

    async def changed(self, timeout: float) -> None:
        """Returns at the next change to a watched job (or one since the last call), or after timeout."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            pass
        self.event.clear()

    def __enter__(self) -> JobWatch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.waiters._unwatch(self)
