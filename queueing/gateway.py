"""What the UI and the API call: submit, follow progress, status, cancel."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

from inference.errors import InvalidRequest, QueueFull, QueueUnavailable, UnknownRequest
from inference.presets import ModelIdentity
from inference.request import GenerationRequest
from queueing.experiments import VOTES, Experiment
from queueing.webhooks import host_of
from queueing.worker import Worker
from storage.cache import ResultCache
from storage.health import BackendHealth
from storage.jobs import CANCELLED, DONE, FAILED, QUEUED, Job, JobStore
from storage.keys import fingerprint
from storage.objects import ObjectStore

logger = logging.getLogger(__name__)


class RequestQueue(Protocol):
    def put(self, request: GenerationRequest) -> None: ...

    def depth(self) -> int: ...

    def position(self, request_id: str) -> int | None: ...

    def wait_estimate(self) -> dict[str, Any]:
        """Backlog in front of new work and a rough wait in seconds, for status and the UI."""
        ...


class FallbackQueue:
    """The shared queue, or, while it is unreachable and the operator allowed it, this process's own
    queue. Without a fallback the caller gets a clear "try again" error: nothing is dropped silently."""

    def __init__(self, primary: RequestQueue, fallback: RequestQueue | None, health: BackendHealth,
                 name: str = "Kafka") -> None:
        self.primary, self.fallback, self.health, self.name = primary, fallback, health, name
        self.max_size = getattr(primary, "max_size", 0)

    @property
    def running_id(self) -> str | None:
        return getattr(self.fallback, "running_id", None)

    def put(self, request: GenerationRequest) -> None:
        try:
            self.primary.put(request)
        except QueueUnavailable as error:
            self.health.down(self.name, error)
            if self.fallback is None:
                raise
            logger.warning("request %s runs on this Space: %s", request.request_id, error)
            self.fallback.put(request)
            return
        self.health.up(self.name)

    def depth(self) -> int:
        return self.primary.depth() + (self.fallback.depth() if self.fallback else 0)

    def position(self, request_id: str) -> int | None:
        return self.fallback.position(request_id) if self.fallback else None

    def wait_estimate(self) -> dict[str, Any]:
        return self.primary.wait_estimate()

    def start(self) -> None:
        for queue in (self.primary, self.fallback):
            if queue is not None:
                queue.start()

    def stop(self, timeout: float = 10.0) -> None:
        for queue in (self.primary, self.fallback):
            if queue is not None:
                queue.stop(timeout)


class Gateway:
    """inflight: the local worker, when requests run in this process; it lets identical requests share
    one generation. In the fleet (Kafka) it is None: identical requests share a partition instead, so
    the second is a cache hit wherever it runs."""

    def __init__(self, identity: ModelIdentity, cache: ResultCache, jobs: JobStore, objects: ObjectStore,
                 queue: RequestQueue, inflight: Worker | None = None, metrics: Any = None,
                 router: Any = None, remote: Any = None, experiment: Experiment | None = None) -> None:
        self.identity, self.cache, self.jobs, self.objects = identity, cache, jobs, objects
        self.experiment = experiment  # EXPERIMENT: puts a share of the requests in its variant arm
        self.queue, self.inflight, self.metrics = queue, inflight, metrics
        # router (queueing.routing.Router) and remote (queueing.remote.RemoteBackend): a GPU service for
        # peaks, when one is configured. Without them every request goes to the queue.
        self.router, self.remote = router, remote
        self.queue_backend = "local" if inflight is not None else "fleet"

    def submit(self, request: GenerationRequest, owner: str = "", private: bool = False) -> Job:
        """Returns the request's job: done at once on a cache hit, else queued (or joined to an
        identical request already in flight). Resubmitting a request id is idempotent; the same id
        for other pixels, or from another owner, is refused."""
        if request.preset != self.identity.preset:
            raise InvalidRequest(
                "preset", f"{request.preset!r} is not loaded here; this Space serves {self.identity.preset!r}"
            )
        if self.experiment is not None:  # before the fingerprint: the variant arm's styles change the pixels
            request = self.experiment.assign(request)
        fp = fingerprint(request, self.identity)
        existing = self.jobs.get(request.request_id)
        if existing is not None and not self._may_resubmit(existing, fp, owner):
            return existing
        if request.experiment and self.metrics:
            self.metrics.experiment_requests.labels(request.experiment, request.arm).inc()
        who = {"owner": owner, "private": private}
        cached = self.cache.get(fp)
        if cached is not None:
            if self.metrics:
                self.metrics.cache_hits.inc()
                self.metrics.requests.labels("cache_hit").inc()
            result = {**cached, "request_id": request.request_id, "cached": True,
                      # re-signed: a presigned URL stored with the entry may have expired
                      "url": self.objects.url_for(cached["object_key"], cached.get("storage", ""))}
            return self._store_job(request, fp, state=DONE, result=result, finished_at=time.time(), **who)
        job = self._store_job(request, fp, state=QUEUED, **who)
        if self.inflight is None or self.inflight.join_or_lead(fp, request.request_id):
            self._enqueue(request, fp)
        logger.info("request %s queued (fingerprint %s)", request.request_id, fp[:12])
        return self.jobs.get(request.request_id) or job

    def _may_resubmit(self, existing: Job, fp: str, owner: str) -> bool:
        if existing.fingerprint != fp or (existing.owner and existing.owner != owner):
            raise InvalidRequest("request_id", "this id was already used for a different request; an id names "
                                               "one request: use a new id for new settings")
        return existing.state in (FAILED, CANCELLED)  # retrying those starts over; others are in hand

    def _store_job(self, request: GenerationRequest, fp: str, **fields: Any) -> Job:
        job = Job(request_id=request.request_id, fingerprint=fp, total_steps=request.steps,
                  request=request.to_dict(), **fields)
        stored = self.jobs.create(job)
        if stored is not job:  # a failed/cancelled job being retried under the same id
            stored = self.jobs.update(request.request_id, **{
                k: v for k, v in job.to_dict().items() if k not in ("request_id", "version")})
        return stored

    def _enqueue(self, request: GenerationRequest, fp: str) -> None:
        decision = self.router.decide(request) if self.router is not None else None
        backend = decision.backend if decision else self.queue_backend
        self.jobs.update(request.request_id, backend=backend, route=decision.reason if decision else "")
        if backend == "remote":
            self.remote.put(request)
            return
        try:
            self.queue.put(request)
        except (QueueFull, QueueUnavailable) as error:
            if self.metrics:
                self.metrics.rejected.labels("busy" if isinstance(error, QueueFull) else "queue_unavailable").inc()
            if self.inflight is not None:
                self.inflight.abandon(fp, str(error))
            else:
                self.jobs.update(request.request_id, state=FAILED, error=str(error), finished_at=time.time())
            raise

    def job(self, request_id: str) -> Job:
        job = self.jobs.get(request_id) if isinstance(request_id, str) else None
        if job is None:
            raise UnknownRequest(f"no request with id {request_id!r} (never submitted, or expired after a day)")
        return job

    def status(self, request_id: str) -> dict[str, Any]:
        job = self.job(request_id)
        status = {
            "request_id": job.request_id,
            "state": job.state,
            "step": job.step,
            "total_steps": job.total_steps,
            "queue_position": self.queue_position(job),
            "worker": job.worker or None,
            "backend": job.backend or None,
            "route": job.route or None,
            "attempts": job.attempts,
            "result": job.result,
            "error": job.error,
            "priority": job.request.get("priority", "interactive"),
            # While running, every PREVIEW_EVERY_STEPS steps: a small JPEG of the image so far (a data: URL).
            "preview": job.preview or None,
        }
        if job.request.get("experiment"):  # the A/B arm it was rendered in
            status["experiment"] = {"name": job.request["experiment"], "arm": job.request.get("arm")}
        if job.feedback:  # the owner's thumbs on it (/feedback)
            status["feedback"] = job.feedback
        if job.request.get("webhook_url"):  # the host only: the URL's path or query may hold the receiver's token
            status["webhook"] = {"host": host_of(job.request["webhook_url"]), "deliveries": job.webhook_deliveries}
        if not job.finished and job.backend != "remote":
            status.update(self.queue.wait_estimate())
        return status

    def feedback(self, request_id: str, vote: str) -> dict[str, Any]:
        """Records the owner's thumbs on a finished image, once: counted in /metrics under the request's
        experiment and arm ("none" outside one), so the arms of an experiment can be compared."""
        if vote not in VOTES:
            raise InvalidRequest("vote", f"must be one of {list(VOTES)}, got {vote!r}")
        job = self.job(request_id)
        if job.state != DONE:
            raise InvalidRequest("request_id", f"only a finished image can be rated; this request is {job.state}")
        if job.feedback and job.feedback != vote:
            raise InvalidRequest("vote", f"this image was already rated {job.feedback!r}: one vote per image")
        if not job.feedback:
            self.jobs.update(request_id, feedback=vote)
            if self.metrics:
                self.metrics.feedback.labels(job.request.get("experiment") or "none", job.request.get("arm") or "none",
                                             vote).inc()
        return self.status(request_id)

    def queue_position(self, job: Job) -> int | None:
        if job.finished:
            return None
        leader = (self.inflight.group_leader(job.fingerprint) if self.inflight else None) or job.request_id
        return self.queue.position(leader)

    def cancel(self, request_id: str) -> dict[str, Any]:
        job = self.job(request_id)
        if job.finished:
            pass
        elif self.inflight is not None:
            self.inflight.cancel(request_id)
        else:
            # Whichever Space runs it sees the flag at its next step; a queued job ends now.
            job = self.jobs.update(request_id, cancel_requested=True)
            if job.state == QUEUED:
                self.jobs.update(request_id, state=CANCELLED, error="cancelled by request", finished_at=time.time())
        return self.status(request_id)

    def follow(self, request_id: str, timeout: float, poll_seconds: float = 1.0) -> Iterator[Job]:
        """Yields the job whenever it changes (and every poll_seconds), until it finishes or timeout."""
        deadline = time.monotonic() + timeout
        job = self.job(request_id)
        yield job
        while not job.finished and time.monotonic() < deadline:
            job = self.jobs.wait(request_id, job.version, min(poll_seconds, deadline - time.monotonic())) or job
            yield job
