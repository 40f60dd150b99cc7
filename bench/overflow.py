"""Overflow to the GPU service: the wait users see at twice the fleet's capacity, with and without routing
by queue depth, and what a routing decision costs.

    python3 -m bench.overflow [--requests 120] [--image-seconds 0.2] [--remote-seconds 0.3]

Runs the real Gateway, Worker, LocalQueue, Router and RemoteBackend in this process, with a simulated
generator (a sleep of --image-seconds per image, one worker) and a simulated prediction service (a sleep
of --remote-seconds, several at once). Requests arrive at twice the worker's capacity. Prints the wait
(submit to done) p50/p95/max without overflow and with OVERFLOW_AFTER_SECONDS, the routing decision's
overhead p50/p99, and the time from the estimated wait first crossing the threshold to the first
request sent to the GPU service.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from inference.images import encode
from inference.presets import ModelIdentity, get_preset
from inference.request import GenerationRequest
from queueing.gateway import Gateway
from queueing.local import LocalQueue
from queueing.remote import RemoteBackend
from queueing.routing import Router
from queueing.worker import Worker
from storage.cache import MemoryResultCache
from storage.health import BackendHealth
from storage.jobs import MemoryJobStore
from storage.limits import MemoryRateLimiter
from storage.objects import LocalObjectStore


class SleepingGenerator:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def generate(self, request, on_step, should_cancel) -> Image.Image:
        time.sleep(self.seconds)
        return Image.new("RGB", (request.width, request.height))


class SleepingService:
    name = "simulated"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def healthy(self) -> bool:
        return True

    def run(self, request, on_progress, should_cancel) -> bytes:
        time.sleep(self.seconds)
        return encode(Image.new("RGB", (request.width, request.height)), request.output_format, "simulated")


class WatchedEstimate:
    """The queue's own estimate, noting when it first crossed the threshold."""

    def __init__(self, queue: LocalQueue, threshold: float) -> None:
        self.queue, self.threshold = queue, threshold
        self.crossed_at: float | None = None

    def __call__(self) -> dict:
        estimate = self.queue.wait_estimate()
        if self.crossed_at is None and estimate["estimated_wait_s"] > self.threshold:
            self.crossed_at = time.perf_counter()
        return estimate


def run(args: argparse.Namespace, overflow: float | None, folder: Path) -> dict:
    identity = ModelIdentity.resolve(get_preset("turbo"), "simulated/sdxl")
    cache, jobs = MemoryResultCache(10_000, 3600), MemoryJobStore()
    objects = LocalObjectStore(folder, "http://127.0.0.1/outputs")
    worker = Worker(SleepingGenerator(args.image_seconds), identity, "Euler a", cache, jobs, objects)
    queue = LocalQueue(worker.handle, max_size=10_000)
    queue.mean_seconds = args.image_seconds  # a warmed-up Space knows its time per image
    gateway = Gateway(identity, cache, jobs, objects, queue, inflight=worker)
    estimate = WatchedEstimate(queue, overflow if overflow is not None else float("inf"))
    decisions: list[float] = []
    first_remote: list[float] = []
    if overflow is not None:
        remote = RemoteBackend(SleepingService(args.remote_seconds), identity, cache, jobs, objects, fallback=queue,
                               health=BackendHealth(), group=worker, concurrency=16, fallback_name="local")
        router = Router(estimate, remote.available, MemoryRateLimiter(0), overflow, 0.0, 0, queue_backend="local")
        decide = router.decide

        def timed(request):
            started = time.perf_counter()
            decision = decide(request)
            decisions.append(time.perf_counter() - started)
            if decision.remote and not first_remote:
                first_remote.append(time.perf_counter())
            return decision

        router.decide = timed
        gateway.router, gateway.remote = router, remote
    queue.start()
    submitted: dict[str, float] = {}
    interval = args.image_seconds / 2  # twice the capacity of the one worker
    for i in range(args.requests):
        request = GenerationRequest.create(f"overflow {i}", preset="turbo", seed=i, width=256, height=256)
        submitted[request.request_id] = time.perf_counter()
        gateway.submit(request)
        time.sleep(interval)
    waits = _waits(jobs, submitted)
    queue.stop()
    backends = [jobs.get(rid).backend for rid in submitted]
    return {"waits": waits, "decisions": decisions, "remote": backends.count("remote"),
            "reaction": (first_remote[0] - estimate.crossed_at) if first_remote and estimate.crossed_at else None}


def _waits(jobs: MemoryJobStore, submitted: dict[str, float]) -> list[float]:
    """Submit to done, per request (the job's own clock), once all are finished."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not all(jobs.get(rid).finished for rid in submitted):
        time.sleep(0.05)
    return [job.finished_at - job.created_at for rid in submitted if (job := jobs.get(rid)).finished]


def _redis_budget_decisions(url: str, count: int = 2000) -> list[float]:
    """Every decision goes remote here, so each one takes from the fleet-wide budget (one Lua call)."""
    import redis

    from storage.limits import RedisRateLimiter

    budget = RedisRateLimiter(redis.Redis.from_url(url), f"bench-{time.time_ns()}", limit=10**9)
    router = Router(lambda: {"backlog": 0, "workers": 0, "estimated_wait_s": 0.0}, lambda: True, budget,
                    None, 0.0, 10**9)
    timings = []
    for i in range(count):
        request = GenerationRequest.create(f"decision {i}", preset="turbo", seed=i)
        started = time.perf_counter()
        router.decide(request)
        timings.append((time.perf_counter() - started) * 1e6)
    return timings


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--image-seconds", type=float, default=0.2)
    parser.add_argument("--remote-seconds", type=float, default=0.3)
    parser.add_argument("--overflow-after", type=float, default=1.0)
    parser.add_argument("--redis-url", help="also time decisions whose budget is in this Redis (fleet-wide)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = run(args, None, Path(tmp) / "base")
        hybrid = run(args, args.overflow_after, Path(tmp) / "hybrid")
    from bench.soak import _cpu_name

    print(f"{args.requests} requests at 2x the capacity of one worker ({args.image_seconds:g} s/image); "
          f"GPU service {args.remote_seconds:g} s/image; on {_cpu_name()}")
    for name, outcome in (("fleet only", base), (f"OVERFLOW_AFTER_SECONDS={args.overflow_after:g}", hybrid)):
        waits = outcome["waits"]
        print(f"  {name:28s} wait p50 {_percentile(waits, 50):6.2f} s  p95 {_percentile(waits, 95):6.2f} s  "
              f"max {max(waits):6.2f} s  remote {outcome['remote']}/{args.requests}")
    ratio = _percentile(base["waits"], 95) / _percentile(hybrid["waits"], 95)
    print(f"  p95 wait, fleet only / with overflow: {ratio:.1f}x")
    decisions = [d * 1e6 for d in hybrid["decisions"]]
    print(f"  routing decision: p50 {_percentile(decisions, 50):.0f} us, p99 {_percentile(decisions, 99):.0f} us "
          f"({len(decisions)} decisions, in-memory budget)")
    if args.redis_url:
        redis_decisions = _redis_budget_decisions(args.redis_url)
        print(f"  routing decision with the budget in Redis: p50 {_percentile(redis_decisions, 50):.0f} us, "
              f"p99 {_percentile(redis_decisions, 99):.0f} us ({len(redis_decisions)} decisions)")
    if hybrid["reaction"] is not None:
        print(f"  threshold crossed -> first remote request: {hybrid['reaction'] * 1000:.1f} ms after the "
              f"estimate first read above it (each decision reads the estimate; in a Kafka fleet the "
              f"estimate itself lags by up to the backlog's 3 s refresh and the 5 s heartbeats)")


if __name__ == "__main__":
    main()
