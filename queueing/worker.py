"""Worker.handle: the single path every request takes: cache -> generate -> store -> publish."""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

from PIL import Image

from inference.errors import Cancelled, GenerationError, GenerationFailed
from inference.images import CONTENT_TYPES, encode, init_image_key, parameters_text, preview_data_url
from inference.logcontext import request_context
from inference.presets import ModelIdentity
from inference.request import GenerationRequest, GenerationResult
from storage.cache import ResultCache
from storage.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobStore
from storage.keys import fingerprint, object_key
from storage.objects import ObjectStore, StoreUnavailable

logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """The worker is shutting down: the job went back to queued for another worker to take."""


class RetryLater(Exception):
    """A retriable failure with attempts left: the job is back to queued, the caller re-queues it."""


class ImageGenerator(Protocol):
    def generate(self, request: GenerationRequest, on_step, should_cancel,
                 init_image: Image.Image | None = None) -> Image.Image: ...


class Worker:
    """Runs requests one at a time. Requests with the same fingerprint that arrive while one is
    queued or running join it as a group and share its single generation."""

    def __init__(
        self,
        generator: ImageGenerator,
        identity: ModelIdentity,
        sampler_label: str,
        cache: ResultCache,
        jobs: JobStore,
        objects: ObjectStore,
        name: str = "local",
        claims: Any = None,
        metrics: Any = None,
        backend: str = "local",
    ) -> None:
        self.generator, self.identity, self.sampler_label = generator, identity, sampler_label
        self.cache, self.jobs, self.objects, self.name = cache, jobs, objects, name
        self.claims = claims  # RedisClaims in the fleet: identical requests on two workers run once
        self.metrics = metrics  # queueing.metrics.Metrics, or None
        self.backend = backend  # "local" for a Space's own queue, "fleet" for a shared-queue worker
        self.generations = 0  # pipeline calls made, for tests and metrics
        self.mean_seconds = 10.0  # moving average of generation time, for fleet wait estimates
        self._groups: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._interrupted = threading.Event()

    def interrupt(self) -> None:
        """Stop the generation in hand at its next step and hand the job back (shutdown)."""
        self._interrupted.set()

    # ---- groups of identical requests ------------------------------------------------------
    def join_or_lead(self, fingerprint_: str, request_id: str) -> bool:
        """True if request_id leads a new group (the caller must enqueue it); False if it joined one."""
        with self._lock:
            members = self._groups.get(fingerprint_)
            if members is None:
                self._groups[fingerprint_] = [request_id]
                return True
            if request_id not in members:
                members.append(request_id)
            return False

    def group_leader(self, fingerprint_: str) -> str | None:
        with self._lock:
            members = self._groups.get(fingerprint_)
            return members[0] if members else None

    def finish_group(self, fingerprint_: str, state: str, result: dict | None = None, error: str | None = None) -> None:
        """End every request grouped under fingerprint_ (the remote backend made or failed the image)."""
        self._finish_group(fingerprint_, state, result=result, error=error)

    def abandon(self, fingerprint_: str, reason: str) -> None:
        """The leader could not be enqueued: fail the whole group with reason."""
        self._finish_group(fingerprint_, FAILED, error=reason)

    def cancel(self, request_id: str) -> None:
        job = self.jobs.update(request_id, cancel_requested=True)
        members = self._members(job.fingerprint)
        others_active = any(
            (other := self.jobs.get(m)) is None or not other.cancel_requested
            for m in members if m != request_id
        )
        # A running job alone in its group stops at the next step (the worker marks it);
        # otherwise this member leaves now and the generation goes on for the others.
        if job.state == QUEUED or others_active or request_id not in members:
            self.jobs.update(request_id, state=CANCELLED, finished_at=time.time(), error="cancelled by request")

    # ---- the one path ------------------------------------------------------------------------
    def handle(self, request: GenerationRequest, final_attempt: bool = True) -> None:
        """Leaves the job (and every identical job grouped with it) done, failed or cancelled;
        or, for a retriable failure when final_attempt is False, queued again and raises RetryLater."""
        fp = fingerprint(request, self.identity)
        self.join_or_lead(fp, request.request_id)
        with request_context(request.request_id):
            self._handle_logged(request, fp, final_attempt)

    def _handle_logged(self, request: GenerationRequest, fp: str, final_attempt: bool) -> None:
        try:
            self._handle_group(request, fp)
        except Cancelled as error:
            if self._interrupted.is_set():  # a shutdown is no failure: its attempt does not count
                self._undo_attempt(request.request_id)
                self._requeue_group(fp, "the worker shut down; another worker will take it")
                raise Interrupted(str(error)) from error
            self._finish_group(fp, CANCELLED, error=str(error))
        except StoreUnavailable as error:  # the image is made and kept here; only its upload failed
            logger.warning("request %s: %s", request.request_id, error)
            self._undo_attempt(request.request_id)
            self._requeue_group(fp, f"{error} (the image is kept and uploaded on the next try)")
            raise RetryLater(str(error)) from error
        except GenerationError as error:
            logger.warning("request %s failed: %s", request.request_id, error)
            if error.retriable and not final_attempt:
                self._requeue_group(fp, f"an attempt failed ({error}); retrying")
                raise RetryLater(str(error)) from error
            self._finish_group(fp, FAILED, error=str(error))
        except Exception as error:  # never let one bad request kill the worker thread
            logger.exception("request %s crashed", request.request_id)
            self._finish_group(fp, FAILED, error=f"internal error ({type(error).__name__}); it was logged")

    def _handle_group(self, request: GenerationRequest, fp: str) -> None:
        if self._all_cancelled(fp):
            raise Cancelled(f"request {request.request_id} was cancelled before it started")
        if request.preset != self.identity.preset:  # another worker of the fleet may serve it
            raise GenerationFailed(f"preset {request.preset!r} is not served by worker {self.name} "
                                   f"(it serves {self.identity.preset!r})")
        cached = self.cache.get(fp) or self._claim(request, fp)
        self._count("cache_hits" if cached is not None else "cache_misses")
        if cached is not None:
            # Re-sign: a presigned URL stored with the entry may have expired since.
            url = self.objects.url_for(cached["object_key"], cached.get("storage", ""))
            self._finish_group(fp, DONE, result={**cached, "url": url, "cached": True})
            return
        try:
            self._start_attempt(request.request_id)
            self._mark_group(fp, state=RUNNING, step=0, total_steps=request.steps, worker=self.name,
                             started_at=time.time())
            self._observe_queue_wait(request.request_id)
            with self._renewing_claim(fp, request):
                result = self._generate_and_store(request, fp)
            if result["persisted"]:  # an image only this Space holds must not be served to the fleet
                self.cache.put(fp, result)
        finally:
            if self.claims is not None:  # after the cache put: whoever waits finds the result
                self.claims.release(fp, self._claim_token(request))
        self._finish_group(fp, DONE, result=result)

    @contextlib.contextmanager
    def _renewing_claim(self, fp: str, request: GenerationRequest) -> Iterator[None]:
        """Renews the claim in the background: one CPU step or the VAE decode can outlast its TTL."""
        if self.claims is None:
            yield
            return
        stop = threading.Event()
        interval = max(0.5, getattr(self.claims, "ttl_seconds", 30) / 3)

        def renew() -> None:
            while not stop.wait(interval):
                self.claims.renew(fp, self._claim_token(request))

        thread = threading.Thread(target=renew, name="claim-renewer", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()

    def _claim(self, request: GenerationRequest, fp: str) -> dict[str, Any] | None:
        """Holds the fleet-wide claim on fp and returns None, or returns the result that the claim's
        holder produced meanwhile. The claim is this worker's hold on this request: the same request
        redelivered to another worker (a rebalance) waits for it too, so a request runs at most once at
        a time fleet-wide; a dead holder's claim expires within the claim TTL."""
        if self.claims is None:
            return None
        token, waited = self._claim_token(request), False
        while True:
            holder = self.claims.claim(fp, token)
            # Checked after claiming too: the holder may have finished and released just before.
            cached = self.cache.get(fp)
            if cached is not None:
                if holder is None:
                    self.claims.release(fp, token)
                return cached
            if holder is None:
                return None
            if self._all_cancelled(fp):
                raise Cancelled(f"request {request.request_id} was cancelled while another worker ran it")
            holder_id = holder.split("@", 1)[0]
            if not waited:
                logger.info("request %s: %s holds it; waiting for that result", request.request_id, holder)
                waited = True
            holder_job = self.jobs.get(holder_id)
            self.jobs.wait(holder_id, holder_job.version if holder_job else 0, 1.0)

    def _claim_token(self, request: GenerationRequest) -> str:
        return f"{request.request_id}@{self.name}"

    def _start_attempt(self, request_id: str) -> None:
        """An attempt is a generation that started: redeliveries that only waited count none."""
        job = self.jobs.get(request_id)
        if job is not None:
            self.jobs.update(request_id, attempts=job.attempts + 1)
        if self.metrics:
            self.metrics.attempts.inc()

    def _undo_attempt(self, request_id: str) -> None:
        job = self.jobs.get(request_id)
        if job is not None and job.attempts:
            self.jobs.update(request_id, attempts=job.attempts - 1)

    def _generate_and_store(self, request: GenerationRequest, fp: str) -> dict[str, Any]:
        started = time.perf_counter()
        key = object_key(fp, request.output_format)
        local_copy = getattr(self.objects, "local_copy", lambda _key: None)
        data = local_copy(key)  # made by an earlier attempt whose upload failed: no second render
        if data is None:
            data = self._render(request, fp)
        generated = time.perf_counter()
        stored_object = self.objects.put(key, data, CONTENT_TYPES[request.output_format])
        stored = time.perf_counter()
        logger.info("request %s generated in %.2f s", request.request_id, generated - started)
        return GenerationResult(
            request_id=request.request_id, fingerprint=fp, seed=request.seed, url=stored_object.url, object_key=key,
            content_type=CONTENT_TYPES[request.output_format], width=request.width, height=request.height,
            steps=request.steps, preset=request.preset, model=self.identity.model_id, model_revision=self.identity.model_revision, worker=self.name,
            backend=self.backend, storage=stored_object.storage, persisted=stored_object.persisted,
            timings={"generate_s": round(generated - started, 4), "store_s": round(stored - generated, 4)},
        ).to_dict()

    def _render(self, request: GenerationRequest, fp: str) -> bytes:
        init_image = self._init_image(request)
        started = time.perf_counter()
        self.generations += 1
        image = self.generator.generate(
            request,
            on_step=lambda step, total: self._on_step(request, fp, step, total),
            should_cancel=lambda: self._interrupted.is_set() or self._all_cancelled(fp),
            **({"init_image": init_image} if init_image is not None else {}),
            # Only to generators that make previews (PREVIEWS=1 and a tiny VAE loaded).
            **({"on_preview": lambda jpeg: self._mark_group(fp, preview=preview_data_url(jpeg))}
               if getattr(self.generator, "previews", False) else {}),
        )
        seconds = time.perf_counter() - started
        self.mean_seconds = 0.7 * self.mean_seconds + 0.3 * seconds
        if self.metrics:
            self.metrics.generation_seconds.labels(request.preset).observe(seconds)
        return encode(image, request.output_format, parameters_text(request, self.sampler_label, self.identity.label,
                                                                  self.identity.commit_of("model") or ""))

    def _init_image(self, request: GenerationRequest) -> Image.Image | None:
        """An img2img request's start image, from the object store (a message carries only its hash)."""
        if not request.init_image:
            return None
        try:
            data = self.objects.get(init_image_key(request.init_image))
        except StoreUnavailable:
            raise
        except Exception as error:  # a missing key reads differently on disk, S3 and the failover store
            raise GenerationFailed(f"init_image {request.init_image[:12]}... is not in the object store "
                                   f"({type(error).__name__}); upload it again") from error
        return Image.open(io.BytesIO(data)).convert("RGB")

    def _count(self, counter: str) -> None:
        if self.metrics:
            getattr(self.metrics, counter).inc()

    def _observe_queue_wait(self, request_id: str) -> None:
        job = self.jobs.get(request_id)
        if self.metrics and job is not None and job.started_at:
            self.metrics.queue_wait_seconds.observe(max(0.0, job.started_at - job.created_at))

    def _on_step(self, request: GenerationRequest, fp: str, step: int, total: int) -> None:
        self._mark_group(fp, step=step, total_steps=total)

    # ---- job state for every member of a group ---------------------------------------------
    def _members(self, fp: str) -> list[str]:
        with self._lock:
            return list(self._groups.get(fp, []))

    def _all_cancelled(self, fp: str) -> bool:
        jobs = [self.jobs.get(m) for m in self._members(fp)]
        return bool(jobs) and all(job is None or job.cancel_requested for job in jobs)

    def _mark_group(self, fp: str, **changes: Any) -> None:
        for member in self._members(fp):
            job = self.jobs.get(member)
            if job is not None and not job.finished:
                self.jobs.update(member, **changes)

    def _requeue_group(self, fp: str, note: str) -> None:
        with self._lock:
            members = self._groups.pop(fp, [])
        for member in members:
            job = self.jobs.get(member)
            if job is not None and not job.finished:
                self.jobs.update(member, state=QUEUED, step=0, error=note)

    def _finish_group(self, fp: str, state: str, result: dict | None = None, error: str | None = None) -> None:
        with self._lock:
            members = self._groups.pop(fp, [])
        for member in members:
            job = self.jobs.get(member)
            if job is None or job.finished:
                continue
            member_result = {**result, "request_id": member} if result else None
            self.jobs.update(member, state=state, result=member_result, error=error, finished_at=time.time(),
                             preview="")  # the image (or the error) replaces it
            if self.metrics:
                self.metrics.requests.labels(state).inc()
