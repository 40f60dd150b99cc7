"""Capacity planning: how many workers N designers need, and where the autoscaler's thresholds belong.

    python -m bench.capacity [--seconds-per-image 5.99] [--requests-per-designer-hour 30]
                             [--designers 10,25,50,100,200] [--workers 1,2,4,8,16]
                             [--overflow-after 60 --remote-seconds 3] [--plot bench/results/capacity.png]
    python -m bench.capacity --check bench/results/fleet.json

Simulates the fleet as a queue: Poisson arrivals (designers x requests per designer per hour), one shared
queue served first come first served by `workers` identical workers (the fleet's consumer group), each
image taking the measured time per image with 10% spread, and, if --overflow-after is given, the GPU
service taking requests whose estimated wait exceeds it (the router's rule). Prints p50/p95 of the time a
user waits for an image against workers and load, and writes a plot.

Default times per image are this project's measurements (bench.speed on a 2-vCPU AMD EPYC, bf16): turbo
512x512 1 step 5.99 s, lightning 1024x1024 4 steps 94.2 s. GPU times were not measured here (no GPU was
lent): pass your own with --seconds-per-image.

--check replays the real fleet benchmark (bench.fleet_bench: N requests submitted at once to 1 and to 4
worker processes with a fixed simulated generator) in the simulator and prints measured against
simulated throughput.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

PRESET_SECONDS = {"turbo": 5.99, "lightning": 94.2}  # bench.speed, 2-vCPU EPYC (README table)


@dataclass(frozen=True)
class Scenario:
    workers: int
    arrivals_per_hour: float
    seconds_per_image: float
    overflow_after: float | None = None
    remote_seconds: float = 3.0
    hours: float = 2.0
    spread: float = 0.1
    seed: int = 7


def simulate(scenario: Scenario) -> dict:
    """Per-request waits (arrival to image) of one run, and how many went to the GPU service."""
    rng = random.Random(scenario.seed)
    horizon = scenario.hours * 3600
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(scenario.arrivals_per_hour / 3600)
        if t > horizon:
            break
        arrivals.append(t)
    return serve(arrivals, scenario, rng)


def serve(arrivals: list[float], scenario: Scenario, rng: random.Random) -> dict:
    free_at = [0.0] * scenario.workers  # a heap of the times each worker becomes free
    heapq.heapify(free_at)
    waits, remote, backlog_done = [], 0, []  # backlog_done: finish times of the queued, for the estimate
    for arrival in arrivals:
        backlog_done = [d for d in backlog_done if d > arrival]
        waiting = sum(1 for d in backlog_done)  # in service or queued at this instant
        estimated = max(0, waiting - scenario.workers + 1) * scenario.seconds_per_image / scenario.workers
        if scenario.overflow_after is not None and estimated > scenario.overflow_after:
            waits.append(scenario.remote_seconds)
            remote += 1
            continue
        start = max(arrival, heapq.heappop(free_at))
        duration = scenario.seconds_per_image * rng.uniform(1 - scenario.spread, 1 + scenario.spread)
        heapq.heappush(free_at, start + duration)
        backlog_done.append(start + duration)
        waits.append(start + duration - arrival)
    return {"waits": waits, "remote": remote, "requests": len(arrivals)}


def percentile(values: list[float], q: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def table(args: argparse.Namespace) -> dict:
    rows = {}
    for designers in args.designers:
        for workers in args.workers:
            outcome = simulate(Scenario(workers, designers * args.requests_per_designer_hour,
                                        args.seconds_per_image, args.overflow_after, args.remote_seconds))
            rows[(designers, workers)] = (percentile(outcome["waits"], 50), percentile(outcome["waits"], 95),
                                          outcome["remote"] / max(1, outcome["requests"]))
    return rows


def print_table(args: argparse.Namespace, rows: dict) -> None:
    overflow = f", overflow after {args.overflow_after:g} s to a {args.remote_seconds:g} s GPU service" \
        if args.overflow_after is not None else ""
    print(f"time to image p50 / p95 (s); {args.seconds_per_image:g} s per image, "
          f"{args.requests_per_designer_hour:g} requests per designer per hour{overflow}")
    print("designers | " + " | ".join(f"{w:>3} workers" for w in args.workers))
    for designers in args.designers:
        cells = []
        for workers in args.workers:
            p50, p95, share = rows[(designers, workers)]
            cell = f"{_short(p50)}/{_short(p95)}" + (f" ({share:.0%} GPU)" if share else "")
            cells.append(f"{cell:>11}")
        print(f"{designers:>9} | " + " | ".join(cells))
    needed = {d: next((w for w in args.workers if rows[(d, w)][1] <= args.target), None) for d in args.designers}
    print(f"workers for p95 <= {args.target:g} s: " + ", ".join(
        f"{d} designers: {w if w else f'> {args.workers[-1]}'}" for d, w in needed.items()))
    lag = args.target / args.seconds_per_image  # requests one worker clears within the target wait
    print(f"KEDA lagThreshold for that target: about {max(1, int(lag))} waiting requests per worker")


def _short(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds < 1000 else f"{seconds / 60:.0f}m"


def plot(args: argparse.Namespace, rows: dict, path: Path) -> None:
    """p95 time to image against workers, one line per load (PIL: no plotting library needed)."""
    from PIL import Image, ImageDraw

    width, height, margin = 900, 540, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    top = min(max(v[1] for v in rows.values()), 10 * args.target)
    x_of = {w: margin + i * (width - 2 * margin) / max(1, len(args.workers) - 1) for i, w in enumerate(args.workers)}

    def y_of(value: float) -> float:
        return height - margin - min(value, top) / top * (height - 2 * margin)

    draw.line([(margin, height - margin), (width - margin, height - margin)], fill="black")
    draw.line([(margin, margin), (margin, height - margin)], fill="black")
    draw.line([(margin, y_of(args.target)), (width - margin, y_of(args.target))], fill=(200, 0, 0))
    draw.text((width - margin - 120, y_of(args.target) - 14), f"target {args.target:g} s", fill=(200, 0, 0))
    for w, x in x_of.items():
        draw.text((x - 8, height - margin + 8), str(w), fill="black")
    draw.text((width // 2 - 40, height - 24), "workers", fill="black")
    draw.text((8, 8), f"p95 time to image (s, up to {top:.0f})", fill="black")
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
    for index, designers in enumerate(args.designers):
        colour = palette[index % len(palette)]
        points = [(x_of[w], y_of(rows[(designers, w)][1])) for w in args.workers]
        draw.line(points, fill=colour, width=2)
        draw.text((width - margin - 110, margin + 16 * index), f"{designers} designers", fill=colour)  # legend
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"plot: {path}")


def check(results_path: Path) -> None:
    """The fleet benchmark submitted `throughput_requests` at once with a fixed simulated generator."""
    measured = json.loads(results_path.read_text())
    count = measured["throughput_requests"]
    per_request = 1 / measured["throughput_1_per_s"]  # generator + the fleet path, as measured at 1 worker
    for workers, key in ((1, "throughput_1_per_s"), (4, "throughput_4_per_s")):
        outcome = serve([0.0] * count, Scenario(workers, 0, per_request, spread=0.0), random.Random(1))
        simulated = count / max(outcome["waits"])
        print(f"{workers} worker(s): measured {measured[key]:.2f} req/s, simulated {simulated:.2f} req/s "
              f"({simulated / measured[key] - 1:+.1%})")


def _numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESET_SECONDS), default="turbo")
    parser.add_argument("--seconds-per-image", type=float, help="default: the preset's measured CPU time")
    parser.add_argument("--requests-per-designer-hour", type=float, default=30.0)
    parser.add_argument("--designers", type=_numbers, default=[10, 25, 50, 100, 200])
    parser.add_argument("--workers", type=_numbers, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--target", type=float, default=60.0, help="p95 seconds to an image that is acceptable")
    parser.add_argument("--overflow-after", type=float, help="OVERFLOW_AFTER_SECONDS of the router")
    parser.add_argument("--remote-seconds", type=float, default=3.0)
    parser.add_argument("--plot", type=Path, default=Path("bench/results/capacity.png"))
    parser.add_argument("--check", type=Path, help="compare with bench.fleet_bench's results JSON")
    args = parser.parse_args()
    if args.check:
        check(args.check)
        return
    args.seconds_per_image = args.seconds_per_image or PRESET_SECONDS[args.preset]
    rows = table(args)
    print_table(args, rows)
    plot(args, rows, args.plot)


if __name__ == "__main__":
    main()
