"""Encoded images carry the parameters other Stable Diffusion tools read."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from inference.images import encode, parameters_text, read_parameters
from inference.request import GenerationRequest


def test_parameters_text_is_in_the_a1111_format() -> None:
    request = GenerationRequest.create("a mossy golem", negative_prompt="blurry", preset="base", width=1024,
                                       height=768, steps=20, guidance_scale=7.5, seed=1234)
    assert parameters_text(request, "Euler", "stable-diffusion-xl-base-1.0") == (
        "a mossy golem\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 1234, Size: 1024x768, Model: stable-diffusion-xl-base-1.0"
    )


def test_without_negative_prompt_there_is_no_negative_line() -> None:
    text = parameters_text(GenerationRequest.create("a golem", seed=1), "Euler a", "sdxl-turbo")
    assert "Negative prompt" not in text
    assert text.splitlines()[1].startswith("Steps: 1, Sampler: Euler a, CFG scale: 0, Seed: 1, Size: 512x512")


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_encoded_images_round_trip_their_parameters(fmt: str) -> None:
    text = "ein Golem aus Moos, 苔のゴーレム\nSteps: 1"
    data = encode(Image.new("RGB", (64, 48), "green"), fmt, text)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == (fmt.upper(), (64, 48))
    assert read_parameters(data) == text
