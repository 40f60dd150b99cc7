"""Which backends are degraded right now, for /healthz, the UI banner and metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

# What each degraded state means for users, in the words the banner and /healthz use.
CONSEQUENCES = {
    "Redis": "no fleet cache and job state kept on this Space only; caching resumes by itself",
    "R2/S3": "new images are served by this Space only and not persisted; uploads resume by themselves",
    "object stores (R2 and its fallback)": "new images are served by this Space only and not persisted; "
                                           "uploads resume by themselves",
    "R2": "new images are written to the fallback store (S3_FALLBACK_*); writes return to R2 by themselves",
    "S3 fallback": "the fallback store failed too; images wait on this Space until a store takes them",
    "Kafka": "the shared queue is unavailable; requests are refused (or run here when KAFKA_FALLBACK_LOCAL=1)",
    "SQS": "the shared queue is unavailable; requests are refused (or run here when KAFKA_FALLBACK_LOCAL=1)",
    "GPU service": "peaks wait in the fleet's queue instead; the GPU service is tried again by itself",
}


class BackendHealth:
    def __init__(self, on_change: Callable[[str, bool], None] | None = None) -> None:
        self._down: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._on_change = on_change

    def down(self, backend: str, error: BaseException | str) -> None:
        reason = error if isinstance(error, str) else type(error).__name__
        with self._lock:
            changed = backend not in self._down
            self._down.setdefault(backend, (reason, time.time()))
        if changed:
            logger.warning("%s degraded (%s): %s", backend, reason, CONSEQUENCES.get(backend, ""))
            if self._on_change:
                self._on_change(backend, True)

    def up(self, backend: str) -> None:
        with self._lock:
            changed = self._down.pop(backend, None) is not None
        if changed:
            logger.info("%s recovered", backend)
            if self._on_change:
                self._on_change(backend, False)

    def degraded(self) -> dict[str, dict]:
        with self._lock:
            return {name: {"reason": reason, "since": since, "meaning": CONSEQUENCES.get(name, "")}
                    for name, (reason, since) in self._down.items()}
