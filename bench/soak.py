"""Soak benchmark: load held for minutes, memory and connections flat (issue 8, item 12).

    .venv/bin/python -m bench.soak --minutes 10 --layout single
    .venv/bin/python -m bench.soak --minutes 10 --layout fleet [--threads 1]

`single`: one Space on embedded defaults. `fleet`: two Spaces (UI/API, both consuming) plus a headless
worker on the real local services (redis-server, the Tansu broker, moto S3). In both, 10 simulated
designers call /generate through gradio_client (each from its own address, as the Spaces proxy would
append it), thinking 10-30 s between images, and a backend producer sends one request every few seconds
(the topic with BackendClient in the fleet, /submit + /status without Kafka) and waits for it.

The tiny SDXL pipeline runs at 512x512 with enough steps to take about a second and a half per image on
this machine (the real work of a CPU Space is slower; the point here is the serving path under load).

Prints and writes bench/results/soak-<layout>.json: success rate, p50/p95 wait, refusals by reason,
and for each process its RSS, threads and open sockets idle, after the first (warm-up) minute and at the
end, with RSS every minute: flat means no growth after the warm-up minute.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DESIGNERS = 10
WORK = {"negative_prompt": "", "preset": "base", "width": 512, "height": 512, "steps": 12, "guidance_scale": 5.0}


@dataclass
class Tally:
    waits: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: str, wait: float | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if wait is not None:
                self.waits.append(wait)


def refusal_reason(message: str) -> str:
    for needle, reason in (("rate limit", "rate_limit"), ("in progress", "too_many_in_flight"),
                           ("busy", "busy"), ("unreachable", "queue_unavailable"), ("Timeout", "timeout")):
        if needle in message:
            return f"refused:{reason}"
    return f"error:{message[:60]}"


def designer(url: str, index: int, until: float, tally: Tally) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False, headers={"X-Forwarded-For": f"198.51.100.{index + 10}"})
    rng = random.Random(index)
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            client.predict(prompt=f"designer {index} asset {uuid.uuid4().hex[:8]}", seed=rng.randrange(1 << 31),
                           **WORK, api_name="/generate")
            tally.record("ok", time.monotonic() - started)
        except Exception as error:  # a refusal or a failure: counted by reason
            tally.record(refusal_reason(str(error)))
        time.sleep(rng.uniform(10, 30))


def backend_topic(bootstrap: str, prefix: str, until: float, tally: Tally, every: float) -> None:
    from inference.request import GenerationRequest
    from queueing.client import BackendClient

    with BackendClient(bootstrap, prefix) as client:
        while time.monotonic() < until:
            started = time.monotonic()
            request = GenerationRequest.create(f"backend item {uuid.uuid4().hex[:8]}", seed=1, **{
                k: v for k, v in WORK.items() if k != "negative_prompt"})
            try:
                result = client.generate(request, timeout=300)
                tally.record("ok" if result["state"] == "done" else f"error:{result['state']}",
                             time.monotonic() - started)
            except TimeoutError:
                tally.record("refused:timeout")
            time.sleep(max(0.0, every - (time.monotonic() - started)))


def backend_api(url: str, until: float, tally: Tally, every: float) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False, headers={"X-Forwarded-For": "203.0.113.200"})
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            request_id = client.predict(prompt=f"backend item {uuid.uuid4().hex[:8]}", seed=1, **WORK,
                                        api_name="/submit")
            while (status := client.predict(request_id=request_id, api_name="/status"))["state"] in (
                    "queued", "running"):
                time.sleep(0.5)
            tally.record("ok" if status["state"] == "done" else f"error:{status['state']}",
                         time.monotonic() - started)
        except Exception as error:
            tally.record(refusal_reason(str(error)))
        time.sleep(max(0.0, every - (time.monotonic() - started)))


def process_figures(pid: int) -> dict:
    """RSS (MB), threads and open sockets of a process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = sum(1 for fd in fds if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))
    return {"rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 1), "threads": int(status["Threads"]),
            "sockets": sockets, "fds": len(fds)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def start_layout(layout: str, workdir: Path, threads: int | None = None):
    """Returns (urls of the Spaces, {name: pid}, backend thread factory, things to stop). threads: torch
    threads per process (OMP_NUM_THREADS): three processes of two threads each on a 2-core machine
    oversubscribe it, which a fleet of one machine per clone never does."""
    from tests.conftest import TinyModel, launch_app, app_env, free_port
    from tests.sdxl_builder import build_tiny_sdxl

    build_tiny_sdxl(workdir / "tiny")
    tiny = TinyModel(workdir / "tiny" / "sdxl", workdir / "tiny" / "taesd")
    limits = {"MODEL_PRESET": "base", "WARMUP": "0", "TRUSTED_PROXY_HOPS": "1", "QUEUE_MAX_SIZE": "32"}
    if threads:
        limits["OMP_NUM_THREADS"] = str(threads)
    if layout == "single":
        app = launch_app(app_env(tiny, free_port(), workdir / "outputs", **limits), workdir, name="space")
        return [app.url], {"space": app.process.pid}, lambda until, tally: backend_api(app.url, until, tally, 6.0), \
            [app.process]
    from tests.services import Fleet, RedisServer, S3Server, TansuBroker

    redis_server, s3 = RedisServer(workdir), S3Server()
    broker = TansuBroker(workdir)
    fleet = Fleet(tiny, workdir, broker.bootstrap, redis_server.url, s3, s3.bucket())
    spaces = [fleet.start_app(name, **limits) for name in ("space-a", "space-b")]
    fleet.start_worker("headless", **limits)
    fleet.wait_for_workers(["space-a", "space-b", "headless"])
    pids = {name: process.pid for name, process in fleet.processes.items()}
    backend = lambda until, tally: backend_topic(broker.bootstrap, fleet.prefix, until, tally, 6.0)  # noqa: E731
    return [app.url for app in spaces], pids, backend, [fleet, broker, redis_server, s3]


def stop_all(things) -> None:
    for thing in things:
        if hasattr(thing, "stop_all"):
            thing.stop_all()
        elif hasattr(thing, "terminate"):
            thing.terminate()
        else:
            thing.stop()


def run(layout: str, minutes: float, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        urls, pids, backend, things = start_layout(layout, Path(folder), threads)
        try:
            time.sleep(3)
            idle = {name: process_figures(pid) for name, pid in pids.items()}
            tally = Tally()
            until = time.monotonic() + minutes * 60
            samples: list[dict] = []
            sampler = threading.Thread(target=sample_every_minute, args=(pids, until, samples), daemon=True)
            sampler.start()
            threads = [threading.Thread(target=designer, args=(urls[i % len(urls)], i, until, tally))
                       for i in range(DESIGNERS)]
            threads.append(threading.Thread(target=backend, args=(until, tally)))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            time.sleep(3)
            end = {name: process_figures(pid) for name, pid in pids.items()}
        finally:
            stop_all(things)
    # The first minute warms up (allocator, thread pools, connections): flat means no growth after it.
    warm = samples[0] if samples else idle
    total = sum(tally.outcomes.values())
    return {"layout": layout, "minutes": minutes, "cpu": _cpu_name(), "threads_per_process": threads,
            "requests": total, "success_rate": round(tally.outcomes["ok"] / max(1, total), 4),
            "wait_p50_s": round(percentile(tally.waits, 0.5), 2), "wait_p95_s": round(percentile(tally.waits, 0.95), 2),
            "outcomes": dict(tally.outcomes),
            "processes": {n: {"idle": idle[n], "after_1_min": warm[n], "end": end[n],
                              "rss_mb_by_minute": [s[n]["rss_mb"] for s in samples]} for n in pids}}


def sample_every_minute(pids: dict[str, int], until: float, samples: list[dict]) -> None:
    while time.monotonic() + 60 < until + 1:
        time.sleep(60)
        samples.append({name: process_figures(pid) for name, pid in pids.items()})


def _cpu_name() -> str:
    """The CPU and its matrix units (they set the pipeline's speed: see bench.speed)."""
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    units = [flag for flag in ("avx512_bf16", "amx_bf16", "amx_int8") if flag in flags] or ["no bf16 units"]
    return f"{name} ({os.cpu_count()} cores; {', '.join(units)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--layout", choices=["single", "fleet"], default="single")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for each app process")
    parser.add_argument("--out", default=None, help="result file name (default soak-<layout>.json)")
    args = parser.parse_args()
    result = run(args.layout, args.minutes, args.threads)
    print(f"soak {result['layout']} for {result['minutes']} min on {result['cpu']}: {result['requests']} requests, "
          f"success {result['success_rate']:.1%}, wait p50 {result['wait_p50_s']} s, p95 {result['wait_p95_s']} s")
    print(f"outcomes: {result['outcomes']}")
    for name, figures in result["processes"].items():
        print(f"  {name:10s} idle {figures['idle']}")
        print(f"  {'':10s} after 1 min {figures['after_1_min']}  end {figures['end']}")
        print(f"  {'':10s} RSS MB by minute {figures['rss_mb_by_minute']}")
    RESULTS.mkdir(exist_ok=True)
    name = args.out or f"soak-{args.layout}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(f"written to bench/results/{name}")


if __name__ == "__main__":
    main()
