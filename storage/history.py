"""A designer's recent images: newest first, bounded, kept for weeks; in Redis, so every clone shows them.

A history is keyed by who asks: a signed-in designer's Hugging Face name, else a random key the browser
keeps (Gradio's BrowserState, in localStorage), or a key an API client chose. Keys are hashed before they
are stored, and a key is a capability: whoever holds it reads that history, nobody else does.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from typing import Any

from cachetools import TTLCache

MAX_ENTRIES = 50
HISTORY_TTL_SECONDS = 30 * 24 * 3600
MIN_KEY_CHARS = 16  # a browser key is 32 hex digits; shorter client keys would be guessable


def history_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class MemoryHistory:
    def __init__(self, max_keys: int = 10_000) -> None:
        self._entries: TTLCache = TTLCache(maxsize=max_keys, ttl=HISTORY_TTL_SECONDS)
        self._lock = threading.Lock()

    def add(self, key: str, entry: dict[str, Any]) -> None:
        with self._lock:
            entries = self._entries.get(history_id(key)) or deque(maxlen=MAX_ENTRIES)
            entries.appendleft({**entry, "added_at": time.time()})
            self._entries[history_id(key)] = entries

    def recent(self, key: str, limit: int = MAX_ENTRIES) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._entries.get(history_id(key)) or ())[:limit]


class RedisHistory:
    def __init__(self, client: Any, namespace: str) -> None:
        self.client, self.namespace = client, namespace

    def _key(self, key: str) -> str:
        return f"{self.namespace}:history:{history_id(key)}"

    def add(self, key: str, entry: dict[str, Any]) -> None:
        name = self._key(key)
        pipe = self.client.pipeline()
        pipe.lpush(name, json.dumps({**entry, "added_at": time.time()}))
        pipe.ltrim(name, 0, MAX_ENTRIES - 1)
        pipe.expire(name, HISTORY_TTL_SECONDS)
        pipe.execute()

    def recent(self, key: str, limit: int = MAX_ENTRIES) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(self._key(key), 0, limit - 1)]


class ResilientHistory:
    """History is a comfort: while Redis is away nothing is recorded and an empty history is shown."""

    def __init__(self, primary: RedisHistory, guard: Any) -> None:
        self.primary, self.guard = primary, guard

    def add(self, key: str, entry: dict[str, Any]) -> None:
        self.guard.quietly(self.primary.add, key, entry)

    def recent(self, key: str, limit: int = MAX_ENTRIES) -> list[dict[str, Any]]:
        return self.guard.quietly(self.primary.recent, key, limit, default=[])
