"""ZeroGPU mode (SPACES_ZERO_GPU=true, as Hugging Face sets it on ZeroGPU hardware).

ZeroGPU's scheduler and GPUs cannot be reached from here: the app process gets the CPU stand-in in
tests/zerogpu_standin first on its PYTHONPATH (it keeps what the app depends on: import before torch,
startup on gr.Blocks.launch, a duration computed per call, a forked process per call whose
generator's events come back pickled). Everything else is the real app on the tiny SDXL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

import app as app_module
from inference.errors import Cancelled
from inference.request import GenerationRequest
from inference.zerogpu import MAX_DURATION_SECONDS, ZeroGPUPipeline, gpu_seconds
from tests.conftest import REPO_ROOT, app_env, free_port, get_json, launch_app, stop_app, wait_for_status

STANDIN = REPO_ROOT / "tests" / "zerogpu_standin"
SMALL = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def zero_space(tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("zerogpu")
    log = workdir / "zerogpu.jsonl"
    env = app_env(tiny_model, free_port(), workdir / "outputs", MODEL_PRESET="base", SYSTEM="spaces",
                  SPACES_ZERO_GPU="true", DEVICE="cpu", ZEROGPU_STANDIN_LOG=str(log),
                  PYTHONPATH=os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    running = launch_app(env, workdir)
    yield running, log
    stop_app(running)


def test_startup_imports_spaces_first_and_launches_through_gradio(zero_space) -> None:
    running, log = zero_space
    events = _events(log)
    assert events[0] == {"event": "import", "pid": running.process.pid, "torch_imported": False}
    startup = [e for e in events if e["event"] == "startup"]
    assert startup == [{"event": "startup", "pid": running.process.pid, "functions": 1}]
    code, health = get_json(f"{running.url}/healthz")  # the service routes answer ahead of Gradio's /{page}
    assert code == 200 and health["model"]["zero_gpu"] is True and health["model"]["state"] == "ready"
    assert get_json(f"{running.url}/readyz") == (200, {"status": "ok"})


def test_a_generation_runs_in_a_gpu_call_sized_by_the_request(zero_space) -> None:
    running, log = zero_space
    client = Client(running.url, verbose=False)
    before = len(_events(log))
    image, result = client.predict(prompt="a zero gpu tower", seed=3, **SMALL, api_name="/generate")
    assert Path(image).stat().st_size > 0 and result["seed"] == 3 and result["cached"] is False
    calls = [e for e in _events(log)[before:] if e["event"] == "call"]
    request = GenerationRequest.create("a zero gpu tower", "", "base", 256, 256, 2, 5.0, 3, "png")
    assert len(calls) == 1 and calls[0]["duration"] == gpu_seconds(request, 0.5)
    assert calls[0]["child"] != running.process.pid  # rendered in the forked process
    again = client.predict(prompt="a zero gpu tower", seed=3, **SMALL, api_name="/generate")
    assert again[1]["cached"] is True and Path(again[0]).read_bytes() == Path(image).read_bytes()
    assert [e for e in _events(log)[before:] if e["event"] == "call"] == calls  # a hit spends no GPU call


def test_progress_reaches_status_and_cancel_stops_the_gpu_call(zero_space) -> None:
    running, log = zero_space
    client = Client(running.url, verbose=False)
    slow = {**SMALL, "width": 1024, "height": 1024, "steps": 50, "guidance_scale": 7.5}
    request_id = client.predict(prompt="a slow zero gpu keep", seed=1, request_id="", **slow, api_name="/submit")
    running_status = wait_for_status(client, request_id, lambda s: s["state"] == "running" and s["step"] >= 1,
                                     timeout=120)
    assert running_status["total_steps"] == 50
    client.predict(request_id=request_id, api_name="/cancel")
    cancelled = wait_for_status(client, request_id, lambda s: s["state"] != "running", timeout=60)
    assert cancelled["state"] == "cancelled" and cancelled["step"] < 50
    call = [e for e in _events(log) if e["event"] == "call"][-1]
    deadline = time.monotonic() + 30
    while not any(e["event"] == "released" and e["child"] == call["child"] for e in _events(log)):
        assert time.monotonic() < deadline, "the GPU call was not released after cancel"
        time.sleep(0.2)
    released = next(e for e in _events(log) if e["event"] == "released" and e["child"] == call["child"])
    assert released["exitcode"] == 0  # the child stopped at its next step, it was not killed


def test_zero_gpu_mode_puts_the_model_on_cuda_without_warm_up() -> None:
    settings = app_module.Settings.from_env({"SPACES_ZERO_GPU": "true", "SYSTEM": "spaces"})
    pipeline, preset, _ = app_module.build_pipeline(settings)
    assert settings.zero_gpu and pipeline.device == "cuda" and pipeline.options.warmup is False
    assert preset.name == "lightning"  # the GPU default
    assert settings.fleet_queue is None
    fleet = app_module.Settings.from_env({"SPACES_ZERO_GPU": "1", "KAFKA_BOOTSTRAP_SERVERS": "k:9092",
                                          "REDIS_URL": "redis://r:6379", "S3_BUCKET": "b"})
    assert fleet.fleet.shared_queue == "kafka" and fleet.fleet_queue is None  # Kafka stays on CPU workers


def test_a_worker_cannot_run_on_zero_gpu(tiny_model, tmp_path) -> None:
    env = app_env(tiny_model, free_port(), tmp_path / "out", SPACES_ZERO_GPU="true")
    run = subprocess.run([sys.executable, "app.py", "--worker"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "ZeroGPU" in run.stderr and "Traceback" not in run.stderr


def test_gpu_seconds_grow_with_the_work_and_are_capped() -> None:
    def seconds(**fields) -> int:
        values = {"width": 1024, "height": 1024, "steps": 4, "guidance_scale": 0.0, **fields}
        return gpu_seconds(GenerationRequest.create("x", "", "lightning", values["width"], values["height"],
                                                    values["steps"], values["guidance_scale"], 1, "png"), 0.5)

    assert seconds() == 12  # 10 s setup + 4 passes x 1 MP x 0.5 s
    assert seconds(guidance_scale=7.5) == 14  # guidance doubles the batch
    assert seconds(width=512, height=512) == 11
    assert seconds(steps=8, width=1280, height=1280) <= MAX_DURATION_SECONDS


class _Tiny:
    """A stand-in for ImagePipeline that takes `steps` steps (the wrapper's own logic under test)."""

    def __init__(self) -> None:
        self.stopped_at: int | None = None

    def wait_ready(self) -> bool:
        return True

    def generate(self, request, on_step, should_cancel):
        for step in range(1, request.steps + 1):
            time.sleep(0.01)
            on_step(step, request.steps)
            if should_cancel():
                self.stopped_at = step
                raise Cancelled("stopped")
        return f"image of {request.prompt}"


def _gpu_in_process(duration):  # spaces.GPU off ZeroGPU: the function itself
    return lambda function: function


def test_the_wrapper_relays_steps_and_returns_the_image() -> None:
    assert "SPACES_ZERO_GPU" not in os.environ
    wrapped = ZeroGPUPipeline(_Tiny(), 0.5)  # the real spaces.GPU: off ZeroGPU it returns the function
    steps: list[tuple[int, int]] = []
    request = GenerationRequest.create("a cat", "", "base", 256, 256, 5, 5.0, 1, "png")
    assert wrapped.generate(request, lambda s, t: steps.append((s, t)), lambda: False) == "image of a cat"
    assert steps == [(s, 5) for s in range(1, 6)]


def test_cancel_closes_the_gpu_generator_and_stops_the_render() -> None:
    tiny = _Tiny()
    wrapped = ZeroGPUPipeline(tiny, 0.5, decorator=_gpu_in_process)
    request = GenerationRequest.create("a dog", "", "base", 256, 256, 40, 5.0, 1, "png")
    seen: list[int] = []
    with pytest.raises(Cancelled):
        wrapped.generate(request, lambda s, t: seen.append(s), lambda: len(seen) >= 3)
    assert tiny.stopped_at is not None and tiny.stopped_at < 40  # the render thread stopped too
