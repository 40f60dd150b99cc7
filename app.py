"""Crafterse image generation Space: the composition root.

Reads settings from the environment (here only), builds the pipeline, queue, stores and gateway,
puts a Gradio UI and API in front of them and serves them. Nothing happens at import: `main()`
does the work, so tests and benchmarks can import the pieces.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from inference.errors import GenerationError, QueueFull, UnknownRequest
from inference.presets import DEFAULT_CPU_PRESET, DEFAULT_GPU_PRESET, ModelIdentity, get_preset
from inference.request import MAX_GUIDANCE, MAX_SEED, MAX_SIDE, MIN_SIDE, GenerationRequest
from queueing.gateway import Gateway
from queueing.local import LocalQueue
from queueing.worker import Worker
from storage.cache import MemoryResultCache
from storage.jobs import MemoryJobStore
from storage.objects import LocalObjectStore

logger = logging.getLogger("app")

SECONDS_PER_DAY = 24 * 3600
DERIVED_SEED = -1  # UI/API spelling of "no seed": derive it from the other fields


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """Every environment variable the app reads, typed, in one place."""

    preset: str = "auto"  # auto: turbo on CPU, lightning on GPU
    model_id: str | None = None
    model_revision: str | None = None
    tiny_vae_id: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    warmup: bool = True
    output_dir: Path = Path("outputs")
    output_format: str = "png"
    public_url: str | None = None
    server_name: str = "127.0.0.1"
    server_port: int = 7860
    queue_max_size: int = 16
    cache_max_entries: int = 1024
    cache_ttl_seconds: int = 7 * SECONDS_PER_DAY
    request_timeout_seconds: float = 900.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        space_host = env.get("SPACE_HOST")  # set by Hugging Face Spaces: "<owner>-<name>.hf.space"
        return cls(
            preset=env.get("MODEL_PRESET", "auto") or "auto",
            model_id=env.get("MODEL_ID") or None,
            model_revision=env.get("MODEL_REVISION") or None,
            tiny_vae_id=env.get("TINY_VAE_ID"),
            device=env.get("DEVICE", "auto") or "auto",
            dtype=env.get("DTYPE", "auto") or "auto",
            warmup=_flag(env.get("WARMUP"), True),
            output_dir=Path(env.get("OUTPUT_DIR", "outputs")),
            output_format=env.get("OUTPUT_FORMAT", "png"),
            public_url=env.get("PUBLIC_URL") or (f"https://{space_host}" if space_host else None),
            server_name=env.get("GRADIO_SERVER_NAME", "127.0.0.1"),
            server_port=int(env.get("GRADIO_SERVER_PORT", "7860")),
            queue_max_size=int(env.get("QUEUE_MAX_SIZE", "16")),
            cache_max_entries=int(env.get("CACHE_MAX_ENTRIES", "1024")),
            cache_ttl_seconds=int(env.get("CACHE_TTL_SECONDS", str(7 * SECONDS_PER_DAY))),
            request_timeout_seconds=float(env.get("REQUEST_TIMEOUT_SECONDS", "900")),
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
        )

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.server_name in ("0.0.0.0", "::", "") else self.server_name
        return f"http://{host}:{self.server_port}"


@dataclass
class Services:
    settings: Settings
    pipeline: Any  # inference.pipeline.ImagePipeline (imported lazily: torch is heavy)
    identity: Any
    objects: Any
    jobs: Any
    worker: Any
    queue: Any
    gateway: Any

    def start(self) -> None:
        self.pipeline.start_loading()
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()

    def health(self) -> dict[str, Any]:
        """Safe to show anyone: states and names, never credentials."""
        pipeline = self.pipeline
        return {
            "status": {"ready": "ok", "failed": "failed"}.get(pipeline.state, "starting"),
            "model": {
                "state": pipeline.state,
                "detail": pipeline.detail,
                "preset": self.identity.preset,
                "model": self.identity.model_id,
                "vae": self.identity.vae,
                "device": pipeline.device,
                "dtype": str(pipeline.dtype).removeprefix("torch."),
                "load_seconds": pipeline.load_seconds,
            },
            "queue": {
                "depth": self.queue.depth(),
                "max_size": self.queue.max_size,
                "running": self.queue.running_id is not None,
            },
            "generations": self.worker.generations,
        }


def build_services(settings: Settings) -> Services:
    from inference.pipeline import ImagePipeline, LoadOptions, pick_device  # torch: only when building

    preset_name = settings.preset
    if preset_name == "auto":
        preset_name = DEFAULT_GPU_PRESET if pick_device(settings.device) == "cuda" else DEFAULT_CPU_PRESET
    preset = get_preset(preset_name)
    identity = ModelIdentity.resolve(preset, settings.model_id, settings.model_revision, settings.tiny_vae_id)
    pipeline = ImagePipeline(LoadOptions(preset, identity, settings.device, settings.dtype, settings.warmup))
    objects = LocalObjectStore(settings.output_dir, f"{settings.base_url}/outputs")
    cache = MemoryResultCache(settings.cache_max_entries, settings.cache_ttl_seconds)
    jobs = MemoryJobStore()
    worker = Worker(pipeline, identity, preset.sampler_label, cache, jobs, objects)
    queue = LocalQueue(worker.handle, settings.queue_max_size)
    gateway = Gateway(identity, cache, jobs, queue, worker)
    return Services(settings, pipeline, identity, objects, jobs, worker, queue, gateway)


# ---- Gradio handlers ------------------------------------------------------------------------------

class Handlers:
    """The functions behind the UI events and API endpoints. Errors become gr.Error here, at the edge."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.gateway = services.gateway

    def _request(self, prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
                 request_id=None):
        if seed == DERIVED_SEED:
            seed = None
        try:
            return GenerationRequest.create(
                prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
                self.services.settings.output_format, request_id or None,
            )
        except GenerationError as error:
            raise gr.Error(str(error), title="Invalid input") from None

    def _submit(self, request):
        try:
            return self.gateway.submit(request)
        except QueueFull as error:
            raise gr.Error(str(error), title="Busy") from None
        except GenerationError as error:
            raise gr.Error(str(error), title="Invalid input") from None

    def generate(self, prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
                 progress=gr.Progress()) -> Iterator[tuple]:
        started = time.perf_counter()
        request = self._request(prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed)
        job = self._submit(request)
        yield gr.skip(), gr.skip(), job.request_id  # lets the Cancel button find this job at once
        for job in self.gateway.follow(job.request_id, self.services.settings.request_timeout_seconds):
            self._show_progress(progress, job)
        if not job.finished:
            raise gr.Error(f"still running after {self.services.settings.request_timeout_seconds:.0f} s; "
                           f"ask /status with request_id {job.request_id}", title="Timeout")
        if job.state != "done":
            raise gr.Error(job.error or job.state, title=job.state.capitalize())
        result = dict(job.result, seed_derived=not request.seed_was_given)
        result["timings"] = dict(result.get("timings", {}), total_s=round(time.perf_counter() - started, 4))
        yield self._image_file(result), result, job.request_id

    def _show_progress(self, progress, job) -> None:
        if progress is None:
            return
        if job.state == "queued":
            position = self.gateway.queue_position(job)
            progress(None, desc=f"queued (position {position})" if position else "queued")
        elif job.state == "running" and job.total_steps:
            progress((job.step, job.total_steps), desc="generating", unit="steps")

    def _image_file(self, result: dict[str, Any]) -> str:
        objects = self.services.objects
        path = objects.local_path(result["object_key"])
        if path is None:  # remote store: fetch once into a temp file for the UI/API response
            suffix = Path(result["object_key"]).suffix
            with tempfile.NamedTemporaryFile(delete=False, suffix=suffix) as handle:
                handle.write(objects.get(result["object_key"]))
            path = Path(handle.name)
        return str(path)

    def submit(self, prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
               request_id) -> str:
        request = self._request(prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
                                request_id)
        return self._submit(request).request_id

    def status(self, request_id: str) -> dict[str, Any]:
        try:
            return self.gateway.status((request_id or "").strip())
        except UnknownRequest as error:
            raise gr.Error(str(error), title="Unknown request") from None

    def cancel(self, request_id: str) -> dict[str, Any]:
        try:
            return self.gateway.cancel((request_id or "").strip())
        except UnknownRequest as error:
            raise gr.Error(str(error), title="Unknown request") from None

    def banner(self) -> tuple[str, Any]:
        pipeline = self.services.pipeline
        ready = pipeline.state == "ready"
        if ready:
            text = f"Model ready: **{self.services.identity.model_id}** on {pipeline.device} ({pipeline.detail})."
        elif pipeline.state == "failed":
            text = f"⚠️ Model failed to load: {pipeline.error}"
        else:
            text = f"⏳ Model {pipeline.state}: {pipeline.detail} — requests are queued meanwhile."
        return text, gr.Timer(active=not ready and pipeline.state != "failed")


def _add_to_gallery(result: dict | None, image: str | None, gallery: list) -> tuple[list, list]:
    if result and image:
        caption = f"seed {result['seed']}" + (" (cached)" if result.get("cached") else "")
        gallery = [(image, caption)] + list(gallery or [])
    return gallery, gallery


def build_ui(services: Services):
    handlers = Handlers(services)
    preset = get_preset(services.identity.preset)
    with gr.Blocks(title="Crafterse image generation") as demo:
        gr.Markdown("# Crafterse image generation")
        banner = gr.Markdown(elem_id="model-banner")
        timer = gr.Timer(1.0)
        request_state = gr.State(None)
        gallery_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=3, max_length=2000, elem_id="prompt",
                                    placeholder="a mossy stone golem guarding a crystal cave, game art")
                negative_prompt = gr.Textbox(label="Negative prompt", lines=2, max_length=2000)
                preset_choice = gr.Dropdown([preset.name], value=preset.name, label="Preset", allow_custom_value=True,
                                            info=preset.description)
                # Plain number boxes, not sliders: out-of-range values must reach our validation, whose
                # messages name the field (a slider refuses them with a message that names nothing).
                with gr.Row():
                    width = gr.Number(preset.width, label="Width", precision=0, step=8,
                                      info=f"multiple of 8, {MIN_SIDE}..{MAX_SIDE}")
                    height = gr.Number(preset.height, label="Height", precision=0, step=8,
                                       info=f"multiple of 8, {MIN_SIDE}..{MAX_SIDE}")
                with gr.Row():
                    steps = gr.Number(preset.default_steps, label="Steps", precision=0,
                                      info=f"1..{preset.max_steps}")
                    guidance = gr.Number(preset.guidance_scale, label="Guidance scale", step=0.5,
                                         info=f"0..{MAX_GUIDANCE:g} (0 for turbo/lightning)")
                with gr.Row():
                    # The browser shows an empty number box as 0, so "derived" needs a value of its own.
                    seed = gr.Number(value=DERIVED_SEED, label="Seed", precision=0,
                                     info=f"{DERIVED_SEED}: derived from the prompt (same prompt, same image); "
                                          f"or 0..{MAX_SEED}")
                    randomize = gr.Button("Randomize seed", size="sm")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_btn = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=3):
                image = gr.Image(label="Image", type="filepath", format="png", elem_id="result-image",
                                 interactive=False)
                metadata = gr.JSON(label="Metadata", elem_id="metadata")
                gallery = gr.Gallery(label="This session", columns=4, height=240)
        with gr.Accordion("Jobs (queue without waiting, status, cancel)", open=False):
            request_id = gr.Textbox(label="Request id (optional on submit: makes retries idempotent)")
            with gr.Row():
                submit_btn = gr.Button("Submit")
                status_btn = gr.Button("Status")
                cancel_id_btn = gr.Button("Cancel this id")
            job_info = gr.JSON(label="Job")

        inputs = [prompt, negative_prompt, preset_choice, width, height, steps, guidance, seed]
        generate_btn.click(
            handlers.generate, inputs, [image, metadata, request_state], api_name="generate",
            concurrency_limit=None,
        ).then(_add_to_gallery, [metadata, image, gallery_state], [gallery, gallery_state],
               api_visibility="private")
        cancel_btn.click(handlers.cancel, request_state, job_info, api_name="cancel_current",
                         api_visibility="private")
        randomize.click(lambda: random.randint(0, MAX_SEED), None, seed, api_visibility="private")
        submit_btn.click(handlers.submit, inputs + [request_id], request_id, api_name="submit")
        status_btn.click(handlers.status, request_id, job_info, api_name="status")
        cancel_id_btn.click(handlers.cancel, request_id, job_info, api_name="cancel")
        timer.tick(handlers.banner, None, [banner, timer], api_visibility="private")
        demo.load(handlers.banner, None, [banner, timer], api_visibility="private")
    # Our own queue bounds the work; Gradio's only needs room for everyone waiting on it.
    demo.queue(max_size=max(64, services.settings.queue_max_size * 4), default_concurrency_limit=8)
    return demo


def build_app(services: Services):
    """FastAPI app: /healthz, the output folder under /outputs, and the Gradio UI + API at /."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.staticfiles import StaticFiles

    output_dir = services.settings.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        health = services.health()
        return JSONResponse(health, status_code=503 if health["status"] == "failed" else 200)

    app.mount("/outputs", StaticFiles(directory=output_dir), name="outputs")
    return gr.mount_gradio_app(app, build_ui(services), path="/", allowed_paths=[str(output_dir.resolve())],
                               ssr_mode=False, footer_links=["api", "gradio"])


def _exit_when_model_fails(services: Services, server, exit_code: list[int]) -> None:
    """A Space whose model cannot load should stop with the reason, not serve errors forever."""
    try:
        services.pipeline.wait_ready()
    except Exception as error:
        logger.error("%s", error)
        exit_code[0] = 2
        server.should_exit = True


def serve(services: Services) -> int:
    import uvicorn

    settings = services.settings
    app = build_app(services)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.server_name, port=settings.server_port,
                                           log_level="warning"))
    exit_code = [0]
    threading.Thread(target=_exit_when_model_fails, args=(services, server, exit_code), daemon=True).start()
    logger.info("serving on http://%s:%d (public URL %s)", settings.server_name, settings.server_port,
                settings.base_url)
    server.run()
    services.stop()
    return exit_code[0]


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level)
    try:
        services = build_services(settings)
    except Exception as error:  # bad configuration (unknown preset...): one line, no traceback
        logger.error("%s", error)
        return 2
    services.start()
    return serve(services)


if __name__ == "__main__":
    sys.exit(main())
