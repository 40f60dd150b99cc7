"""The object store: encoded images under content-addressed keys, each with a stable URL."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple, Protocol

from inference.errors import GenerationError
from storage.health import BackendHealth

logger = logging.getLogger(__name__)


class StoredObject(NamedTuple):
    url: str
    persisted: bool = True  # False: kept on this machine only (the remote store failed)
    storage: str = ""  # which shared store holds it: primary or fallback (FailoverObjectStore)


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Store data under key (idempotent) and say where it can be fetched."""
        ...

    def get(self, key: str) -> bytes: ...

    def url_for(self, key: str, storage: str = "") -> str:
        """The object's URL; storage is where the result says it lives (primary or fallback)."""
        ...

    def local_path(self, key: str) -> Path | None:
        """A file on this machine holding the object, if there is one (saves a download)."""
        ...


class StoreUnavailable(GenerationError):
    """The shared object store did not take the image; the attempt is retried (the image is kept)."""

    retriable = True


class LocalObjectStore:
    """A folder on disk, served by the app under base_url (e.g. http://host:7860/outputs), bounded by
    max_bytes: past it, the least recently used images are removed (a read refreshes an image)."""

    def __init__(self, root: Path, base_url: str, max_bytes: int | None = None) -> None:
        self.root = root
        self.base_url = base_url.rstrip("/")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"object key {key!r} escapes the output folder")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a reader never sees half an image, even if we crash mid-write.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".part") as handle:
            handle.write(data)
        os.replace(handle.name, path)
        self._prune(keep=path)
        return StoredObject(self.url_for(key))

    def get(self, key: str) -> bytes:
        path = self._path(key)
        data = path.read_bytes()
        os.utime(path)  # recently used: pruned last
        return data

    def _prune(self, keep: Path) -> None:
        if self.max_bytes is None:
            return
        with self._lock:
            files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.root.rglob("*") if p.is_file()
                     and p.suffix != ".part"]
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                if path != keep:
                    path.unlink(missing_ok=True)
                    total -= size

    def url_for(self, key: str, storage: str = "") -> str:
        return f"{self.base_url}/{key}"

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.exists() else None


class LocallyCachedStore:
    """A remote store with a local copy of every object this process wrote or read. Keys are
    content-addressed and objects immutable, so a local copy never goes stale: the UI/API response
    of a cache hit reads the disk instead of downloading the image again. When the remote store
    fails (after its own retries with backoff), the image is still served by this app from the local
    copy, marked as not persisted."""

    NAME = "R2/S3"
    PAUSE_SECONDS = 30.0  # after uploads failed, later images skip them this long (no 20 s retry waits)

    def __init__(self, remote: ObjectStore, local: LocalObjectStore, health: BackendHealth | None = None,
                 upload_in_background: bool = False, name: str = NAME) -> None:
        self.remote, self.local, self.NAME = remote, local, name
        self.health = health or BackendHealth()
        # In a fleet an image only this machine holds cannot reach a user of another clone: the upload
        # must succeed. It is retried (the attempt fails retriably, the local copy spares a re-render).
        self.fleet_wide = upload_in_background
        self._paused_until = 0.0

    def local_copy(self, key: str) -> bytes | None:
        """The image as this machine already has it (an earlier attempt whose upload failed)."""
        path = self.local.local_path(key)
        return path.read_bytes() if path is not None else None

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        local = self.local.put(key, data, content_type)
        if self.fleet_wide:
            return self._put_fleet_wide(key, data, content_type)
        if time.monotonic() < self._paused_until:
            return StoredObject(local.url, persisted=False)
        try:
            stored = self.remote.put(key, data, content_type)
        except Exception as error:  # botocore raises many types; any of them means "not persisted"
            self.health.down(self.NAME, error)
            self._paused_until = time.monotonic() + self.PAUSE_SECONDS
            logger.warning("upload of %s failed (%s); serving it from this Space only", key, type(error).__name__)
            return StoredObject(local.url, persisted=False)
        self.health.up(self.NAME)
        return stored

    def _put_fleet_wide(self, key: str, data: bytes, content_type: str) -> StoredObject:
        try:
            stored = self.remote.put(key, data, content_type)
        except Exception as error:
            self.health.down(self.NAME, error)
            raise StoreUnavailable(f"the object store did not take the image ({type(error).__name__}); "
                                   "retrying") from error
        self.health.up(self.NAME)
        return stored

    def get(self, key: str) -> bytes:
        path = self.local.local_path(key)
        if path is not None:
            return self.local.get(key)
        data = self.remote.get(key)
        self.local.put(key, data, "")
        return data

    def url_for(self, key: str, storage: str = "") -> str:
        return self.remote.url_for(key, storage)

    def local_path(self, key: str) -> Path | None:
        path = self.local.local_path(key)
        if path is None:
            self.get(key)
            path = self.local.local_path(key)
        return path


class FailoverObjectStore:
    """Two S3-compatible stores: R2 (primary) takes every write while it can; when a write to it fails
    (after its own retries), the fallback store takes it. Reads look in both. The StoredObject says
    where the object went, and results carry it (`storage`), so a URL is always signed by the store
    that holds the object."""

    PRIMARY, FALLBACK = "primary", "fallback"

    def __init__(self, primary: ObjectStore, fallback: ObjectStore, health: BackendHealth | None = None) -> None:
        self.primary, self.fallback = primary, fallback
        self.health = health or BackendHealth()

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        try:
            stored = self.primary.put(key, data, content_type)
        except Exception as error:  # any botocore error: the fallback takes the write
            self.health.down("R2", error)
            logger.warning("R2 did not take %s (%s); writing it to the fallback store", key, type(error).__name__)
        else:
            self.health.up("R2")
            return stored._replace(storage=self.PRIMARY)
        try:
            stored = self.fallback.put(key, data, content_type)
        except Exception as error:
            self.health.down("S3 fallback", error)
            raise
        self.health.up("S3 fallback")
        return stored._replace(storage=self.FALLBACK)

    def get(self, key: str) -> bytes:
        try:
            return self.primary.get(key)
        except Exception as error:  # missing there, or R2 away: the fallback may hold it
            logger.info("%s not readable from R2 (%s); reading the fallback store", key, type(error).__name__)
            return self.fallback.get(key)

    def url_for(self, key: str, storage: str = "") -> str:
        return (self.fallback if storage == self.FALLBACK else self.primary).url_for(key)

    def local_path(self, key: str) -> Path | None:
        return None
