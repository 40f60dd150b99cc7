"""The embedded queue: bounded, in process, one worker thread (the only caller of the pipeline)."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from inference.errors import QueueFull
from inference.request import GenerationRequest

logger = logging.getLogger(__name__)


class LocalQueue:
    def __init__(self, handler: Callable[[GenerationRequest], None], max_size: int = 16) -> None:
        self._handler = handler
        self.max_size = max_size
        # Each request runs in the context it was submitted from: on ZeroGPU the GPU call is charged
        # to the visitor whose Gradio request is in that context.
        self._waiting: deque[tuple[GenerationRequest, contextvars.Context]] = deque()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.running_id: str | None = None
        self.mean_seconds = 10.0  # moving average of time per request, for wait estimates

    def put(self, request: GenerationRequest) -> None:
        with self._changed:
            if len(self._waiting) >= self.max_size:
                raise QueueFull(f"busy: {len(self._waiting)} requests are already waiting; try again in a minute")
            self._waiting.append((request, contextvars.copy_context()))
            self._changed.notify()

    def depth(self) -> int:
        with self._changed:
            return len(self._waiting)

    def position(self, request_id: str) -> int | None:
        """1 for the next to run; 0 while running; None if not here."""
        if request_id == self.running_id:
            return 0
        with self._changed:
            for index, (request, _) in enumerate(self._waiting):
                if request.request_id == request_id:
                    return index + 1
        return None

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
            while not self._waiting and not self._stop.is_set():
                self._changed.wait(0.5)
            if self._stop.is_set():
                return None
            request, context = self._waiting.popleft()
            self.running_id = request.request_id
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
        if self._waiting:
            logger.warning("stopped with %d requests still queued", len(self._waiting))
