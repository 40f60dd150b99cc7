"""Who is calling, which jobs they may see, and whether they may start another request.

A caller is the signed-in Hugging Face user, else the address the platform's proxy appended to
X-Forwarded-For (the `trusted_hops`-th entry from the right), never a value the client wrote itself.
Addresses are kept only as hashes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from inference.errors import InvalidRequest, TooManyRequests
from storage.jobs import Job
from storage.limits import InflightLimit, RateLimiter, describe_retry

logger = logging.getLogger(__name__)

MAX_CHOSEN_ID_CHARS = 112  # the scope prefix takes 16 of the 128 characters a request id may have


@dataclass(frozen=True)
class Caller:
    key: str  # "user:<name>" or "ip:<hash>": what limits count and jobs are owned by
    signed_in: bool = False

    @property
    def scope(self) -> str:
        return ("u" if self.signed_in else "a") + hashlib.sha256(self.key.encode()).hexdigest()[:14]


def client_address(forwarded: str, peer: str | None, trusted_hops: int) -> str:
    """Each trusted proxy appends the address its connection came from, so the trusted_hops-th entry
    from the right is the first one no client could write. Without proxies: the socket's peer."""
    entries = [entry.strip() for entry in forwarded.split(",") if entry.strip()]
    if trusted_hops > 0 and len(entries) >= trusted_hops:
        return entries[-trusted_hops]
    return peer or "unknown"


def identify(username: str | None, headers: Mapping[str, str], peer: str | None, trusted_hops: int) -> Caller:
    if username:
        return Caller(f"user:{username}", signed_in=True)
    address = client_address(headers.get("x-forwarded-for", ""), peer, trusted_hops)
    return Caller("ip:" + hashlib.sha256(address.encode()).hexdigest()[:20])


def scoped_request_id(caller: Caller, chosen: str | None) -> str | None:
    """A chosen id lives in the caller's own namespace: two callers who both choose "order-1" make two
    requests, and nobody reaches someone else's job by guessing the id they chose."""
    if not chosen:
        return None
    if len(chosen) > MAX_CHOSEN_ID_CHARS:
        raise InvalidRequest("request_id", f"at most {MAX_CHOSEN_ID_CHARS} characters, got {len(chosen)}")
    return f"{caller.scope}:{chosen}"


SCOPED_ID = re.compile(r"[au][0-9a-f]{14}:(.+)")


def public_request_id(job: Job) -> str:
    """The id its submitter knows: their chosen id without the scope prefix (webhooks, topics)."""
    scoped = SCOPED_ID.fullmatch(job.request_id) if job.owner != "kafka" else None
    return scoped.group(1) if scoped else job.request_id


def may_see(job: Job, caller: Caller) -> bool:
    """Private jobs (a signed-in owner, a chosen id, the topic's) only by their owner; an anonymous job
    under a generated id by whoever holds the id (128 random bits: a capability)."""
    return not job.private or job.owner == caller.key


class Admission:
    """Per-user limits at the door: requests per hour and requests in flight, both fleet-wide when
    they are kept in Redis."""

    def __init__(self, rate: RateLimiter, inflight: InflightLimit, per_hour: int, max_in_flight: int,
                 finished: Callable[[str], bool], metrics: Any = None) -> None:
        self.rate, self.inflight, self.per_hour, self.max_in_flight = rate, inflight, per_hour, max_in_flight
        self.finished, self.metrics = finished, metrics

    def admit(self, caller: Caller, request_id: str) -> None:
        held = self.inflight.acquire(caller.key, request_id, self.finished)
        if held is not None:
            self._count("too_many_in_flight")
            raise TooManyRequests(f"you already have {held} requests in progress (at most {self.max_in_flight}); "
                                  "wait for one to finish")
        verdict = self.rate.hit(caller.key)
        if not verdict.allowed:
            self.inflight.release(caller.key, request_id)
            self._count("rate_limit")
            raise TooManyRequests(f"rate limit: {self.per_hour} requests per hour; try again "
                                  f"{describe_retry(verdict.retry_after_seconds)}")

    def release(self, caller: Caller, request_id: str) -> None:
        self.inflight.release(caller.key, request_id)

    def _count(self, reason: str) -> None:
        if self.metrics:
            self.metrics.rejected.labels(reason).inc()
