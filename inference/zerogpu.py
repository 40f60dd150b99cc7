"""ZeroGPU: Hugging Face's shared GPUs, lent to a Space one call at a time.

On ZeroGPU hardware (`SPACES_ZERO_GPU=true`, set by Hugging Face) there is no GPU outside a function
decorated with `@spaces.GPU`: each call is scheduled against the visitor's quota, runs in a process
forked from the Space's, on a GPU attached for the call, and its results travel back pickled. What
that means here:

- the generation runs in a generator: each denoising step is yielded back to the Space's process,
  which updates the job (progress for the UI and /status) exactly as a local generation does;
- the forked process shares nothing with the Space after the fork (job store, cancel flags), so
  cancelling is closing the generator: ZeroGPU then stops the child at its next step;
- the call's duration is computed from the request (ZeroGPU schedules short calls first and stops a
  call that runs past its duration).

Off ZeroGPU `spaces.GPU` returns the function unchanged, so the same code runs in-process.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from inference.errors import Cancelled, GenerationFailed
from inference.request import GenerationRequest

logger = logging.getLogger(__name__)

Decorator = Callable[..., Callable]
SECONDS_FOR_SETUP = 10.0  # attaching the GPU and moving the packed weights onto it
MAX_DURATION_SECONDS = 120  # above this ZeroGPU's default quota is spent in one or two calls


def spaces_gpu() -> Decorator:
    """The `spaces.GPU` decorator. `spaces` must be imported before torch touches CUDA, which is
    why app.py imports it first in ZeroGPU mode; here it is only looked up."""
    import spaces

    return spaces.GPU


def gpu_seconds(request: GenerationRequest, seconds_per_step: float) -> int:
    """The duration to ask ZeroGPU for: setup plus every UNet pass, scaled by the image's megapixels
    (guidance doubles the batch), rounded up, capped at MAX_DURATION_SECONDS."""
    megapixels = request.width * request.height / 1024**2
    passes = request.steps * (2 if request.guidance_scale > 1 else 1)
    return min(MAX_DURATION_SECONDS, int(SECONDS_FOR_SETUP + passes * megapixels * seconds_per_step + 0.999))


class ZeroGPUPipeline:
    """Wraps ImagePipeline with the same interface; generate() runs in a @spaces.GPU call."""

    def __init__(self, pipeline: Any, seconds_per_step: float, decorator: Decorator | None = None) -> None:
        self._pipeline = pipeline
        self.seconds_per_step = seconds_per_step
        gpu = decorator or spaces_gpu()
        # Decorated at startup, before Gradio's launch: ZeroGPU reports its functions then.
        self._on_gpu = gpu(duration=self.duration)(self._steps_on_gpu)

    def __getattr__(self, name: str) -> Any:  # state, device, dtype, ready, wait_ready, start_loading...
        return getattr(self._pipeline, name)

    def duration(self, request: GenerationRequest, init_image: Any = None, previews: bool = False) -> int:
        return gpu_seconds(request, self.seconds_per_step)

    def generate(self, request: GenerationRequest, on_step: Callable[[int, int], None],
                 should_cancel: Callable[[], bool], init_image: Any = None,
                 on_preview: Callable[[bytes], None] | None = None) -> Any:
        self._pipeline.wait_ready()
        if should_cancel():
            raise Cancelled(f"request {request.request_id} was cancelled before it started")
        steps = self._on_gpu(request, init_image, on_preview is not None)
        try:
            for kind, *payload in steps:
                if kind == "preview":
                    on_preview(*payload)
                elif kind == "step":
                    on_step(*payload)
                    if should_cancel():
                        raise Cancelled(f"request {request.request_id} was cancelled at step "
                                        f"{payload[0]}/{payload[1]}")
                elif kind == "failed":
                    raise GenerationFailed(payload[0])
                else:
                    return payload[0]
        except (Cancelled, GenerationFailed):
            raise
        except Exception as error:  # ZeroGPU's own errors: no GPU left in the quota, the call timed out...
            raise GenerationFailed(f"ZeroGPU: {type(error).__name__}: {str(error)[:240]}") from error
        finally:
            steps.close()  # on ZeroGPU this stops the forked process at its next step
        raise GenerationFailed("ZeroGPU: the GPU call ended without an image")

    def _steps_on_gpu(self, request: GenerationRequest, init_image: Any = None,
                      previews: bool = False) -> Iterator[tuple]:
        """Runs in ZeroGPU's forked process: generates in a thread (diffusers calls back per step, a
        generator cannot yield from a callback) and yields ("step", n, total) events, then
        ("image", image) or ("failed", message)."""
        events: queue.Queue[tuple] = queue.Queue()
        closed = threading.Event()

        def render() -> None:
            try:
                image = self._pipeline.generate(request, on_step=lambda step, total: events.put(("step", step, total)),
                                                should_cancel=closed.is_set,
                                                **({"init_image": init_image} if init_image is not None else {}),
                                                **({"on_preview": lambda jpeg: events.put(("preview", jpeg))}
                                                   if previews else {}))
                events.put(("image", image))
            except Cancelled:
                events.put(("cancelled",))
            except Exception as error:  # GenerationFailed carries its own message; pickling others may fail
                events.put(("failed", str(error)))

        thread = threading.Thread(target=render, name="zerogpu-render", daemon=True)
        thread.start()
        try:
            while (event := events.get())[0] in ("step", "preview"):
                yield event
            if event[0] != "cancelled":
                yield event
        finally:
            closed.set()  # the caller closed us (cancel) or we are done: the render stops at its next step
            thread.join()
