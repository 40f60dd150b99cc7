"""Which exact weights a worker loads: a revision name ("main", a tag) resolved to a commit.

"main" moves when a model's owner pushes; a fingerprint made with the name would serve an image of the
old weights for a request rendered by the new ones. So before anything is fingerprinted, every hub
source is pinned to a commit (the Hub's answer, else the local Hugging Face cache's ref), every local
folder to a sha256 of its files, and the weights are then loaded at exactly that commit. No torch here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

from inference.presets import ModelIdentity

logger = logging.getLogger(__name__)

COMMIT = re.compile(r"[0-9a-f]{40}")
HUB_TIMEOUT_SECONDS = 5.0  # a startup that cannot reach the Hub falls back to the local cache quickly
# A file the component's repository always has (model_index.json for a pipeline): the cache records
# which commit each ref pointed at through the snapshot folder of such a file.
PROBE_FILES = {"model": "model_index.json", "vae": "config.json"}


class DigestMemo:
    """Each file's sha256 remembered by its path, size and modification time, in a JSON file that
    survives restarts (next to the compiled UNet cache): hashing a full SDXL folder reads 7-10 GB, about
    as long as loading it; a restart with unchanged weights then only stats them."""

    def __init__(self, path: Path | None = None) -> None:
        self.path, self.entries, self.changed = path, {}, False
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                logger.warning("ignoring an unreadable digest memo %s", path)

    def sha256(self, file: Path) -> bytes:
        stat = file.stat()
        key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
        known = self.entries.get(key)
        if isinstance(known, list) and known[:2] == stamp:
            return bytes.fromhex(known[2])
        digest = _file_sha256(file)
        self.entries[key], self.changed = [*stamp, digest.hex()], True
        return digest

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        kept = {key: entry for key, entry in self.entries.items() if os.path.exists(key)}  # forget deleted files
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False) as handle:
                json.dump(kept, handle)
            os.replace(handle.name, self.path)  # whole or not at all: another worker may read it now
        except OSError as error:  # a read-only disk costs the next start a re-hash, nothing else
            logger.warning("could not save the digest memo %s: %s", self.path, error)


def folder_digest(folder: Path, memo: DigestMemo | None = None) -> str:
    """sha256 over every file's relative path and contents (hidden folders such as .cache skipped).
    Reading the weights here also warms the page cache for the load that follows."""
    memo = memo or DigestMemo()
    digest = hashlib.sha256()
    for path in sorted(_files(folder)):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(memo.sha256(path))
    return "sha256:" + digest.hexdigest()


def _file_sha256(path: Path, chunk_bytes: int = 8 * 1024 * 1024) -> bytes:
    """hashlib.file_digest is Python 3.11+; a Space may run 3.10."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.digest()


def _files(folder: Path):
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                yield Path(root) / name


def resolve_commit(source: str, revision: str, probe_file: str, memo: DigestMemo | None = None) -> str | None:
    """The commit a source's revision names now: a local folder's content digest (or, for a folder
    inside the Hugging Face cache, its snapshot's commit), a hub repository's commit from the Hub, else
    from the local cache. None when neither can tell (the caller keeps the name and says so)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        if folder.parent.name == "snapshots" and COMMIT.fullmatch(folder.name):
            return folder.name
        return folder_digest(folder, memo)
    if COMMIT.fullmatch(revision):
        return revision
    return _hub_commit(source, revision) or _cached_commit(source, revision, probe_file)


def _hub_commit(repo_id: str, revision: str) -> str | None:
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_SECONDS).sha
    except Exception as error:  # unreachable, unknown repo, gated: the cache may still know it
        logger.info("the Hub did not resolve %s@%s (%s); trying the local cache", repo_id, revision,
                    type(error).__name__)
        return None


def _cached_commit(repo_id: str, revision: str, probe_file: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, probe_file, revision=revision)
    except Exception:  # not a valid repo id (e.g. a local path that does not exist)
        return None
    if not isinstance(path, str):
        return None
    snapshot = Path(path).parents[len(Path(probe_file).parts) - 1]
    return snapshot.name if COMMIT.fullmatch(snapshot.name) else None


def pin(identity: ModelIdentity, memo_path: Path | None = None) -> ModelIdentity:
    """identity with the commit of each component it loads (model, separate UNet weights, tiny VAE).
    memo_path: where local folders' file digests are remembered across restarts (None: nowhere)."""
    commits, memo = {}, DigestMemo(memo_path)
    for component, source, revision, probe in _components(identity):
        commit = resolve_commit(source, revision, probe, memo)
        if commit is None:
            logger.warning("could not resolve %s %s@%s to a commit (no Hub and not in the local cache): "
                           "images are fingerprinted by the name %r, so a cached image may come from an "
                           "older commit of it", component, source, revision, revision)
            continue
        commits[component] = commit
        logger.info("%s %s@%s is %s", component, source, revision, commit)
    memo.save()
    return dataclasses.replace(identity, commits=tuple(sorted(commits.items())))


def _components(identity: ModelIdentity):
    yield "model", identity.model_id, identity.revision, PROBE_FILES["model"]
    if identity.unet_weights:
        repo, filename = identity.unet_weights.rsplit("/", 1)
        yield "unet_weights", repo, "main", filename
    if identity.vae != "full":
        yield "vae", identity.vae, "main", PROBE_FILES["vae"]
