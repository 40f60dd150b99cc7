"""Where a new request runs: the fleet (or this Space's own worker), or the GPU prediction service.

The decision reads what the Space already knows: the wait a new request would have (backlog from the
consumer lag and queued jobs, time per image from the workers' heartbeats, live workers per preset),
the operator's share for gradual migration (REMOTE_SHARE, 0 = roll back), the service's health and a
fleet-wide hourly budget in Redis (REMOTE_MAX_PER_HOUR). A refusal of the budget sends the request to
the fleet, never back to the user.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inference.request import GenerationRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    backend: str  # "remote", or the queue's own: "fleet" / "local"
    reason: str  # in words, for the job, the logs and /metrics (a short label)
    label: str  # the metric label: no numbers, so the series stay few

    @property
    def remote(self) -> bool:
        return self.backend == "remote"


def share_bucket(request_id: str) -> float:
    """A stable number in [0, 1) per request id: a retried request takes the same way."""
    return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) / 2**32


class Router:
    def __init__(self, estimate: Callable[[], dict[str, Any]], available: Callable[[], bool], budget: Any,
                 overflow_after_seconds: float | None, remote_share: float, max_per_hour: int,
                 queue_backend: str = "fleet", metrics: Any = None) -> None:
        self.estimate, self.available, self.budget = estimate, available, budget
        self.overflow_after_seconds, self.remote_share = overflow_after_seconds, remote_share
        self.max_per_hour, self.queue_backend, self.metrics = max_per_hour, queue_backend, metrics

    def decide(self, request: GenerationRequest) -> Decision:
        started = time.perf_counter()
        decision = self._decide(request)
        if self.metrics:
            self.metrics.decision_seconds.observe(time.perf_counter() - started)
            self.metrics.routed.labels(decision.backend, decision.label).inc()
        logger.info("request %s -> %s: %s", request.request_id, decision.backend, decision.reason)
        return decision

    def _decide(self, request: GenerationRequest) -> Decision:
        if request.init_image:  # the prediction service's inputs have no start image
            return self._stay("img2img", "img2img requests stay on the fleet (the GPU service takes no start image)")
        if request.loras:  # nor styles: it would render the base model under the styled request's fingerprint
            return self._stay("styles", "requests with styles stay on the fleet (the GPU service loads no LORAS)")
        wanted = self._wants_remote(request)
        if wanted is None:
            return self._stay("within capacity", self._within_words())
        label, reason = wanted
        if not self.available():
            return self._stay("remote unavailable", f"{reason}, but the GPU service is unavailable")
        if self.max_per_hour and not self.budget.hit("remote").allowed:
            return self._stay("remote budget spent", f"{reason}, but REMOTE_MAX_PER_HOUR={self.max_per_hour} "
                                                     "is spent for this hour")
        return Decision("remote", reason, label)

    def _wants_remote(self, request: GenerationRequest) -> tuple[str, str] | None:
        estimate = self.estimate()
        self._last_wait = float(estimate.get("estimated_wait_s") or 0.0)
        if estimate.get("workers", 1) == 0:
            return "no live workers", f"no live {request.preset} worker in the fleet"
        limit = self.overflow_after_seconds
        if limit is not None and self._last_wait > limit:
            return "queue too deep", (f"estimated wait {self._last_wait:.0f} s > OVERFLOW_AFTER_SECONDS={limit:g} "
                                      f"(backlog {estimate.get('backlog', 0)}, {estimate.get('workers', 0)} workers)")
        if share_bucket(request.request_id) < self.remote_share:
            return "share", f"REMOTE_SHARE={self.remote_share:g} of traffic goes to the GPU service"
        return None

    def _within_words(self) -> str:
        limit = self.overflow_after_seconds
        if limit is None:
            return f"estimated wait {self._last_wait:.0f} s (no OVERFLOW_AFTER_SECONDS set)"
        return f"estimated wait {self._last_wait:.0f} s <= OVERFLOW_AFTER_SECONDS={limit:g}"

    def _stay(self, label: str, reason: str) -> Decision:
        return Decision(self.queue_backend, reason, label)
