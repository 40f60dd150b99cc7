"""Fleet benchmark: what the API + Kafka + Redis + S3 path costs, and how the fleet scales.

    python3 -m bench.fleet_bench

Runs real local services (redis-server, Tansu broker, moto S3) and the tiny SDXL pipeline, and prints:
1. latency the fleet path adds over the pipeline call itself (p50/p99 over N distinct requests via
   gradio_client /generate on an app that consumes its own topic);
2. a cache hit through gradio_client against the same app's no-op /ping endpoint (ratio of medians);
3. throughput of 4 worker processes against 1, with a fixed-time simulated generator.
Writes the same figures to bench/results/fleet.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from PIL import Image

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- 1 and 2: the app over gradio_client ------------------------------------------------------------

def measure_app(fleet, requests: int, hits_count: int) -> dict:
    from gradio_client import Client

    app = fleet.start_app("bench-app")
    fleet.wait_for_workers(["bench-app"])
    client = Client(app.url, verbose=False)
    params = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2,
              "guidance_scale": 5.0}
    for i in range(3):  # warm-up: first requests pay for connections and lazy imports
        client.predict(prompt=f"warm-up {i}", seed=i, **params, api_name="/generate")
    _, jobs = fleet.redis_fleet()
    overheads, pipeline_seconds, queue_hops, stores = [], [], [], []
    for i in range(requests):
        started = time.perf_counter()
        _, meta = client.predict(prompt=f"bench request {i} {uuid.uuid4().hex}", seed=i, **params,
                                 api_name="/generate")
        elapsed = time.perf_counter() - started
        pipeline_seconds.append(meta["timings"]["generate_s"])
        overheads.append(elapsed - meta["timings"]["generate_s"])
        stores.append(meta["timings"]["store_s"])
        job = jobs.get(meta["request_id"])
        queue_hops.append(job.started_at - job.created_at)  # Kafka produce -> consume -> job running
    url_only = Client(app.url, verbose=False, download_files=False)  # a backend that only wants the URL
    hits = {"download": [], "url_only": []}
    pings = []
    for _ in range(hits_count):
        for name, which in (("download", client), ("url_only", url_only)):
            started = time.perf_counter()
            which.predict(prompt="bench request 0 cached", seed=0, **params, api_name="/generate")
            hits[name].append(time.perf_counter() - started)
        started = time.perf_counter()
        client.predict(api_name="/ping")
        pings.append(time.perf_counter() - started)
    noop = statistics.median(pings[1:])
    return {
        "requests": requests,
        "pipeline_p50_s": statistics.median(pipeline_seconds),
        "overhead_p50_ms": 1000 * statistics.median(overheads),
        "overhead_p99_ms": 1000 * percentile(overheads, 0.99),
        "overhead_beyond_noop_p50_ms": 1000 * (statistics.median(overheads) - noop),
        "overhead_beyond_noop_p99_ms": 1000 * (percentile(overheads, 0.99) - noop),
        "queue_hop_p50_ms": 1000 * statistics.median(queue_hops),
        "store_p50_ms": 1000 * statistics.median(stores),
        "cache_hit_p50_ms": 1000 * statistics.median(hits["download"][1:]),
        "cache_hit_url_only_p50_ms": 1000 * statistics.median(hits["url_only"][1:]),
        "noop_p50_ms": 1000 * noop,
        "cache_hit_vs_noop": statistics.median(hits["download"][1:]) / noop,
        "cache_hit_url_only_vs_noop": statistics.median(hits["url_only"][1:]) / noop,
    }


# ---- 3: throughput with a simulated generator ----------------------------------------------------------

class FixedTimeGenerator:
    """Stands in for the pipeline: takes exactly `seconds`, so only the fleet's own costs vary."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def generate(self, request, on_step, should_cancel) -> Image.Image:
        time.sleep(self.seconds)
        on_step(request.steps, request.steps)
        return Image.new("RGB", (64, 64), "gray")


def _sleep_worker(bootstrap: str, prefix: str, redis_url: str, outdir: str, seconds: float, index: int,
                  assigned, stop) -> None:
    import redis

    from inference.presets import ModelIdentity, get_preset
    from queueing.consumer import KafkaWorkerLoop
    from queueing.kafka import KafkaSettings, LazyProducer
    from queueing.worker import Worker
    from storage.objects import LocalObjectStore
    from storage.redis_store import RedisClaims, RedisJobStore, RedisResultCache

    client = redis.Redis.from_url(redis_url)
    settings = KafkaSettings(bootstrap, topic_prefix=prefix, group_id=f"{prefix}.workers",
                             max_poll_interval_ms=6000, session_timeout_ms=6000)
    identity = ModelIdentity.resolve(get_preset("base"), "bench/simulated")
    jobs = RedisJobStore(client, prefix, 3600)
    worker = Worker(FixedTimeGenerator(seconds), identity, "Euler", RedisResultCache(client, prefix, 3600), jobs,
                    LocalObjectStore(Path(outdir), "http://bench/outputs"), name=f"sim-{index}",
                    claims=RedisClaims(client, prefix))
    loop = KafkaWorkerLoop(settings, worker, jobs, LazyProducer(settings))
    loop.start()
    while not stop.wait(0.1):
        assigned[index] = loop.assigned
    loop.stop()


def measure_throughput(bootstrap: str, redis_url: str, workers: int, requests: int, seconds: float,
                       outdir: str) -> float:
    from inference.request import GenerationRequest
    from queueing.client import BackendClient

    prefix = f"tp{workers}-{uuid.uuid4().hex[:6]}"
    context = multiprocessing.get_context("spawn")
    assigned, stop = context.Array("i", workers), context.Event()
    with BackendClient(bootstrap, prefix) as client:  # creates the topics before workers subscribe
        processes = [context.Process(target=_sleep_worker, args=(bootstrap, prefix, redis_url, outdir, seconds,
                                                                  i, assigned, stop)) for i in range(workers)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + 120
        while not (all(assigned[:]) and sum(assigned[:]) == 12) and time.monotonic() < deadline:
            time.sleep(0.2)
        ids = []
        started = time.perf_counter()
        for i in range(requests):
            ids.append(client.submit(GenerationRequest.create(f"simulated {i}", preset="base", width=256,
                                                              height=256, steps=1, seed=i)))
        results = client.wait_all(ids, timeout=requests * seconds * 2 + 60)
        elapsed = time.perf_counter() - started
        stop.set()
        for process in processes:
            process.join(30)
    assert all(r["state"] == "done" for r in results.values())
    loads = sorted(Counter(r["result"]["worker"] for r in results.values()).values())
    print(f"{workers} worker(s): {requests / elapsed:.2f} req/s, requests per worker {loads}")
    return requests / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30, help="distinct requests for the latency figures")
    parser.add_argument("--hits", type=int, default=30, help="cache hits and pings for the ratio")
    parser.add_argument("--throughput-requests", type=int, default=480)
    parser.add_argument("--seconds", type=float, default=0.1, help="simulated generation time")
    args = parser.parse_args()

    from tests.sdxl_builder import build_tiny_sdxl
    from tests.services import Fleet, RedisServer, S3Server, TansuBroker
    from tests.conftest import TinyModel

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_tiny_sdxl(workdir / "tiny")
        tiny = TinyModel(workdir / "tiny" / "sdxl", workdir / "tiny" / "taesd")
        redis_server, s3, broker = RedisServer(workdir), S3Server(), TansuBroker(workdir)
        fleet = Fleet(tiny, workdir, broker.bootstrap, redis_server.url, s3, s3.bucket())
        try:
            figures = measure_app(fleet, args.requests, args.hits)
            fleet.stop_all()
            one = measure_throughput(broker.bootstrap, redis_server.url, 1, args.throughput_requests,
                                     args.seconds, str(workdir / "sim"))
            four = measure_throughput(broker.bootstrap, redis_server.url, 4, args.throughput_requests,
                                      args.seconds, str(workdir / "sim"))
        finally:
            fleet.stop_all()
            broker.stop()
            s3.stop()
            redis_server.stop()
    figures.update(throughput_1_per_s=one, throughput_4_per_s=four, scaling_4_vs_1=four / one,
                   simulated_seconds=args.seconds, throughput_requests=args.throughput_requests)
    print_table(figures)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(figures, indent=2))


def print_table(f: dict) -> None:
    rows = [
        ("API+fleet path over pipeline call p50", f"{f['overhead_p50_ms']:.1f} ms", "<= 40 ms"),
        ("API+fleet path over pipeline call p99", f"{f['overhead_p99_ms']:.1f} ms", "<= 150 ms"),
        ("  of which beyond a no-op call, p50", f"{f['overhead_beyond_noop_p50_ms']:.1f} ms", ""),
        ("  of which beyond a no-op call, p99", f"{f['overhead_beyond_noop_p99_ms']:.1f} ms", ""),
        ("  Kafka hop (submit -> running) p50", f"{f['queue_hop_p50_ms']:.1f} ms", ""),
        ("  encode + S3 put p50", f"{f['store_p50_ms']:.1f} ms", ""),
        ("tiny pipeline call p50", f"{1000 * f['pipeline_p50_s']:.1f} ms", ""),
        ("no-op /ping via gradio_client p50", f"{f['noop_p50_ms']:.1f} ms", ""),
        ("cache hit via gradio_client p50", f"{f['cache_hit_p50_ms']:.1f} ms", ""),
        ("cache hit / no-op", f"{f['cache_hit_vs_noop']:.2f}x", "<= 1.3x"),
        ("cache hit, URL only (no download) p50", f"{f['cache_hit_url_only_p50_ms']:.1f} ms", ""),
        ("cache hit URL only / no-op", f"{f['cache_hit_url_only_vs_noop']:.2f}x", "<= 1.3x"),
        ("throughput, 1 worker", f"{f['throughput_1_per_s']:.2f} req/s", ""),
        ("throughput, 4 workers", f"{f['throughput_4_per_s']:.2f} req/s", ""),
        ("4 workers / 1 worker", f"{f['scaling_4_vs_1']:.2f}x", ">= 3.6x"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>14}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>14}  {target}")


if __name__ == "__main__":
    main()
