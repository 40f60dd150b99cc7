"""Time per image of the tiny pipeline through the API, on the embedded defaults (no Kafka/Redis/R2).

    python3 -m bench.api_latency [--requests 20]

Starts `python app.py` on a free port with a tiny SDXL built offline and calls /generate through
gradio_client: distinct requests (generation) and a repeated one (cache hit), against /ping.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    from gradio_client import Client

    from tests.conftest import TinyModel, start_app, stop_app
    from tests.sdxl_builder import build_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_sdxl(Path(tmp) / "tiny")
        tiny = TinyModel(Path(tmp) / "tiny" / "sdxl", Path(tmp) / "tiny" / "taesd")
        app = start_app(tiny, Path(tmp), MODEL_PRESET="turbo", RATE_LIMIT_PER_HOUR="100000")
        try:
            client = Client(app.url, verbose=False)
            params = {"negative_prompt": "", "preset": "turbo", "width": 512, "height": 512, "steps": 1,
                      "guidance_scale": 0.0}
            client.predict(prompt="warm-up", seed=0, **params, api_name="/generate")
            generated, pipeline, hits, pings = [], [], [], []
            for i in range(args.requests):
                started = time.perf_counter()
                _, meta = client.predict(prompt=f"api latency {i}", seed=i, **params, api_name="/generate")
                generated.append(time.perf_counter() - started)
                pipeline.append(meta["timings"]["generate_s"])
                started = time.perf_counter()
                client.predict(prompt="warm-up", seed=0, **params, api_name="/generate")
                hits.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.predict(api_name="/ping")
                pings.append(time.perf_counter() - started)
        finally:
            stop_app(app)
    ms = lambda values: f"{1000 * statistics.median(values):.0f} ms"  # noqa: E731
    print(f"tiny turbo 512x512, 1 step, embedded defaults, {args.requests} requests (medians):")
    print(f"  /generate, new image (client to image file): {ms(generated)}")
    print(f"  of which the pipeline call:                  {ms(pipeline)}")
    print(f"  /generate, cache hit:                         {ms(hits)}")
    print(f"  /ping (no-op through Gradio):                 {ms(pings)}")


if __name__ == "__main__":
    main()
