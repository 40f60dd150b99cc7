"""The real diffusers pipeline (tiny weights) through the app's own loading code."""

from __future__ import annotations

import numpy as np
import pytest

from inference.errors import Cancelled, ModelUnavailable, UnsupportedOnDevice
from inference.pipeline import ImagePipeline, LoadOptions
from inference.presets import ModelIdentity, get_preset
from inference.request import GenerationRequest


def _pipeline(preset: str, model_id: str, tiny_vae_id: str | None = None) -> ImagePipeline:
    chosen = get_preset(preset)
    return ImagePipeline(LoadOptions(chosen, ModelIdentity.resolve(chosen, model_id, None, tiny_vae_id),
                                     warmup=False))


@pytest.fixture(scope="module")
def turbo(tiny_model) -> ImagePipeline:
    pipeline = _pipeline("turbo", str(tiny_model.sdxl), str(tiny_model.taesd))
    pipeline.load()
    return pipeline


def _generate(pipeline: ImagePipeline, request: GenerationRequest, cancel_after: int | None = None):
    steps: list[tuple[int, int]] = []
    image = pipeline.generate(
        request, on_step=lambda step, total: steps.append((step, total)),
        should_cancel=lambda: cancel_after is not None and len(steps) >= cancel_after,
    )
    return image, steps


def test_loads_with_the_presets_scheduler_and_tiny_vae(turbo: ImagePipeline) -> None:
    assert turbo.ready and turbo.state == "ready"
    assert type(turbo._pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert turbo._pipe.scheduler.config.timestep_spacing == "trailing"
    assert type(turbo._pipe.vae).__name__ == "AutoencoderTiny"


def test_same_seed_same_image_and_progress_per_step(turbo: ImagePipeline) -> None:
    request = GenerationRequest.create("a red cube", width=320, height=256, steps=3, seed=11)
    first, steps = _generate(turbo, request)
    second, _ = _generate(turbo, request)
    other, _ = _generate(turbo, GenerationRequest.create("a red cube", width=320, height=256, steps=3, seed=12))
    assert first.size == (320, 256)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_cancel_stops_between_steps(turbo: ImagePipeline) -> None:
    request = GenerationRequest.create("a red cube", steps=4, seed=1)
    steps: list = []
    with pytest.raises(Cancelled, match="at step 1/4"):
        turbo.generate(request, on_step=lambda s, t: steps.append(s), should_cancel=lambda: bool(steps))
    assert steps == [1]


def test_missing_weights_give_one_actionable_message(tmp_path) -> None:
    pipeline = _pipeline("turbo", str(tmp_path / "no-such-model"), "none")
    with pytest.raises(ModelUnavailable) as raised:
        pipeline.load()
    message = str(raised.value)
    assert "MODEL_ID" in message and "local folder" in message and "no-such-model" in message
    assert pipeline.state == "failed"
    with pytest.raises(ModelUnavailable):
        pipeline.wait_ready(0)


def test_full_vae_when_tiny_vae_is_switched_off(tiny_model) -> None:
    pipeline = _pipeline("base", str(tiny_model.sdxl), "none")
    pipeline.load()
    assert type(pipeline._pipe.vae).__name__ == "AutoencoderKL"
    image, _ = _generate(pipeline, GenerationRequest.create("a cube", preset="base", width=256, height=256,
                                                           steps=2, guidance_scale=5, seed=3))
    assert image.size == (256, 256)


def test_flux_is_refused_on_cpu_with_a_clear_message(tiny_model) -> None:
    pipeline = ImagePipeline(LoadOptions(get_preset("flux-schnell"),
                                         ModelIdentity.resolve(get_preset("flux-schnell")), device="cpu"))
    with pytest.raises(UnsupportedOnDevice, match="needs a GPU.*MODEL_PRESET=turbo"):
        pipeline.load()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_prepacked_unet_renders_the_image_eager_renders(tiny_model, dtype: str) -> None:
    """PREPACK: the UNet's convolutions (and in bf16 its linears) on oneDNN-packed weights give the same
    image as plain eager (within bf16 rounding), at the size they were packed for and at others, which
    run the convolutions' plain weights."""
    import torch

    from inference.prepack import PackedConv2d, PackedLinear, can_prepack

    chosen = get_preset("turbo")
    identity = ModelIdentity.resolve(chosen, str(tiny_model.sdxl), None, str(tiny_model.taesd))
    plain = ImagePipeline(LoadOptions(chosen, identity, dtype=dtype, warmup=False, prepack="off"))
    packed = ImagePipeline(LoadOptions(chosen, identity, dtype=dtype, warmup=False, prepack="on"))
    plain.load()
    packed.load()
    reason = can_prepack("cpu", getattr(torch, dtype))
    if reason is not None:  # a CPU without oneDNN bf16: PREPACK=on says why and renders plain
        assert packed.prepacked == f"off: {reason}"
    else:
        layers = list(packed._pipe.unet.modules())
        convolutions = [m for m in layers if isinstance(m, PackedConv2d)]
        linears = sum(isinstance(m, PackedLinear) for m in layers)
        assert f"{linears} linear layers and {len(convolutions)} convolutions (for 512x512)" in packed.prepacked
        assert linears == (len([m for m in plain._pipe.unet.modules() if type(m) is torch.nn.Linear])
                           if dtype == "bfloat16" else 0)  # float32 linears stay on MKL's sgemm
        assert not any(type(m) is torch.nn.Conv2d for m in layers if not any(m is c.conv for c in convolutions))
        assert packed._pipe.unet.conv_in.packed_for == (4, 64, 64)  # turbo's 512x512, in latent pixels
    assert plain.prepacked == "off (PREPACK=off)"
    tolerance = (2.0, 12) if dtype == "bfloat16" else (0.05, 1)
    for width, height in ((512, 512), (256, 256), (512, 384)):
        request = GenerationRequest.create("a red cube", width=width, height=height, steps=2, seed=3)
        a, _ = _generate(plain, request)
        b, _ = _generate(packed, request)
        difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert difference.mean() < tolerance[0] and np.percentile(difference, 99) <= tolerance[1], (
            width, difference.mean())
