"""The compiled UNet: faster steps on CPUs whose matrix units eager PyTorch leaves idle, without slow starts.

Eager PyTorch runs the SDXL UNet's linear and convolution layers through oneDNN with weights in their
plain layout, repacked on every call; on an AMX Xeon that leaves the matrix units waiting. An
AOTInductor package built with freezing folds the weights in as constants, prepacked once for oneDNN's
AMX kernels, and fuses the element-wise work around them (bench/profile_unet.py shows the op mix). But
building it takes minutes on a small machine, so:

- the app starts and serves eager at once; the package is built in a background thread, on the
  arguments the warm-up generation passed to the UNet (resized to the preset's default size), or
  ahead of time with `python app.py --compile`;
- packages live in a folder keyed by the CPU (model name and matrix units), torch and diffusers
  versions, the model and the dtype (`compile_cache_dir`): on a Space's persistent storage (/data) the
  next start loads the package (seconds) instead of building it;
- requests use the package only for the shapes it was built for (its inputs are static); any other
  size runs eager, and nothing is ever compiled inside a request;
- a build or load that would not fit in free memory is skipped (the Space serves eager rather than
  being killed), with the reason in /healthz.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MATRIX_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def cpu_description() -> dict[str, Any]:
    """The CPU model and its matrix units, as /proc/cpuinfo names them (what compiled kernels depend on)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {"model": model, "matrix_units": [flag for flag in MATRIX_FLAGS if flag in flags],
            "cpus": os.cpu_count()}


def compile_cache_dir(base: Path, model_key: str, dtype: torch.dtype) -> Path:
    """One folder per (CPU, matrix units, torch, diffusers, model, dtype): kernels built for one never
    load on another, and a new model revision or torch version starts a fresh folder."""
    import diffusers

    cpu = cpu_description()
    parts = [cpu["model"], ",".join(cpu["matrix_units"]), f"torch {torch.__version__}",
             f"diffusers {diffusers.__version__}", model_key, str(dtype)]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return base.expanduser() / digest


BUILD_MEMORY_FACTOR = 3.5  # free memory a build needs, in UNet weight sizes
LOAD_MEMORY_FACTOR = 1.3  # and a load from the cache


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def package_path(cache_dir: Path, latent_shape) -> Path:
    return cache_dir / f"unet-{'x'.join(str(n) for n in latent_shape)}.pt2"


def build_package(unet: torch.nn.Module, args: tuple, kwargs: dict, package: Path) -> None:
    """torch.export + AOTInductor with freezing: the weights are folded in as constants, prepacked for
    oneDNN's AMX linear and convolution kernels. Written under a temporary name, then renamed: a start
    killed mid-build leaves no half package for the next one to load."""
    package.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        exported = torch.export.export(unet, args, kwargs, strict=False)
    partial = package.with_name(f".{package.stem}.{os.getpid()}.partial.pt2")  # AOTInductor wants .pt2
    torch._inductor.aoti_compile_and_package(exported, package_path=str(partial), inductor_configs={"freezing": True})
    partial.replace(package)


def unet_template(unet: torch.nn.Module, batch: int, latent_size: tuple[int, int],
                  dtype: torch.dtype) -> tuple[tuple, dict]:
    """The arguments diffusers' SDXL pipeline passes the UNet, in its order and dtypes (the package
    accepts exactly these): for building a package without running the pipeline."""
    config = unet.config
    text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return ((torch.randn(batch, config.in_channels, *latent_size, dtype=dtype), torch.tensor(999.0)),
            {"encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, dtype=dtype),
             "timestep_cond": None, "cross_attention_kwargs": None,
             "added_cond_kwargs": {"text_embeds": torch.randn(batch, text_embeds, dtype=dtype),
                                   "time_ids": torch.randn(batch, 6, dtype=dtype)},
             "return_dict": False})


class CompiledUNet:
    """Replaces `unet.forward` with a dispatcher: compiled for the shapes built, eager for the rest."""

    def __init__(self, unet: torch.nn.Module, cache_dir: Path, latent_size: tuple[int, int]) -> None:
        self.unet = unet
        self.latent_size = latent_size  # the preset's default size, in latent pixels
        self.cache_dir = cache_dir
        self.state = "eager"  # eager -> compiling -> compiled | failed
        self.detail = ""
        self.compile_seconds: float | None = None
        self.source = ""  # built | cache
        self.calls = {"compiled": 0, "eager": 0}
        self._eager = unet.forward
        self._compiled: Callable | None = None
        self._ready_keys: set[tuple] = set()
        self._template: tuple[tuple, dict] | None = None
        self._recorded = threading.Event()
        unet.forward = self._dispatch

    @staticmethod
    def _key(args: tuple, kwargs: dict) -> tuple:
        tensors = [*args, *kwargs.values()]
        for extra in (kwargs.get("added_cond_kwargs") or {}).values():
            tensors.append(extra)
        return tuple((tuple(t.shape), t.dtype) for t in tensors if isinstance(t, torch.Tensor))

    def _dispatch(self, *args, **kwargs):
        if self._template is None:
            self._template = (args, kwargs)
            self._recorded.set()
        compiled = self._compiled
        if compiled is not None and self._key(args, kwargs) in self._ready_keys:
            try:
                output = compiled(*args, **kwargs)
                self.calls["compiled"] += 1
                return output
            except Exception as error:  # an input the package was not built for: eager from now on
                logger.warning("compiled UNet refused a call (%s); eager for these shapes", str(error)[:200])
                self._ready_keys.discard(self._key(args, kwargs))
        self.calls["eager"] += 1
        return self._eager(*args, **kwargs)

    def build_in_background(self, lock: threading.Lock) -> threading.Thread:
        """Compiles on the arguments of the first UNet call (the warm-up's) in a daemon thread."""
        thread = threading.Thread(target=self._build, args=(lock,), name="unet-compile", daemon=True)
        thread.start()
        return thread

    def _build(self, lock: threading.Lock) -> None:
        try:
            self._build_or_load(lock)
        except Exception as error:  # never leave "compiling" behind a dead thread: eager, with the reason
            self.state, self.detail = "failed", f"{type(error).__name__}: {str(error)[:200]} (serving eager)"
            logger.exception("UNet compile failed, serving eager")

    def _at_default_size(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The warm-up runs small; its latents are swapped for the default size's (every other UNet
        input has the same shape at any image size)."""
        sample = args[0] if args else kwargs["sample"]
        resized = torch.randn((*sample.shape[:2], *self.latent_size), dtype=sample.dtype, device=sample.device)
        if args:
            return (resized, *args[1:]), kwargs
        return args, {**kwargs, "sample": resized}

    def _build_or_load(self, lock: threading.Lock) -> None:
        if not self._recorded.wait(timeout=3600):
            return
        args, kwargs = self._at_default_size(*self._template)
        package = package_path(self.cache_dir, args[0].shape)
        self.source = "cache" if package.exists() else "built"
        if (refusal := self._memory_refusal(package)) is not None:
            self.state, self.detail = "skipped", refusal
            logger.warning("UNet compile skipped, serving eager: %s", refusal)
            return
        self.state, self.detail = "compiling", f"package {package}"
        started = time.perf_counter()
        if self.source == "built":
            # Export swaps the module's parameters for fake ones while it traces: no generation meanwhile
            # (seconds; the compile after it, minutes, works on the exported copy and holds nothing).
            with lock:
                build_package(self.unet, args, kwargs, package)
        runner = torch._inductor.aoti_load_package(str(package))
        with torch.inference_mode():
            runner(*args, **kwargs)  # the first call sets up oneDNN's primitives
        self.compile_seconds = time.perf_counter() - started
        with lock:  # swapped between generations, never during one
            self._compiled = runner
            self._ready_keys.add(self._key(args, kwargs))
        self.state = "compiled"
        self.detail = f"{'loaded' if self.source == 'cache' else 'built'} in {self.compile_seconds:.0f} s: {package}"
        logger.info("UNet %s", self.detail)

    def _memory_refusal(self, package: Path) -> str | None:
        """The package holds its own (prepacked) copy of the UNet's weights, and building it peaks at
        about three more (measured on the full SDXL UNet: +16 GB over the 5 GB eager UNet). A Space
        that runs out of memory restarts: better serve eager than risk that."""
        weights = sum(t.numel() * t.element_size() for t in self.unet.parameters())
        factor = LOAD_MEMORY_FACTOR if package.exists() else BUILD_MEMORY_FACTOR
        needed, available = factor * weights, available_memory()
        if available is None or available >= needed:
            return None
        how = ("" if package.exists() else
               f"; build it where memory allows with `python app.py --compile` and copy {self.cache_dir}")
        return (f"needs {needed / 1024**3:.1f} GB free for the {'load' if package.exists() else 'build'}, "
                f"{available / 1024**3:.1f} GB are{how}")

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail, "source": self.source,
                "compile_seconds": None if self.compile_seconds is None else round(self.compile_seconds, 1),
                "shapes": len(self._ready_keys), "calls": dict(self.calls)}
