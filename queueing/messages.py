"""Wire format of the Kafka topics: versioned JSON, decoded into the one request type."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from inference.errors import InvalidRequest
from inference.request import GenerationRequest

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # a valid request is < 10 KB; anything far larger is abuse or a bug


class MalformedMessage(ValueError):
    """The message cannot become a request; the reason goes to the dead-letter topic."""


@dataclass(frozen=True)
class RequestEnvelope:
    request: GenerationRequest
    attempt: int = 1
    submitted_at: float = 0.0
    replayed: bool = False  # sent again from the dead-letter topic: its failed job starts over
    route: str = ""  # "auto": the producer lets the fleet send it to the GPU service when the queue is deep


def encode_request(request: GenerationRequest, attempt: int = 1, submitted_at: float | None = None,
                   replayed: bool = False, route: str = "") -> bytes:
    data = {"v": VERSION, "request": request.to_dict(), "attempt": attempt, "submitted_at": submitted_at or time.time()}
    if replayed:
        data["replayed"] = True
    if route:
        data["route"] = route
    return json.dumps(data).encode()


def decode_request(raw: bytes | None) -> RequestEnvelope:
    if raw is None:
        raise MalformedMessage("empty message")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"message is {len(raw)} bytes; at most {MAX_MESSAGE_BYTES} allowed")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MalformedMessage(f"not JSON: {error}") from None
    if not isinstance(data, dict):
        raise MalformedMessage(f"expected a JSON object, got {type(data).__name__}")
    if data.get("v") != VERSION:
        raise MalformedMessage(f"unknown message version {data.get('v')!r}; this worker reads version {VERSION}")
    attempt = data.get("attempt", 1)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise MalformedMessage(f"attempt must be a positive integer, got {attempt!r}")
    try:
        request = GenerationRequest.from_dict(data.get("request"))
    except InvalidRequest as error:
        raise MalformedMessage(f"invalid request: {error}") from None
    submitted_at = data.get("submitted_at")
    route = data.get("route", "")
    if route not in ("", "auto", "fleet"):
        raise MalformedMessage(f"route must be \"auto\" or \"fleet\", got {route!r}")
    return RequestEnvelope(request, attempt, submitted_at if isinstance(submitted_at, int | float) else 0.0,
                           replayed=data.get("replayed") is True, route=route)


def encode_result(request_id: str, state: str, result: dict | None, error: str | None) -> bytes:
    return json.dumps({"v": VERSION, "request_id": request_id, "state": state, "result": result,
                       "error": error}).encode()


def decode_result(raw: bytes) -> dict[str, Any]:
    return json.loads(raw)


MAX_DEAD_LETTER_ORIGINAL = 256 * 1024  # bytes of the original kept: a dead letter must always fit in a message


@dataclass(frozen=True)
class Origin:
    """Where a message was read, so an operator can find the full original in the topic."""

    topic: str = ""
    partition: int = -1
    offset: int = -1


def encode_dead_letter(raw: bytes | None, reason: str, worker: str, attempts: int = 0,
                       request_id: str | None = None, origin: Origin = Origin()) -> bytes:
    """The original bytes, as text when they are small UTF-8, else base64 of at most
    MAX_DEAD_LETTER_ORIGINAL bytes (with the full size and sha256): escaping non-ASCII text in JSON can
    triple its size, and a dead letter the broker refuses would make the poison message vanish."""
    return json.dumps({"v": VERSION, "reason": reason[:2000], "worker": worker, "attempts": attempts,
                       "request_id": request_id, "failed_at": time.time(), "topic": origin.topic,
                       "partition": origin.partition, "offset": origin.offset,
                       "original": _original(raw)}, ensure_ascii=False).encode()


def _original(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if len(raw) <= MAX_MESSAGE_BYTES:
        try:
            return {"text": raw.decode("utf-8")}
        except UnicodeDecodeError:
            pass
    kept = raw[:MAX_DEAD_LETTER_ORIGINAL]
    return {"base64": base64.b64encode(kept).decode(), "size": len(raw), "truncated": len(kept) < len(raw),
            "sha256": hashlib.sha256(raw).hexdigest()}


def original_bytes(entry: dict[str, Any]) -> bytes | None:
    """The original message of a dead letter, or None when it was not kept whole."""
    original = entry.get("original") or {}
    if "text" in original:
        return original["text"].encode()
    if "base64" in original and not original.get("truncated"):
        return base64.b64decode(original["base64"])
    return None
