"""Live previews: the running job carries a small JPEG of the image so far, every PREVIEW_EVERY_STEPS steps,
decoded by the tiny VAE; /status returns it, the page shows it, other clones see it through Redis."""

from __future__ import annotations

import io

import pytest
from gradio_client import Client
from PIL import Image

from inference.pipeline import ImagePipeline, LoadOptions
from inference.presets import ModelIdentity, get_preset
from inference.images import image_from_data_url
from inference.request import GenerationRequest
from tests.conftest import open_form, wait_for_status

SLOW = dict(negative_prompt="", preset="base", width=512, height=512, steps=30, guidance_scale=5.0)


def _pipeline(tiny_model, tiny_vae: str, **options) -> ImagePipeline:
    preset = get_preset("base")
    identity = ModelIdentity.resolve(preset, str(tiny_model.sdxl), None, tiny_vae)
    pipeline = ImagePipeline(LoadOptions(preset, identity, device="cpu", warmup=False, **options))
    pipeline.load()
    return pipeline


def _previews(pipeline: ImagePipeline, steps: int, size: int = 512) -> tuple[list[bytes], list[int]]:
    request = GenerationRequest.create("a forge", preset="base", width=size, height=size, steps=steps,
                                       guidance_scale=5.0, seed=1)
    jpegs, at_step, current = [], [], [0]

    def on_step(step: int, total: int) -> None:
        current[0] = step

    def on_preview(jpeg: bytes) -> None:
        jpegs.append(jpeg)
        at_step.append(current[0])

    pipeline.generate(request, on_step, lambda: False, on_preview=on_preview)
    return jpegs, at_step


def test_previews_come_every_few_steps_small_and_not_after_the_last(tiny_model) -> None:
    pipeline = _pipeline(tiny_model, str(tiny_model.taesd), preview_every_steps=2)
    assert pipeline.previews
    jpegs, at_step = _previews(pipeline, steps=7)
    assert at_step == [2, 4, 6]  # step 7 is the last: the final image follows
    for jpeg in jpegs:
        image = Image.open(io.BytesIO(jpeg))
        assert image.format == "JPEG" and image.size == (256, 256)  # 512x512 decoded at half size
        assert len(jpeg) < 30_000


def test_previews_use_a_separate_tiny_vae_when_the_model_decodes_with_the_full_one(tiny_model) -> None:
    pipeline = _pipeline(tiny_model, "none", preview_vae=str(tiny_model.taesd), preview_every_steps=3)
    assert pipeline._pipe.vae.__class__.__name__ == "AutoencoderKL" and pipeline.previews
    assert _previews(pipeline, steps=4, size=256)[1] == [3]


def test_previews_can_be_turned_off_and_a_missing_preview_vae_only_turns_them_off(tiny_model, tmp_path) -> None:
    off = _pipeline(tiny_model, str(tiny_model.taesd), previews=False)
    assert not off.previews and _previews(off, steps=4, size=256)[0] == []
    missing = _pipeline(tiny_model, "none", preview_vae=str(tmp_path / "no-such-vae"))
    assert missing.ready and not missing.previews  # the model serves; only previews are off


def test_status_returns_the_preview_while_running(client) -> None:
    request_id = client.predict("a slow lighthouse", seed=2, **SLOW, api_name="/submit")
    running = wait_for_status(client, request_id, lambda s: s["state"] == "running" and s["preview"], timeout=120)
    assert running["preview"].startswith("data:image/jpeg;base64,")
    assert image_from_data_url(running["preview"]).size == (256, 256)
    done = wait_for_status(client, request_id, lambda s: s["state"] == "done", timeout=300)
    assert done["preview"] is None and done["result"]["url"]  # the image replaces it


def test_the_page_shows_the_image_while_it_forms(browser, app_server, artifacts) -> None:
    page = open_form(browser, app_server.url, "a slowly forming dragon egg", height_px=1100, Width="512",
                     Height="512", Steps="30", Seed="3")
    page.locator("#generate").click()
    page.locator("#result-image img").wait_for(state="visible", timeout=120_000)
    # The final answer fills the metadata; an image before it is a preview of the running generation.
    assert "fingerprint" not in page.locator("#metadata").inner_text()
    page.screenshot(path=str(artifacts / "preview.png"), full_page=True)
    page.get_by_role("button", name="Cancel", exact=True).click()
    page.get_by_text("cancelled").first.wait_for(timeout=60_000)


@pytest.mark.timeout(600)
def test_another_clone_sees_the_workers_previews_through_redis(fleet) -> None:
    fleet.start_worker("b")
    app_a = fleet.start_app("a", KAFKA_CONSUME="0")
    fleet.wait_for_workers(["b"])
    client = Client(app_a.url, verbose=False)
    request_id = client.predict("a far-away bellows", seed=4, **SLOW, api_name="/submit")
    running = wait_for_status(client, request_id, lambda s: s["state"] == "running" and s["preview"], timeout=180)
    assert running["worker"] == "b" and image_from_data_url(running["preview"]).format == "JPEG"
    client.predict(request_id, api_name="/cancel")
