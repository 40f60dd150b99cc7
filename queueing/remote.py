"""The GPU prediction service for peaks: a self-hosted Cog server or hosted Replicate, behind the same
queue interface the gateway uses for the fleet.

A request routed here keeps its one job: it runs (`backend: remote`, progress where the service reports
it), its image is stored under the request's fingerprint key and cached fleet-wide like any other, and
`/cancel` cancels the prediction. Whenever the service fails, is too slow or is unreachable, the request
goes to the fleet queue instead: the user waits longer but loses nothing.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import httpx

from inference.errors import Cancelled, GenerationError
from inference.images import CONTENT_TYPES
from inference.presets import ModelIdentity
from inference.request import GenerationRequest, GenerationResult
from storage.health import BackendHealth
from storage.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobStore
from storage.keys import fingerprint, object_key

logger = logging.getLogger(__name__)

STEP_LINE = re.compile(r"step (\d+)/(\d+)")  # what deploy/cog/predict.py prints per step
QUEUE_WORDS = {"fleet": "fleet", "local": "worker of this Space"}
ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


class RemoteFailed(GenerationError):
    """The prediction service did not make the image (down, slow, refused, or failed): use the fleet."""

    retriable = True


def cog_input(request: GenerationRequest) -> dict[str, Any]:
    """The predictor's inputs for a request: every pixel field explicit, so the image is the one the
    fleet would make."""
    return {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "preset": request.preset,
            "width": request.width, "height": request.height, "steps": request.steps,
            "guidance_scale": request.guidance_scale, "seed": request.seed,
            "output_format": request.output_format}


def last_progress(logs: str | None) -> tuple[int, int] | None:
    matches = STEP_LINE.findall(logs or "")
    return (int(matches[-1][0]), int(matches[-1][1])) if matches else None


def read_output(output: Any, http: httpx.Client) -> bytes:
    """A Cog output file: a data URI (a Cog server without upload URL) or a URL (Replicate)."""
    if isinstance(output, list) and output:
        output = output[0]
    if not isinstance(output, str):
        raise RemoteFailed(f"the prediction returned no image ({type(output).__name__})")
    if output.startswith("data:"):
        return base64.b64decode(output.split(",", 1)[1])
    response = http.get(output)
    response.raise_for_status()
    return response.content


class PredictionService(Protocol):
    name: str  # "cog" or "replicate": the job's worker reads remote:<name>

    def run(self, request: GenerationRequest, on_progress: ProgressCallback, should_cancel: CancelCheck) -> bytes:
        """The encoded image; raises Cancelled when should_cancel turned true, RemoteFailed otherwise."""
        ...

    def healthy(self) -> bool: ...


class CogPredictions:
    """A self-hosted Cog server (`python -m cog.server.http`). `PUT /predictions/<request id>` is
    idempotent, so a retried request never starts a second prediction; the call waits for the
    prediction (Cog reports no progress to a waiting caller, only to webhooks); a cancel is
    `POST /predictions/<id>/cancel`."""

    name = "cog"

    def __init__(self, base_url: str, timeout_seconds: float, http: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_seconds = timeout_seconds
        self.http = http or httpx.Client(timeout=httpx.Timeout(timeout_seconds, connect=5.0))
        self._health: tuple[float, bool] = (0.0, False)

    def healthy(self) -> bool:
        """READY per /health-check, asked at most every 5 s (every routing decision reads it)."""
        checked_at, ready = self._health
        if time.monotonic() - checked_at < 5.0:
            return ready
        try:
            ready = self.http.get(f"{self.base_url}/health-check", timeout=2.0).json().get("status") == "READY"
        except (httpx.HTTPError, ValueError):
            ready = False
        self._health = (time.monotonic(), ready)
        return ready

    def mark_unhealthy(self) -> None:
        self._health = (time.monotonic(), False)

    def run(self, request: GenerationRequest, on_progress: ProgressCallback, should_cancel: CancelCheck) -> bytes:
        url = f"{self.base_url}/predictions/{request.request_id}"
        done = threading.Event()
        cancelled = threading.Event()
        threading.Thread(target=self._cancel_when_asked, args=(url, should_cancel, done, cancelled),
                         name="cog-cancel", daemon=True).start()
        try:
            response = self.http.put(url, json={"id": request.request_id, "input": cog_input(request)})
        except httpx.HTTPError as error:  # down, or slower than REMOTE_TIMEOUT_SECONDS
            self.mark_unhealthy()
            self._cancel_quietly(url)  # a slow prediction would hold the GPU for an image nobody takes
            raise RemoteFailed(f"the Cog server did not answer in time ({type(error).__name__})") from error
        finally:
            done.set()
        return self._output(response, cancelled)

    def _output(self, response: httpx.Response, cancelled: threading.Event) -> bytes:
        body = _json(response)
        status = body.get("status")
        if cancelled.is_set() or status == "canceled":
            raise Cancelled("cancelled by request (the GPU service stopped it)")
        if response.status_code >= 300 or status != "succeeded":
            raise RemoteFailed(f"the Cog server answered {response.status_code} {status}: "
                               f"{str(body.get('error') or '')[:200]}")
        last = last_progress(body.get("logs"))
        logger.info("Cog prediction done (%s steps)", last[0] if last else "?")
        return read_output(body.get("output"), self.http)

    def _cancel_quietly(self, url: str) -> None:
        try:
            self.http.post(f"{url}/cancel", timeout=5.0)
        except httpx.HTTPError as error:
            logger.warning("could not cancel the Cog prediction: %s", type(error).__name__)

    def _cancel_when_asked(self, url: str, should_cancel: CancelCheck, done: threading.Event,
                           cancelled: threading.Event) -> None:
        while not done.wait(0.5):
            if should_cancel():
                cancelled.set()
                self._cancel_quietly(url)
                return


class ReplicatePredictions:
    """Hosted Replicate through the official client. REPLICATE_MODEL is `owner/name` (the model's
    latest version), `owner/name:<version id>`, or `deployments/owner/name` (a deployment)."""

    name = "replicate"

    def __init__(self, client: Any, model: str, timeout_seconds: float, poll_seconds: float = 1.0,
                 http: httpx.Client | None = None) -> None:
        self.client, self.model = client, model
        self.timeout_seconds, self.poll_seconds = timeout_seconds, poll_seconds
        self.http = http or httpx.Client(timeout=30.0, follow_redirects=True)
        self._failed_at = 0.0

    def healthy(self) -> bool:
        return time.monotonic() - self._failed_at > 30.0  # a hosted API: trust it, unless it just failed

    def _create(self, request: GenerationRequest):
        inputs = cog_input(request)
        if self.model.startswith("deployments/"):
            return self.client.deployments.predictions.create(self.model.removeprefix("deployments/"), input=inputs)
        if ":" in self.model:
            return self.client.predictions.create(version=self.model.split(":", 1)[1], input=inputs)
        return self.client.models.predictions.create(model=self.model, input=inputs)

    def run(self, request: GenerationRequest, on_progress: ProgressCallback, should_cancel: CancelCheck) -> bytes:
        try:
            prediction = self._create(request)
            return self._follow(prediction, on_progress, should_cancel)
        except (Cancelled, RemoteFailed):
            raise
        except Exception as error:  # replicate.exceptions.ReplicateError, httpx errors
            self._failed_at = time.monotonic()
            raise RemoteFailed(f"Replicate failed ({type(error).__name__}: {str(error)[:200]})") from error

    def _follow(self, prediction, on_progress: ProgressCallback, should_cancel: CancelCheck) -> bytes:
        deadline = time.monotonic() + self.timeout_seconds
        while prediction.status not in ("succeeded", "failed", "canceled"):
            if should_cancel():
                prediction.cancel()
                raise Cancelled("cancelled by request (the GPU service stopped it)")
            if time.monotonic() > deadline:
                prediction.cancel()
                raise RemoteFailed(f"Replicate took longer than {self.timeout_seconds:.0f} s")
            time.sleep(self.poll_seconds)
            prediction.reload()
            progress = last_progress(prediction.logs)
            if progress:
                on_progress(*progress)
        if prediction.status != "succeeded":
            raise RemoteFailed(f"the Replicate prediction {prediction.status}: {str(prediction.error or '')[:200]}")
        return read_output(prediction.output, self.http)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"status": "failed", "error": response.text[:200]}
    return body if isinstance(body, dict) else {"status": "failed", "error": "not an object"}


class RemoteBackend:
    """Runs requests on the prediction service, a few at a time (each mostly waits on the network).
    fallback is the fleet (or this Space's own) queue: every request the service does not finish goes
    there, with the job back to queued and the reason in its error field."""

    def __init__(self, service: PredictionService, identity: ModelIdentity, cache: Any, jobs: JobStore,
                 objects: Any, fallback: Any, health: BackendHealth, metrics: Any = None,
                 group: Any = None, concurrency: int = 4, cost_per_image: float = 0.0,
                 fallback_name: str = "fleet") -> None:
        self.service, self.identity, self.cache, self.jobs, self.objects = service, identity, cache, jobs, objects
        self.fallback, self.health, self.metrics, self.group = fallback, health, metrics, group
        self.cost_per_image, self.fallback_name = cost_per_image, fallback_name
        self.on_finished: Callable[[Any], None] | None = None  # the entrance publishes topic requests' results
        self.leases: Any = None  # storage.redis_store.RemoteLeases in a fleet: another member rescues our work
        self.max_size = getattr(fallback, "max_size", 0)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="remote")
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def worker_name(self) -> str:
        return f"remote:{self.service.name}"

    def available(self) -> bool:
        return not self._stopping.is_set() and self.service.healthy()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._running)

    def put(self, request: GenerationRequest) -> None:
        with self._lock:
            self._running.add(request.request_id)
            first = len(self._running) == 1
        if self.leases is not None:
            try:
                self.leases.hold(request.request_id)
            except Exception as error:  # Redis away: the prediction runs without a rescue net
                logger.warning("could not lease %s: %s", request.request_id, type(error).__name__)
            if first:
                threading.Thread(target=self._renew_leases, name="remote-leases", daemon=True).start()
        self._pool.submit(self._run, request)

    def _renew_leases(self) -> None:
        """While predictions are in flight, their leases stay fresh (Redis away: a lease may lapse, and a
        rescue then only makes a duplicate the cache absorbs)."""
        while True:
            time.sleep(max(0.5, self.leases.ttl_seconds / 3))
            with self._lock:
                running = list(self._running)
            if not running:
                return
            try:
                self.leases.hold(*running)
            except Exception as error:
                logger.warning("could not renew the GPU-service leases: %s", type(error).__name__)

    def stop(self, timeout: float = 10.0) -> None:
        """A stopping Space cannot store what its predictions make: each is cancelled at the service and
        its request handed to the fleet queue (waiting up to timeout for the hand-overs)."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, request: GenerationRequest) -> None:
        fp = fingerprint(request, self.identity)
        job = self.jobs.get(request.request_id)
        if job is None or job.finished:  # cancelled (or expired) while it waited for a free slot
            self._forget(request.request_id)
            return
        try:
            if self._stopping.is_set():
                raise RemoteFailed("this Space is stopping")
            self._predict(request, fp)
        except Cancelled as error:
            if self._stopping.is_set() and not self._user_cancelled(request.request_id):
                self._to_fleet(request, fp, RemoteFailed("this Space stopped during the prediction"))
            else:
                self._finish(fp, request.request_id, CANCELLED, error=str(error))
        except Exception as error:  # RemoteFailed, the object store, anything: the fleet takes it
            self._to_fleet(request, fp, error)
        finally:
            self._forget(request.request_id)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._running.discard(request_id)
        if self.leases is not None:
            try:
                self.leases.release(request_id)
            except Exception as error:  # it expires; the rescuer then finds the job finished
                logger.warning("could not release the lease of %s: %s", request_id, type(error).__name__)

    def _predict(self, request: GenerationRequest, fp: str) -> None:
        started = time.perf_counter()
        self.jobs.update(request.request_id, state=RUNNING, step=0, worker=self.worker_name, started_at=time.time())
        data = self.service.run(
            request,
            on_progress=lambda step, total: self.jobs.update(request.request_id, step=step, total_steps=total),
            should_cancel=lambda: self._cancel_requested(request.request_id),
        )
        generated = time.perf_counter()
        key = object_key(fp, request.output_format)
        stored = self.objects.put(key, data, CONTENT_TYPES[request.output_format])
        result = GenerationResult(
            request_id=request.request_id, fingerprint=fp, seed=request.seed, url=stored.url, object_key=key,
            content_type=CONTENT_TYPES[request.output_format], width=request.width, height=request.height,
            steps=request.steps, preset=request.preset, model=self.identity.model_id, model_revision=self.identity.model_revision, worker=self.worker_name,
            backend="remote", storage=stored.storage, persisted=stored.persisted,
            timings={"generate_s": round(generated - started, 4), "store_s": round(time.perf_counter() - generated, 4)},
        ).to_dict()
        if stored.persisted:
            self.cache.put(fp, result)
        self.health.up("GPU service")
        if self.metrics:
            self.metrics.estimated_cost.labels("remote").inc(self.cost_per_image)
            self.metrics.generation_seconds.labels(request.preset).observe(generated - started)
        logger.info("request %s made by %s in %.2f s", request.request_id, self.worker_name, generated - started)
        self._finish(fp, request.request_id, DONE, result=result)

    def _cancel_requested(self, request_id: str) -> bool:
        return self._stopping.is_set() or self._user_cancelled(request_id)

    def _user_cancelled(self, request_id: str) -> bool:
        job = self.jobs.get(request_id)
        return job is None or job.cancel_requested

    def _finish(self, fp: str, request_id: str, state: str, result: dict | None = None,
                error: str | None = None) -> None:
        if self.group is not None:  # this Space's identical requests share the one image
            self.group.finish_group(fp, state, result=result, error=error)
            return
        job = self.jobs.get(request_id)
        if job is not None and not job.finished:
            job = self.jobs.update(request_id, state=state, result=result, error=error, finished_at=time.time())
        if self.metrics:
            self.metrics.requests.labels(state).inc()
        if job is not None and job.owner == "kafka" and self.on_finished is not None:
            self.on_finished(job)

    def _to_fleet(self, request: GenerationRequest, fp: str, error: BaseException) -> None:
        reason = str(error) if isinstance(error, GenerationError) else f"{type(error).__name__}: {str(error)[:200]}"
        self.health.down("GPU service", error)
        logger.warning("request %s: %s; sending it to the fleet queue", request.request_id, reason)
        self.jobs.update(request.request_id, state=QUEUED, step=0, worker="", backend=self.fallback_name,
                         route=f"the GPU service failed ({reason}); queued for the {QUEUE_WORDS[self.fallback_name]}")
        if self.metrics:
            self.metrics.routed.labels(self.fallback_name, "remote failed").inc()
        try:
            self.fallback.put(request)
        except GenerationError as queue_error:  # the fleet queue refused too: say so, never drop silently
            self._finish(fp, request.request_id, FAILED, error=f"{reason}; and the fleet queue: {queue_error}")


class LeaseRescuer:
    """In every fleet member: requests whose Space died while following their GPU prediction (the lease
    ran out) go to the fleet queue, so a kill -9 of a Space loses nothing it routed away."""

    def __init__(self, leases: Any, jobs: JobStore, queue: Any, interval_seconds: float = 5.0) -> None:
        self.leases, self.jobs, self.queue, self.interval_seconds = leases, jobs, queue, interval_seconds
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="lease-rescuer", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                self.rescue()
            except Exception as error:  # Redis or the queue away: the leases wait for the next round
                logger.warning("could not rescue lapsed GPU-service requests: %s", type(error).__name__)

    def rescue(self) -> int:
        rescued = 0
        for request_id in self.leases.expired():
            if not self.leases.take(request_id):
                continue  # another member took it
            job = self.jobs.get(request_id)
            if job is None or job.finished or job.backend != "remote":
                continue
            request = GenerationRequest.from_dict(job.request)
            logger.warning("request %s: the Space following its GPU prediction is gone; queued in the fleet",
                           request_id)
            self.jobs.update(request_id, state=QUEUED, step=0, worker="", backend="fleet",
                             route="the Space that sent it to the GPU service stopped answering; queued in the fleet")
            self.queue.put(request)
            rescued += 1
        return rescued
