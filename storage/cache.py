"""The result cache: fingerprint -> small JSON result (URL and metadata, never image bytes)."""

from __future__ import annotations

import threading
from typing import Any, Protocol

from cachetools import TTLCache


class ResultCache(Protocol):
    def get(self, fingerprint: str) -> dict[str, Any] | None: ...

    def put(self, fingerprint: str, result: dict[str, Any]) -> None: ...


class MemoryResultCache:
    """Bounded LRU with expiry, for a single process without Redis."""

    def __init__(self, max_entries: int = 1024, ttl_seconds: float = 7 * 24 * 3600) -> None:
        self._entries: TTLCache = TTLCache(maxsize=max_entries, ttl=ttl_seconds)
        self._lock = threading.Lock()

    def get(self, fingerprint: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._entries.get(fingerprint)
        return dict(found) if found is not None else None

    def put(self, fingerprint: str, result: dict[str, Any]) -> None:
        with self._lock:
            self._entries[fingerprint] = dict(result)
