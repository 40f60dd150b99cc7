"""Webhooks: when a request that named a `webhook_url` ends done or failed, POST its outcome there.

- Only hosts in WEBHOOK_ALLOWED_HOSTS are called (else the fleet would POST wherever a caller says:
  a server-side request forgery). Checked when the request is submitted and again before each POST
  (topic producers bypass the API). Redirects are not followed, for the same reason.
- Signed per the Standard Webhooks spec with WEBHOOK_SECRET (`whsec_` + base64): headers `webhook-id`,
  `webhook-timestamp`, `webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`), so a
  receiver verifies with the `standardwebhooks` library or a few lines of its own.
- Once per state fleet-wide: a ledger (Redis SET NX, in memory without Redis) lets one process send it;
  a network error or a non-2xx answer is retried with exponential backoff up to WEBHOOK_MAX_ATTEMPTS.
  Every attempt is written to the job's `webhook_deliveries`, which /status returns.

The process that moves a job to done or failed sends its webhook (WebhookJobs wraps the job store, the
one place every path — cache hit, worker, GPU service, failure — goes through). Deliveries waiting for a
retry live in that process: a crash loses them, and the job's log then ends with the last attempt made.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cachetools import TTLCache
from standardwebhooks import Webhook

from inference.errors import InvalidRequest
from storage.jobs import DONE, FAILED, Job

logger = logging.getLogger(__name__)

NOTIFIED_STATES = (DONE, FAILED)
MAX_PENDING = 10_000  # deliveries waiting to be sent or retried in this process
LEDGER_TTL_SECONDS = 2 * 24 * 3600  # longer than a job lives


@dataclass(frozen=True)
class WebhookSettings:
    allowed_hosts: tuple[str, ...] = ()  # "host" (any port) or "host:port"; empty: webhooks are refused
    secret: str | None = None  # Standard Webhooks secret, "whsec_" + base64
    max_attempts: int = 5
    backoff_seconds: float = 1.0  # first retry after this, doubling each time
    timeout_seconds: float = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_hosts and self.secret)

    def problems(self) -> list[str]:
        if not self.allowed_hosts:
            return []
        if not self.secret:
            return ["WEBHOOK_ALLOWED_HOSTS is set but WEBHOOK_SECRET is not: receivers could not verify "
                    "who called them; set WEBHOOK_SECRET (whsec_ + base64 of 24+ random bytes)"]
        try:
            Webhook(self.secret)
        except Exception:
            return ["WEBHOOK_SECRET is not a Standard Webhooks secret: use whsec_ + base64 of random bytes "
                    "(python -c \"import os,base64;print('whsec_'+base64.b64encode(os.urandom(24)).decode())\")"]
        return []


class WebhookLedger:
    """Who sends a given (request, state): the first to ask. Redis makes it fleet-wide; without Redis,
    or while it is away, this process decides alone (at worst a receiver gets a duplicate)."""

    def __init__(self, client: Any = None, namespace: str = "imagegen") -> None:
        self.client, self.namespace = client, namespace
        self._seen: TTLCache = TTLCache(maxsize=100_000, ttl=LEDGER_TTL_SECONDS)
        self._lock = threading.Lock()

    def first(self, request_id: str, state: str) -> bool:
        key = f"{self.namespace}:webhook:{request_id}:{state}"
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = True
        if self.client is None:
            return True
        try:
            return bool(self.client.set(key, "1", nx=True, ex=LEDGER_TTL_SECONDS))
        except Exception as error:  # Redis away: deliver (at least once beats never)
            logger.warning("webhook ledger unavailable (%s): delivering without it", type(error).__name__)
            return True


def host_of(url: str) -> str:
    """For logs and /status: the host only (a path or query may carry the receiver's token)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


class WebhookNotifier:
    """Sends the deliveries on one background thread; retries wait in a heap by due time."""

    def __init__(self, settings: WebhookSettings, jobs: Any, ledger: WebhookLedger,
                 public_id: Any = lambda job: job.request_id, metrics: Any = None) -> None:
        self.settings, self.jobs, self.ledger, self.public_id = settings, jobs, ledger, public_id
        self.metrics = metrics
        self._signer = Webhook(settings.secret) if settings.enabled else None
        self._due: list[tuple[float, int, str, str, int]] = []  # (due, tiebreak, request_id, state, attempt)
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http = httpx.Client(timeout=settings.timeout_seconds, follow_redirects=False)

    # ---- admission --------------------------------------------------------------------------
    def check(self, url: str) -> None:
        """Refuses a webhook this Space will not call, naming the field (at submit, before queueing)."""
        if not url:
            return
        if not self.settings.enabled:
            raise InvalidRequest("webhook_url", "webhooks are off on this Space (its operator sets "
                                                "WEBHOOK_ALLOWED_HOSTS and WEBHOOK_SECRET)")
        if not self.allowed(url):
            raise InvalidRequest("webhook_url", f"host {host_of(url)!r} is not in this Space's "
                                                "WEBHOOK_ALLOWED_HOSTS")

    def allowed(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return False
        host = (parts.hostname or "").lower()
        return any(entry in (host, f"{host}:{port}") for entry in self.settings.allowed_hosts)

    # ---- the job store's hook ---------------------------------------------------------------
    def job_changed(self, job: Job) -> None:
        """Called with every job a state change produced; schedules its webhook when one is due."""
        url = job.request.get("webhook_url") if isinstance(job.request, dict) else None
        if not url or job.state not in NOTIFIED_STATES:
            return
        if not self.ledger.first(job.request_id, job.state):
            return  # another process (or an earlier change here) sends this one
        self._schedule(job.request_id, job.state, attempt=1, delay=0.0)

    def _schedule(self, request_id: str, state: str, attempt: int, delay: float) -> None:
        with self._changed:
            if len(self._due) >= MAX_PENDING:
                logger.error("webhook for %s dropped: %d deliveries already pending", request_id, MAX_PENDING)
                return
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), request_id, state, attempt))
            self._changed.notify()

    # ---- delivery ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._due:
            logger.warning("%d webhook deliveries still pending at shutdown", len(self._due))
        self._http.close()

    def _run(self) -> None:
        while (item := self._next_due()) is not None:
            request_id, state, attempt = item
            try:
                self._deliver(request_id, state, attempt)
            except Exception:  # never let one delivery end the thread
                logger.exception("webhook delivery for %s crashed", request_id)

    def _next_due(self) -> tuple[str, str, int] | None:
        with self._changed:
            while not self._stop.is_set():
                wait = self._due[0][0] - time.monotonic() if self._due else 0.5
                if self._due and wait <= 0:
                    _, _, request_id, state, attempt = heapq.heappop(self._due)
                    return request_id, state, attempt
                self._changed.wait(min(max(wait, 0.01), 0.5))
        return None

    def _deliver(self, request_id: str, state: str, attempt: int) -> None:
        job = self.jobs.get(request_id)
        if job is None:
            return
        url = job.request.get("webhook_url", "")
        entry: dict[str, Any] = {"state": state, "attempt": attempt, "at": round(time.time(), 3),
                                 "host": host_of(url)}
        if not self.settings.enabled or not self.allowed(url):
            entry.update(delivered=False, error=f"host {host_of(url)!r} is not in WEBHOOK_ALLOWED_HOSTS; not sent")
            self._log(request_id, entry)
            return
        entry.update(self._post(url, self._payload(job, state), f"{request_id}:{state}"))
        last = not entry["delivered"] and attempt >= self.settings.max_attempts
        if not entry["delivered"] and not last:
            entry["retry_in_s"] = self.settings.backoff_seconds * 2 ** (attempt - 1)
        self._log(request_id, entry)
        if self.metrics:
            self.metrics.webhooks.labels("delivered" if entry["delivered"] else "gave_up" if last else "retry").inc()
        if "retry_in_s" in entry:
            self._schedule(request_id, state, attempt + 1, entry["retry_in_s"])
        elif last:
            logger.warning("webhook for %s to %s failed %d times; giving up", request_id, entry["host"], attempt)

    def _payload(self, job: Job, state: str) -> dict[str, Any]:
        public = self.public_id(job)
        result = dict(job.result, request_id=public) if isinstance(job.result, dict) else None
        return {"type": f"image.{state}", "timestamp": datetime.now(UTC).isoformat(),
                "data": {"request_id": public, "state": state, "result": result,
                         "error": job.error if state == FAILED else None}}

    def _post(self, url: str, payload: dict[str, Any], message_id: str) -> dict[str, Any]:
        body = json.dumps(payload, separators=(",", ":"))
        now = datetime.now(UTC)
        headers = {"content-type": "application/json", "webhook-id": message_id,
                   "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": self._signer.sign(message_id, now, body)}
        started = time.perf_counter()
        try:
            response = self._http.post(url, content=body.encode(), headers=headers)
        except httpx.HTTPError as error:
            return {"delivered": False, "error": f"{type(error).__name__} (no answer)",
                    "seconds": round(time.perf_counter() - started, 3)}
        outcome = {"delivered": response.is_success, "status_code": response.status_code,
                   "seconds": round(time.perf_counter() - started, 3)}
        if not response.is_success:
            outcome["error"] = f"HTTP {response.status_code}"
        return outcome

    def _log(self, request_id: str, entry: dict[str, Any]) -> None:
        job = self.jobs.get(request_id)
        if job is not None:
            self.jobs.update(request_id, webhook_deliveries=[*job.webhook_deliveries, entry])


class WebhookJobs:
    """The job store, telling the notifier about every job a create or update left done or failed."""

    def __init__(self, inner: Any, notifier: WebhookNotifier) -> None:
        self.inner, self.notifier = inner, notifier

    def create(self, job: Job) -> Job:
        stored = self.inner.create(job)
        if stored is job:  # a new job (a cache hit is created done)
            self.notifier.job_changed(stored)
        return stored

    def update(self, request_id: str, **changes: Any) -> Job:
        job = self.inner.update(request_id, **changes)
        if "state" in changes:
            self.notifier.job_changed(job)
        return job

    def __getattr__(self, name: str) -> Any:  # get, wait, put, mirror...: unchanged
        return getattr(self.inner, name)
