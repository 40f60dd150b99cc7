"""Time per image through the API, on the embedded defaults (no Kafka/Redis/R2), against the app's own
time for the same work: what the serving path (Gradio, queue, encoding, file transfer) adds.

    python3 -m bench.api_latency [--requests 20]          # the tiny pipeline: the serving path alone
    python3 -m bench.api_latency --full [--requests 4]    # full-size SDXL (random weights, bench/models)

Starts `python app.py` on a free port (MODEL_PRESET=turbo, everything else default: the dtype the app
picks on this CPU) and calls /generate through gradio_client: distinct requests (each a cache miss and a
generation), a repeated one (cache hit), and /ping. "of which the worker" is the job's own generate_s +
store_s from the result's metadata (render, PNG encoding, store); the rest of a request's time is the
serving path's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=0, help="default: 20 tiny, 4 full-size")
    parser.add_argument("--full", action="store_true", help="full-size SDXL with random weights")
    args = parser.parse_args()
    requests = args.requests or (4 if args.full else 20)
    from gradio_client import Client

    from bench.speed import cpu_line
    from tests.conftest import TinyModel, start_app, stop_app
    from tests.sdxl_builder import build_tiny_sdxl

    print(cpu_line())
    with tempfile.TemporaryDirectory() as tmp:
        if args.full:
            from bench.speed import MODELS
            from tests.sdxl_builder import build_full_sdxl

            build_full_sdxl(MODELS)
            model = TinyModel(MODELS / "sdxl", MODELS / "taesd")
        else:
            build_tiny_sdxl(Path(tmp) / "tiny")
            model = TinyModel(Path(tmp) / "tiny" / "sdxl", Path(tmp) / "tiny" / "taesd")
        started = time.perf_counter()
        app = start_app(model, Path(tmp), timeout=600, MODEL_PRESET="turbo", RATE_LIMIT_PER_HOUR="100000")
        print(f"app ready (/healthz ok) {time.perf_counter() - started:.1f} s after start")
        try:
            timings = measure(Client(app.url, verbose=False), requests)
        finally:
            stop_app(app)
    ms = lambda values: f"{1000 * statistics.median(values):.0f} ms"  # noqa: E731
    generated, worker, hits, pings = timings
    overhead = [total - inside for total, inside in zip(generated, worker)]
    print(f"{'full-size' if args.full else 'tiny'} turbo 512x512, 1 step, embedded defaults, {requests} requests "
          "(medians):")
    print(f"  /generate, new image (client to image file): {ms(generated)}")
    print(f"  of which the worker (render, encode, store): {ms(worker)}")
    print(f"  the serving path's share:                    {ms(overhead)} "
          f"({statistics.median(overhead) / statistics.median(generated):.0%})")
    print(f"  /generate, cache hit:                         {ms(hits)}")
    print(f"  /ping (no-op through Gradio):                 {ms(pings)}")


def measure(client, requests: int) -> tuple[list[float], list[float], list[float], list[float]]:
    params = {"negative_prompt": "", "preset": "turbo", "width": 512, "height": 512, "steps": 1,
              "guidance_scale": 0.0}
    client.predict(prompt="warm-up", seed=0, **params, api_name="/generate")
    generated, worker, hits, pings = [], [], [], []
    for i in range(requests):
        started = time.perf_counter()
        _, meta = client.predict(prompt=f"api latency {i}", seed=i, **params, api_name="/generate")
        generated.append(time.perf_counter() - started)
        worker.append(meta["timings"]["generate_s"] + meta["timings"]["store_s"])
        started = time.perf_counter()
        client.predict(prompt="warm-up", seed=0, **params, api_name="/generate")
        hits.append(time.perf_counter() - started)
        started = time.perf_counter()
        client.predict(api_name="/ping")
        pings.append(time.perf_counter() - started)
    return generated, worker, hits, pings


if __name__ == "__main__":
    main()
