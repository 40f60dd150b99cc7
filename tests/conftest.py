"""Fixtures: a tiny SDXL built offline, and the real app started as a process on a free port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sdxl_builder import build_tiny_sdxl

REPO_ROOT = Path(__file__).resolve().parent.parent
# The UNet compile (COMPILE=on) would run in the background of every app started, and on a 2-vCPU
# runner slow every other test; it is off by default, and kept off here should a runner's environment
# turn it on. Its own tests (tests/test_compiled.py) turn it on.
os.environ["COMPILE"] = "off"
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"


@dataclass(frozen=True)
class TinyModel:
    sdxl: Path
    taesd: Path


@dataclass(frozen=True)
class RunningApp:
    url: str
    output_dir: Path
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    folder = tmp_path_factory.mktemp("tiny-model")
    build_tiny_sdxl(folder)
    return TinyModel(sdxl=folder / "sdxl", taesd=folder / "taesd")


@pytest.fixture(scope="session")
def loras_setting(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> str:
    """LORAS offering two styles made with peft for the tiny SDXL: ink (labelled "Ink wash") and pixel."""
    from tests.sdxl_builder import build_tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    ink = build_tiny_lora(tiny_model.sdxl, folder / "ink", seed=1)
    pixel = build_tiny_lora(tiny_model.sdxl, folder / "pixel", seed=2)
    return json.dumps({"ink": {"source": str(ink), "label": "Ink wash"}, "pixel": str(pixel)})


def app_env(tiny_model: TinyModel, port: int, output_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "MODEL_", "SPACE_", "KAFKA_", "REDIS_", "R2_", "S3_"))}
    env.update(
        MODEL_ID=str(tiny_model.sdxl), TINY_VAE_ID=str(tiny_model.taesd), GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port), OUTPUT_DIR=str(output_dir), HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_app(tiny_model: TinyModel, workdir: Path, timeout: float = 120.0, **extra: str) -> RunningApp:
    port = free_port()
    return launch_app(app_env(tiny_model, port, workdir / "outputs", **extra), workdir, timeout)


def launch_app(env: dict[str, str], workdir: Path, timeout: float = 120.0, name: str = "app",
               ready: tuple[str, ...] = ("ok",)) -> RunningApp:
    """`python app.py` with env; returns once /healthz says one of `ready` (ok by default)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    app = RunningApp(f"http://127.0.0.1:{env['GRADIO_SERVER_PORT']}", Path(env["OUTPUT_DIR"]), log_path, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app exited with {process.returncode}:\n{app.log()}")
        try:
            if get_json(f"{app.url}/healthz")[1]["status"] in ready:
                return app
        except (OSError, ValueError):
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"app not ready after {timeout} s:\n{app.log()}")


def wait_for_status(client, request_id: str, predicate, timeout: float = 60.0) -> dict:
    """Polls /status through gradio_client until predicate(status) holds."""
    deadline, status = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status = client.predict(request_id=request_id, api_name="/status")
        if predicate(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"timed out; last status {status}")


def wait_for_job(jobs, request_id: str, predicate, timeout: float = 90.0):
    """Polls a job store (e.g. the fleet's Redis) until predicate(job) holds."""
    deadline, job = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        job = jobs.get(request_id)
        if job is not None and predicate(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"timed out; last job {job}")


def stop_app(app: RunningApp) -> None:
    app.process.terminate()
    try:
        app.process.wait(20)
    except subprocess.TimeoutExpired:
        app.process.kill()


@pytest.fixture(scope="session")
def app_server(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """The app as a user runs it (`python app.py`), on the base preset with the tiny model.

    The base preset allows 50 steps with guidance, which makes a generation slow enough to cancel."""
    app = start_app(tiny_model, tmp_path_factory.mktemp("app"), MODEL_PRESET="base")
    yield app
    stop_app(app)


@pytest.fixture(scope="session")
def client(app_server: RunningApp):
    from gradio_client import Client

    return Client(app_server.url, verbose=False)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    from tests.services import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    from tests.services import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Apache Kafka when KAFKA_BOOTSTRAP_SERVERS is set, else a Tansu broker in memory."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    from tests.services import TansuBroker

    broker = TansuBroker(tmp_path_factory.mktemp("kafka"))
    yield broker.bootstrap
    broker.stop()


@pytest.fixture
def fleet(tiny_model, tmp_path, kafka_bootstrap, redis_server, s3_server):
    from tests.services import Fleet

    made = Fleet(tiny_model, tmp_path, kafka_bootstrap, redis_server.url, s3_server, s3_server.bucket())
    yield made
    made.stop_all()


# ---- a real browser (Debian's chromium, driven by playwright) --------------------------------------
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    """One chromium per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_form(browser, url: str, prompt: str, height_px: int = 1000, **fields: str):
    """A new page with the model ready and the form filled: fields by their label (Width="256")."""
    page = browser.new_page(viewport={"width": 1400, "height": height_px})
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_text("Model ready").wait_for(timeout=30_000)
    page.locator("#prompt textarea").fill(prompt)
    for label, value in fields.items():
        page.get_by_label(label).fill(value)
    return page


