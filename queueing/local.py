"""The embedded queue: bounded, in process, one worker thread (the only caller of the pipeline).

Two lanes: interactive requests (someone is waiting) run before bulk ones (the backend's batches),
and while both wait, at least one run in every `bulk_every` is a bulk request, so bulk work is slowed
by a busy UI, never starved.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from inference.errors import QueueFull
from inference.request import PRIORITIES, GenerationRequest

logger = logging.getLogger(__name__)


class LocalQueue:
    def __init__(self, handler: Callable[[GenerationRequest], None], max_size: int = 16, bulk_every: int = 4,
                 metrics: Any = None) -> None:
        self._handler = handler
        self.max_size, self.bulk_every, self.metrics = max_size, bulk_every, metrics
        # Each request runs in the context it was submitted from: on ZeroGPU the GPU call is charged
        # to the visitor whose Gradio request is in that context.
        self._lanes: dict[str, deque[tuple[GenerationRequest, contextvars.Context]]] = {
            lane: deque() for lane in PRIORITIES}
        self._interactive_streak = 0  # interactive runs since the last bulk one
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.running_id: str | None = None
        self.mean_seconds = 10.0  # moving average of time per request, for wait estimates

    def put(self, request: GenerationRequest) -> None:
        with self._changed:
            waiting = self._depth()
            if waiting >= self.max_size:
                raise QueueFull(f"busy: {waiting} requests are already waiting; try again in a minute")
            self._lanes[request.priority].append((request, contextvars.copy_context()))
            self._changed.notify()

    def depth(self) -> int:
        with self._changed:
            return self._depth()

    def _depth(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def position(self, request_id: str) -> int | None:
        """1 for the next to run; 0 while running; None if not here. Counted in the order the lanes
        will be served (interactive first, a bulk one every bulk_every runs)."""
        if request_id == self.running_id:
            return 0
        with self._changed:
            for index, request in enumerate(self._run_order()):
                if request.request_id == request_id:
                    return index + 1
        return None

    def _run_order(self) -> list[GenerationRequest]:
        interactive = [request for request, _ in self._lanes["interactive"]]
        bulk = [request for request, _ in self._lanes["bulk"]]
        order, streak = [], self._interactive_streak
        while interactive or bulk:
            lane = bulk if bulk and (not interactive or self._bulk_turn(streak)) else interactive
            order.append(lane.pop(0))
            streak = 0 if lane is bulk else streak + 1
        return order

    def _bulk_turn(self, streak: int) -> bool:
        return self.bulk_every > 0 and streak >= self.bulk_every - 1

    def wait_estimate(self) -> dict[str, Any]:
        backlog = self.depth() + (1 if self.running_id else 0)
        return {"backlog": backlog, "workers": 1, "estimated_wait_s": round(backlog * self.mean_seconds, 1)}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="local-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown: the job in hand finishes, waiting ones stay queued (and are reported)."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _next(self) -> tuple[GenerationRequest, contextvars.Context] | None:
        with self._changed:
            while not self._depth() and not self._stop.is_set():
                self._changed.wait(0.5)
            if self._stop.is_set():
                return None
            interactive, bulk = self._lanes["interactive"], self._lanes["bulk"]
            lane = "bulk" if bulk and (not interactive or self._bulk_turn(self._interactive_streak)) else "interactive"
            request, context = self._lanes[lane].popleft()
            self._interactive_streak = 0 if lane == "bulk" else self._interactive_streak + 1
            self.running_id = request.request_id
            if self.metrics:
                self.metrics.priority_picks.labels(lane).inc()
            return request, context

    def _run(self) -> None:
        while (item := self._next()) is not None:
            request, context = item
            started = time.monotonic()
            try:
                context.run(self._handler, request)
            finally:
                self.running_id = None
                self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.monotonic() - started)
        if self._depth():
            logger.warning("stopped with %d requests still queued", self._depth())
