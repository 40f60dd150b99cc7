"""The compiled UNet (COMPILE=on): serving starts eager, the AOTInductor package is
built in the background and used for the shape it was built for, a second start loads it from the
cache folder, and the image stays the eager image (to bf16 rounding)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import app as app_module
from inference.compiled import compile_cache_dir, cpu_description
from inference.pipeline import ImagePipeline, LoadOptions
from inference.presets import ModelIdentity, get_preset
from inference.request import GenerationRequest
from inference.revisions import pin
from tests.conftest import REPO_ROOT, app_env, free_port

PRESET = get_preset("turbo")  # default 512x512, one step: the CPU preset the compile is for


def _pipeline(tiny_model, cache, compile_choice: str) -> ImagePipeline:
    # Pinned as the app pins it (a local folder's digest is in the cache key): what `app.py --compile` built.
    identity = pin(ModelIdentity.resolve(PRESET, str(tiny_model.sdxl), None, str(tiny_model.taesd)))
    pipeline = ImagePipeline(LoadOptions(PRESET, identity, device="cpu", compile=compile_choice,
                                         compile_cache=cache))
    pipeline.load()
    return pipeline


def _render(pipeline: ImagePipeline, size: int = 512) -> np.ndarray:
    request = GenerationRequest.create("a red fox in the snow", preset="turbo", width=size, height=size, steps=1,
                                       seed=7)
    image = pipeline.generate(request, on_step=lambda step, total: None, should_cancel=lambda: False)
    return np.asarray(image, dtype=np.int16)


def _wait_compiled(pipeline: ImagePipeline, timeout: float = 800) -> dict:
    deadline = time.monotonic() + timeout
    while pipeline.compiled.state in ("eager", "compiling"):
        assert time.monotonic() < deadline, pipeline.compiled.describe()
        time.sleep(0.5)
    described = pipeline.compiled.describe()
    assert described["state"] == "compiled", described
    return described


@pytest.fixture(scope="module")
def eager_image(tiny_model, tmp_path_factory) -> np.ndarray:
    return _render(_pipeline(tiny_model, tmp_path_factory.mktemp("unused"), "off"))


def test_serving_starts_eager_then_uses_the_compiled_unet(tiny_model, tmp_path, eager_image) -> None:
    pipeline = _pipeline(tiny_model, tmp_path / "cache", "on")
    assert pipeline.ready and pipeline.compiled.state in ("eager", "compiling")  # the start did not wait
    built = _wait_compiled(pipeline)
    assert built["source"] == "built" and built["shapes"] == 1
    compiled_image = _render(pipeline)
    assert pipeline.compiled.calls["compiled"] == 1
    # Same seed, same pixels up to rounding (bf16 kernels differ in summation order).
    assert np.abs(compiled_image - eager_image).mean() < 2.0
    _render(pipeline, size=256)  # a shape it was not built for runs eager, with no compile in the request
    assert pipeline.compiled.calls["compiled"] == 1 and pipeline.compiled.state == "compiled"

    again = _pipeline(tiny_model, tmp_path / "cache", "on")  # a restart: the package comes from the cache
    loaded = _wait_compiled(again, timeout=120)
    assert loaded["source"] == "cache"
    assert np.array_equal(_render(again), compiled_image)


def test_a_package_built_ahead_with_app_compile_is_what_a_start_loads(tiny_model, tmp_path, eager_image) -> None:
    env = app_env(tiny_model, free_port(), tmp_path / "out", MODEL_PRESET="turbo", DEVICE="cpu",
                  COMPILE_CACHE_DIR=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "app.py", "--compile"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=800)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiled UNet written to" in run.stderr and "unet-1x4x64x64.pt2" in run.stderr
    pipeline = _pipeline(tiny_model, tmp_path / "cache", "on")
    assert _wait_compiled(pipeline, timeout=120)["source"] == "cache"
    image = _render(pipeline)  # the template written without the pipeline matches the pipeline's own call
    assert pipeline.compiled.calls == {"compiled": 1, "eager": 1}  # the warm-up ran eager, the request compiled
    assert np.abs(image - eager_image).mean() < 2.0


def test_the_cache_folder_is_keyed_by_machine_model_and_dtype(tmp_path) -> None:
    first = compile_cache_dir(tmp_path, "stabilityai/sdxl-turbo@main unet=", torch.bfloat16)
    assert first == compile_cache_dir(tmp_path, "stabilityai/sdxl-turbo@main unet=", torch.bfloat16)
    assert first != compile_cache_dir(tmp_path, "stabilityai/sdxl-turbo@abc123 unet=", torch.bfloat16)
    assert first != compile_cache_dir(tmp_path, "stabilityai/sdxl-turbo@main unet=", torch.float32)
    assert first.parent == tmp_path
    assert cpu_description()["model"]  # what the key and the benchmarks name


def test_compile_setting_is_checked_and_off_needs_no_torch_compile(tiny_model, tmp_path) -> None:
    with pytest.raises(ValueError, match="'COMPILE'.*on, off"):
        app_module.Settings.from_env({"COMPILE": "fast"})
    settings = app_module.Settings.from_env({"COMPILE": "off", "COMPILE_CACHE_DIR": str(tmp_path)})
    assert settings.compile == "off" and settings.compile_cache_dir == tmp_path
    assert _pipeline(tiny_model, tmp_path, "off").compiled is None
