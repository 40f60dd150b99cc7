"""Load once, generate with progress and cancel. With compiled.py (which it imports lazily), the only
module that imports torch and diffusers."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL import Image

from inference.errors import Cancelled, GenerationFailed, ModelUnavailable, UnsupportedOnDevice
from inference.loras import LoraSpec
from inference.presets import TAESDXL, ModelIdentity, Preset
from inference.preview import PreviewDecoder
from inference.request import GenerationRequest

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
PreviewCallback = Callable[[bytes], None]
# The warm-up image's side: the smallest the UNet's three levels and the decoders take (latents 8x8).
WARM_UP_SIDE = 64


@dataclass(frozen=True)
class LoadOptions:
    preset: Preset
    identity: ModelIdentity
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    warmup: bool = True
    compile: str = "off"  # on | off: see inference/compiled.py
    compile_cache: Path = Path("~/.cache/crafterse/compile")
    prepack: str = "auto"  # auto | on | off: see inference/prepack.py
    previews: bool = True  # live previews: see inference/preview.py
    preview_every_steps: int = 2
    loras: tuple[LoraSpec, ...] = ()  # LORAS: styles loaded beside the base model (inference/loras.py)
    preview_vae: str = TAESDXL  # the tiny VAE for previews when the model's own VAE is the full one


def cpu_supports_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX) make bf16 about twice as fast as fp32 on CPU;
    without them bf16 is emulated and slower, so fp32 is the better choice there."""
    from inference.compiled import cpu_description

    units = cpu_description()["matrix_units"]
    return "avx512_bf16" in units or "amx_bf16" in units


def cpu_has_amx() -> bool:
    from inference.compiled import cpu_description

    return "amx_bf16" in cpu_description()["matrix_units"]


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def _reason(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{type(error).__name__}: {first_line[:240]}"


def _unavailable(what: str, setting: str, value: str, error: BaseException) -> ModelUnavailable:
    return ModelUnavailable(
        f"Could not load {what} {value!r} ({_reason(error)}). Check {setting}: it takes a Hugging Face "
        f"model id (needs network access or a filled HF cache) or a local folder. Without network, "
        f"download the weights on a machine that has it (`hf download {value} --local-dir ./weights`) "
        f"and set {setting}=./weights."
    )


class ImagePipeline:
    """Owns the diffusers pipeline. Loaded once (in the background); generate() is called by one
    worker thread at a time, guarded by a lock in case a second caller appears."""

    def __init__(self, options: LoadOptions) -> None:
        self.options = options
        self.device = pick_device(options.device)
        self.dtype = pick_dtype(options.dtype, self.device)
        self.state = "not loaded"
        self.detail = ""
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._pipe: diffusers.DiffusionPipeline | None = None
        self._img2img: diffusers.DiffusionPipeline | None = None  # the same components, made on first use
        self.compiled = None  # inference.compiled.CompiledUNet once compiling is chosen
        self.prepacked: str | None = None  # what prepacking did, or why it did not (for /healthz)
        self.preview: PreviewDecoder | None = None  # set once loaded when PREVIEWS is on and a tiny VAE is there
        self._ready = threading.Event()
        self._lock = threading.Lock()

    # ---- loading -------------------------------------------------------------------------
    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self._load_logged, name="model-loader", daemon=True)
        thread.start()
        return thread

    def _load_logged(self) -> None:
        try:
            self.load()
        except Exception:  # already recorded in self.error; the app decides how to end
            pass

    def load(self) -> None:
        started = time.perf_counter()
        try:
            self._check_device()
            self._set_state("loading", f"loading {self.options.identity.model_id} on {self.device}")
            pipe = self._load_pipeline()
            self._load_loras(pipe)
            self._pipe = pipe
            if self._should_compile():
                self._start_compiling(pipe)
            else:
                self._prepack(pipe)
            self.preview = self._preview_decoder(pipe)
            if self.options.warmup or self.compiled is not None:
                self._set_state("warming up", "one small warm-up generation")
                self._warm_up()
        except Exception as error:
            self.error = str(error) if isinstance(error, ModelUnavailable | UnsupportedOnDevice) else (
                f"Model failed to load: {_reason(error)}"
            )
            self._set_state("failed", self.error)
            self._ready.set()
            raise
        self.load_seconds = time.perf_counter() - started
        self._set_state("ready", f"loaded in {self.load_seconds:.1f} s")
        self._ready.set()

    def _set_state(self, state: str, detail: str) -> None:
        self.state, self.detail = state, detail
        # A failure is reported once, by whoever waits on the model (the app logs it and exits).
        logger.log(logging.DEBUG if state == "failed" else logging.INFO, "model %s: %s", state, detail)

    @property
    def previews(self) -> bool:
        """Whether generate() can send previews (the worker asks before passing on_preview)."""
        return self.preview is not None

    def _preview_decoder(self, pipe: diffusers.DiffusionPipeline) -> PreviewDecoder | None:
        """The model's own VAE when it is the tiny one, else a TAESD loaded beside it (a few MB). Previews
        are a comfort: failing to load one turns them off with a warning, never the app."""
        if not self.options.previews or self.options.preview_every_steps < 1:
            return None
        if isinstance(pipe.vae, diffusers.AutoencoderTiny):
            return PreviewDecoder(pipe.vae)
        try:
            vae = self._from_pretrained(diffusers.AutoencoderTiny, self.options.preview_vae, "PREVIEW_VAE_ID",
                                        "preview VAE")
        except Exception as error:
            logger.warning("live previews are off: %s", _reason(error))
            return None
        return PreviewDecoder(vae.to(self.device, memory_format=torch.channels_last))

    def _check_device(self) -> None:
        preset = self.options.preset
        if self.device == "cpu" and not preset.cpu_supported:
            raise UnsupportedOnDevice(
                f"The {preset.name} preset needs a GPU ({preset.description}); this machine has none. "
                "Set MODEL_PRESET=turbo (or lightning) for CPU, or run on GPU hardware."
            )

    def _load_pipeline(self) -> diffusers.DiffusionPipeline:
        diffusers.utils.logging.disable_progress_bar()  # per-component bars only clutter server logs
        identity, preset = self.options.identity, self.options.preset
        pipeline_class = getattr(diffusers, preset.pipeline_class)
        # Hub weights load at the commit the identity was pinned to (inference/revisions.py): the pixels
        # are exactly those its fingerprints promise, even if "main" moves while this worker runs.
        pipe = self._from_pretrained(pipeline_class, identity.model_id, "MODEL_ID", "model",
                                     identity.hub_revision("model", identity.revision))
        if identity.unet_weights:
            self._load_unet_weights(pipe, preset.unet_weights, identity.hub_revision("unet_weights"))
        if identity.vae != "full":
            pipe.vae = self._from_pretrained(diffusers.AutoencoderTiny, identity.vae, "TINY_VAE_ID", "tiny VAE",
                                             identity.hub_revision("vae"))
        scheduler_class = getattr(diffusers, preset.scheduler)
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **dict(preset.scheduler_options))
        pipe.set_progress_bar_config(disable=True)
        # Decoders are conv-heavy: channels-last is what oneDNN's CPU convolutions want (bench/decode.py:
        # TAESD 0.74 -> 0.49 s, full VAE 8.3 -> 6.9 s at 512x512 in bf16). The UNet gains nothing.
        pipe.vae.to(memory_format=torch.channels_last)
        return pipe.to(self.device)

    def _from_pretrained(self, cls: type, source: str, setting: str, what: str, revision: str = "main"):
        is_local = Path(source).expanduser().is_dir()
        kwargs = {"dtype": self.dtype}
        if not is_local:
            kwargs["revision"] = revision
        try:
            # The fp16 files are half the download (and what the Space card preloads); they are
            # cast to the chosen dtype on load, which costs no visible quality.
            if not is_local:
                try:
                    return cls.from_pretrained(source, variant="fp16", **kwargs)
                except (OSError, ValueError):
                    logger.info("no fp16 variant of %s; loading the default files", source)
            return cls.from_pretrained(str(Path(source).expanduser()) if is_local else source, **kwargs)
        except Exception as error:
            raise _unavailable(what, setting, source, error) from error

    def _load_unet_weights(self, pipe: diffusers.DiffusionPipeline, weights: tuple[str, str],
                           revision: str = "main") -> None:
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file

        repo, filename = weights
        try:
            path = hf_hub_download(repo, filename, revision=revision)
        except Exception as error:
            raise _unavailable("UNet weights", "MODEL_ID", f"{repo}/{filename}", error) from error
        pipe.unet.load_state_dict(load_file(path))

    def _load_loras(self, pipe: diffusers.DiffusionPipeline) -> None:
        """Every allowed style, once, as a named adapter (peft); requests switch between them."""
        for spec in self.options.loras:
            self._set_state("loading", f"loading style {spec.name!r} from {spec.source}")
            is_local = Path(spec.source).expanduser().is_dir()
            options = {"weight_name": spec.weight_name} if spec.weight_name else {}
            if not is_local:
                options["revision"] = spec.revision
            try:
                pipe.load_lora_weights(str(Path(spec.source).expanduser()) if is_local else spec.source,
                                       adapter_name=spec.name, **options)
            except Exception as error:
                raise _unavailable(f"style {spec.name!r}", "LORAS", spec.source, error) from error
        if self.options.loras:
            pipe.disable_lora()  # a request without styles renders the base model exactly

    def _apply_loras(self, pipe: diffusers.DiffusionPipeline, request: GenerationRequest) -> None:
        if not self.options.loras:
            if request.loras:
                raise GenerationFailed("loras: this worker loaded no styles (LORAS is not set here)")
            return
        loaded = {spec.name for spec in self.options.loras}
        missing = [name for name, _ in request.loras if name not in loaded]
        if missing:
            raise GenerationFailed(f"loras: style(s) {missing} are not loaded on this worker")
        if request.loras:
            pipe.enable_lora()
            pipe.set_adapters([name for name, _ in request.loras], [weight for _, weight in request.loras])
        else:
            pipe.disable_lora()

    def _should_compile(self) -> bool:
        # Opt-in: on the 2-vCPU AMX Xeon measured so far the package did not beat eager (bench.speed
        # rows turbo and turbo+compiled) and it holds a second copy of the UNet's weights. Not with
        # styles: the package would bake in the base weights without the adapters.
        if self.options.compile == "on" and self.options.loras:
            logger.warning("COMPILE=on is ignored: LORAS adapters switch per request in eager mode")
            return False
        return self.options.compile == "on"

    def _prepack(self, pipe: diffusers.DiffusionPipeline) -> None:
        """PREPACK: auto prepacks where it was measured to pay (AMX CPUs: bench.speed turbo vs
        turbo+prepack); on wherever oneDNN can (float32 on any CPU: its convolutions, 1.06x per UNet step
        on an AVX2 EPYC for +1.3 GB, which is why auto leaves it off there); off never. Not with
        COMPILE=on (the package freezes and prepacks its own weights, and export needs plain ones)."""
        from inference.prepack import can_prepack, prepack_unet

        if self.options.prepack == "off":
            self.prepacked = "off (PREPACK=off)"
            return
        if self.options.loras:  # peft wraps the linear and conv layers; packed ones it could not switch
            self.prepacked = "off: LORAS adapters are loaded"
            return
        reason = can_prepack(self.device, self.dtype)
        if reason is None and self.options.prepack == "auto" and not cpu_has_amx():
            reason = "auto: only on AMX CPUs, where it was measured (PREPACK=on forces it)"
        if reason is not None:
            self.prepacked = f"off: {reason}"
            return
        self._set_state("loading", "prepacking the UNet's weights for oneDNN")
        batch = 2 if self.options.preset.guidance_scale > 1 else 1
        self.prepacked = prepack_unet(pipe.unet, self._default_latent_size(), batch, self.dtype)

    def _compile_cache_dir(self) -> Path:
        from inference.compiled import compile_cache_dir

        identity = self.options.identity
        model_key = f"{identity.model_id}@{identity.model_revision} unet={identity.unet_weights}"
        return compile_cache_dir(self.options.compile_cache, model_key, self.dtype)

    def _default_latent_size(self) -> tuple[int, int]:
        return self.options.preset.height // 8, self.options.preset.width // 8

    def _start_compiling(self, pipe: diffusers.DiffusionPipeline) -> None:
        """Serving starts eager; the UNet compiles in the background on the warm-up's own arguments,
        resized to the preset's default size, and requests of that shape switch to it once built."""
        from inference.compiled import CompiledUNet

        self.compiled = CompiledUNet(pipe.unet, self._compile_cache_dir(), latent_size=self._default_latent_size())
        self.compiled.build_in_background(self._lock)

    def build_compiled_package(self) -> Path:
        """`python app.py --compile`: the package for this model, preset and machine, built in the
        foreground (on a machine with memory to spare; copy the cache folder to smaller ones of the
        same CPU kind). Only the UNet stays loaded while it builds."""
        from inference.compiled import build_package, package_path, unet_template

        self._check_device()
        pipe = self._load_pipeline()
        unet = pipe.unet
        del pipe
        batch = 2 if self.options.preset.guidance_scale > 1 else 1
        args, kwargs = unet_template(unet, batch, self._default_latent_size(), self.dtype)
        package = package_path(self._compile_cache_dir(), args[0].shape)
        if package.exists():
            logger.info("the compiled UNet is already built: %s", package)
        else:
            build_package(unet, args, kwargs, package)
        return package

    def _warm_up(self) -> None:
        """One generation through every component before "ready": a model that cannot render fails the
        start, not the first user, and lazy initialisation (CUDA context, allocator) is paid here. At
        64x64, below what requests may ask: its kernels are not those of a real size anyway (oneDNN
        picks per shape), and on a float32 CPU a 256x256 warm-up cost 6.7 s of the start while the first
        512x512 request without one was no slower than the next (12.97 s, then 12.28 and 13.47 s)."""
        request = dataclasses.replace(GenerationRequest.create(
            "warm-up", preset=self.options.preset.name, width=256, height=256, steps=1, seed=0),
            width=WARM_UP_SIDE, height=WARM_UP_SIDE)
        self._run(request, on_step=lambda step, total: None, should_cancel=lambda: False)

    # ---- serving -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once loaded; raises ModelUnavailable if loading failed."""
        finished = self._ready.wait(timeout)
        if self.error:
            raise ModelUnavailable(self.error)
        return finished and self.ready

    def generate(self, request: GenerationRequest, on_step: StepCallback, should_cancel: CancelCheck,
                 init_image: Image.Image | None = None, on_preview: PreviewCallback | None = None) -> Image.Image:
        """init_image: the start image of an img2img request (request.init_image is its hash).
        on_preview: called with a small JPEG of the image so far every PREVIEW_EVERY_STEPS steps."""
        self.wait_ready()
        return self._run(request, on_step, should_cancel, init_image, on_preview)

    def _image_to_image(self) -> diffusers.DiffusionPipeline:
        """The img2img pipeline over the loaded components (from_pipe: no second copy of any weight,
        prepacked or compiled UNet included)."""
        if self._img2img is None:
            self._img2img = diffusers.AutoPipelineForImage2Image.from_pipe(self._pipe)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def _arguments(self, request: GenerationRequest, init_image: Image.Image | None) -> tuple[Any, dict]:
        if init_image is None:
            return self._pipe, {"width": request.width, "height": request.height}
        image = init_image.convert("RGB").resize((request.width, request.height), Image.Resampling.LANCZOS)
        return self._image_to_image(), {"image": image, "strength": request.strength}

    def _run(self, request: GenerationRequest, on_step: StepCallback, should_cancel: CancelCheck,
             init_image: Image.Image | None = None, on_preview: PreviewCallback | None = None) -> Image.Image:
        assert self._pipe is not None
        # img2img runs the last int(steps x strength) steps of the schedule (diffusers' rule).
        total = int(request.steps * request.strength) if init_image is not None else request.steps

        every = self.options.preview_every_steps

        def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            on_step(step + 1, total)
            # Not after the last step: the final image follows at once.
            if on_preview is not None and self.preview is not None and (step + 1) % every == 0 and step + 1 < total:
                jpeg = self.preview(tensors["latents"])
                if jpeg is not None:
                    on_preview(jpeg)
            if should_cancel():
                # Raising skips the remaining steps and the VAE decode, the costly part.
                raise Cancelled(f"request {request.request_id} was cancelled at step {step + 1}/{total}")
            return tensors

        if should_cancel():
            raise Cancelled(f"request {request.request_id} was cancelled before it started")
        with self._lock:
            self._apply_loras(self._pipe, request)
            try:
                pipe, arguments = self._arguments(request, init_image)
                output = pipe(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt or None,
                    **arguments,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    # A CPU generator gives the same starting noise on every device.
                    generator=torch.Generator("cpu").manual_seed(request.seed),
                    callback_on_step_end=step_end,
                )
            except Cancelled:
                raise
            except Exception as error:
                logger.exception("generation failed for request %s", request.request_id)
                raise GenerationFailed(f"generation failed: {_reason(error)}") from error
        return output.images[0]
