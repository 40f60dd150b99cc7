"""Pure functions that name things. Never Python's hash(): it differs per process."""

from __future__ import annotations

from inference.presets import ModelIdentity
from inference.request import GenerationRequest, sha256_hex

# Bump when a code change alters the pixels for the same request (scheduler setup, decoding...),
# so that old cache entries stop matching.
PIPELINE_VERSION = 1


def fingerprint(request: GenerationRequest, model: ModelIdentity) -> str:
    """sha256 of canonical JSON of everything that determines the output bytes."""
    parts = {"v": PIPELINE_VERSION, "request": request.pixel_fields(), "model": model.as_dict()}
    if request.loras:  # the styles' sources too: a name pointed at other weights is another image
        parts["loras"] = model.lora_sources([name for name, _ in request.loras])
    return sha256_hex(parts)


def object_key(fingerprint_: str, output_format: str) -> str:
    """Content-addressed, with a 2-hex-digit prefix so no folder or listing grows too large."""
    return f"images/{fingerprint_[:2]}/{fingerprint_}.{output_format}"


def routing_key(request: GenerationRequest) -> str:
    """Kafka message key: identical requests land on one partition, so one consumer takes them in
    turn and the second is a cache hit. Model-free, so producers outside the fleet can compute it."""
    return sha256_hex(request.pixel_fields())


# Redis key names, all under one namespace so several fleets can share a database.
def result_key(namespace: str, fingerprint_: str) -> str:
    return f"{namespace}:result:{fingerprint_}"


def job_key(namespace: str, request_id: str) -> str:
    return f"{namespace}:job:{request_id}"


def job_channel(namespace: str, request_id: str) -> str:
    return f"{namespace}:job-events:{request_id}"


def worker_key(namespace: str, worker: str) -> str:
    """The fleet registry's keys share a hash tag: one Redis Cluster slot, so one pipeline reads both."""
    return f"{{{namespace}:workers}}:{worker}"


def inflight_key(namespace: str, fingerprint_: str) -> str:
    return f"{namespace}:inflight:{fingerprint_}"
