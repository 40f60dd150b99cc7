"""A CPU stand-in for Hugging Face's `spaces` package on ZeroGPU hardware (tests only).

ZeroGPU itself (its scheduler, the GPUs it attaches) cannot be reached from here, so tests put this
folder first on PYTHONPATH of an app process started with SPACES_ZERO_GPU=true. It keeps the
behaviour of the real package (spaces 0.51, `spaces/zero/`) that the app depends on:

- `import spaces` must come before torch (the real one patches torch at import);
- the startup hook runs on `gr.Blocks.launch` (the real `one_launch`): a GPU call before it fails,
  as it does on ZeroGPU, where the weights are packed for the GPU only then;
- `GPU(duration=callable)` computes the duration from each call's arguments;
- every call runs in a process forked from the app's: nothing it writes reaches the app, what a
  generator yields comes back pickled, and closing the generator stops the child at its next yield.

Each of these leaves a JSON line in $ZEROGPU_STANDIN_LOG, which the tests read.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from functools import wraps

_context = multiprocessing.get_context("fork")
_started = False
_decorated: list = []


def _record(event: str, **fields) -> None:
    path = os.environ.get("ZEROGPU_STANDIN_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")


def _startup() -> None:
    global _started
    _started = True
    _record("startup", functions=len(_decorated))


def _hook_launch() -> None:
    import gradio as gr

    original = gr.Blocks.launch

    @wraps(original)
    def launch(*args, **kwargs):
        _startup()
        gr.Blocks.launch = original
        return original(*args, **kwargs)

    gr.Blocks.launch = launch


def _child(task, args, kwargs, events, stop) -> None:
    try:
        generator = task(*args, **kwargs)
        for item in generator:
            events.put(("item", item))
            if stop.is_set():
                generator.close()
                break
        events.put(("end", None))
    except BaseException as error:  # noqa: BLE001 - reported to the parent as ZeroGPU does
        events.put(("error", f"{type(error).__name__}: {error}"))


def GPU(task=None, *, duration=None, size=None):  # noqa: N802 - the real package's name
    if task is None:
        return lambda function: GPU(function, duration=duration, size=size)
    _decorated.append(task)

    @wraps(task)
    def on_gpu(*args, **kwargs):
        if not _started:
            raise RuntimeError("ZeroGPU: no GPU before startup (the app did not launch through gr.Blocks.launch)")
        seconds = duration(*args, **kwargs) if callable(duration) else duration
        events, stop = _context.Queue(), _context.Event()
        process = _context.Process(target=_child, args=(task, args, kwargs, events, stop), daemon=True)
        process.start()
        _record("call", duration=seconds, child=process.pid)
        try:
            while True:
                kind, payload = events.get(timeout=(seconds or 60) + 30)
                if kind == "error":
                    raise RuntimeError(payload)
                if kind == "end":
                    return
                yield payload
        finally:
            stop.set()
            process.join(10)
            if process.is_alive():
                process.kill()
            _record("released", child=process.pid, exitcode=process.exitcode)

    return on_gpu


_record("import", torch_imported="torch" in sys.modules)
if "torch" in sys.modules:
    raise RuntimeError("CUDA has been initialized before importing the `spaces` package. "
                       "Try importing `spaces` before any other CUDA-related package.")
_hook_launch()
