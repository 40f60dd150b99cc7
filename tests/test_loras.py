"""Styles (LoRA): adapters from the Space's allow-list, made with peft for the tiny SDXL, loaded once and
switched per request; part of the fingerprint and of the PNG parameters."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from inference.errors import InvalidRequest
from inference.images import read_parameters
from inference.loras import parse_loras_setting
from inference.pipeline import ImagePipeline, LoadOptions
from inference.presets import ModelIdentity, get_preset
from inference.request import GenerationRequest
from storage.keys import fingerprint
from tests.conftest import open_form, start_app, stop_app

FIELDS = dict(negative_prompt="", preset="base", width=256, height=256, steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def lora_app(tiny_model, tmp_path_factory, loras_setting):
    app = start_app(tiny_model, tmp_path_factory.mktemp("lora-app"), MODEL_PRESET="base", WARMUP="0",
                    LORAS=loras_setting)
    yield app
    stop_app(app)


def test_request_styles_are_validated_sorted_and_fingerprinted(loras_setting) -> None:
    request = GenerationRequest.create("a knight", preset="base", seed=1, loras="pixel:0.8, ink")
    assert request.loras == (("ink", 1.0), ("pixel", 0.8))
    assert GenerationRequest.create("a knight", preset="base", seed=1,
                                    loras=[{"name": "pixel", "weight": 0.8}, ["ink", 1]]) == request
    assert GenerationRequest.from_dict(request.to_dict()) == request
    plain = GenerationRequest.create("a knight", preset="base", seed=1)
    assert "loras" not in plain.pixel_fields() and "loras" not in plain.to_dict()
    for bad, message in (("ink:9", "weight of 'ink' must be a number in -2..2"), ("a:1,b:1,c:1,d:1", "at most 3"),
                         ("ink, ink:0.5", "each style at most once"), ("Bad Name", "is not a name"), (42, "a list")):
        with pytest.raises(InvalidRequest, match="loras") as raised:
            GenerationRequest.create("a knight", preset="base", loras=bad)
        assert message in str(raised.value)
    specs = parse_loras_setting(loras_setting)
    identity = ModelIdentity.resolve(get_preset("base"), "m", None, None, loras=specs)
    base_identity = ModelIdentity.resolve(get_preset("base"), "m", None, None)
    assert fingerprint(plain, identity) == fingerprint(plain, base_identity)  # styles offered change nothing unused
    weaker = GenerationRequest.create("a knight", preset="base", seed=1, loras="pixel:0.5, ink")
    assert len({fingerprint(plain, identity), fingerprint(request, identity), fingerprint(weaker, identity)}) == 3
    moved = ModelIdentity.resolve(get_preset("base"), "m", None, None,
                                  loras=parse_loras_setting(json.dumps({"ink": "/other/ink", "pixel": "/p"})))
    assert fingerprint(request, moved) != fingerprint(request, identity)  # other weights: never the old image


def test_a_bad_loras_setting_stops_the_app_naming_it() -> None:
    for text, message in (("{not json", "LORAS is not JSON"), ('{"Ink": "/x"}', "name 'Ink'"),
                          ('{"ink": {}}', "needs a source"), ('["/x"]', "must be a JSON object")):
        with pytest.raises(ValueError, match="LORAS") as raised:
            parse_loras_setting(text)
        assert message in str(raised.value)


def test_adapters_switch_per_request_without_reloading(tiny_model, loras_setting) -> None:
    specs = parse_loras_setting(loras_setting)
    preset = get_preset("base")
    identity = ModelIdentity.resolve(preset, str(tiny_model.sdxl), None, str(tiny_model.taesd), loras=specs)
    pipeline = ImagePipeline(LoadOptions(preset, identity, device="cpu", warmup=False, loras=specs))
    pipeline.load()
    unet = pipeline._pipe.unet

    def render(loras) -> np.ndarray:
        request = GenerationRequest.create("a forge", seed=1, loras=loras, **FIELDS)
        return np.asarray(pipeline.generate(request, lambda step, total: None, lambda: False)).astype(int)

    plain, inked, plain_again, half, both = render(None), render("ink"), render(None), render("ink:0.5"), \
        render("ink, pixel")
    assert np.array_equal(plain, plain_again)  # a style never leaks into the next request
    assert np.abs(inked - plain).mean() > np.abs(half - plain).mean() > 0
    assert not np.array_equal(both, inked)
    assert pipeline._pipe.unet is unet and pipeline.prepacked.startswith("off")


def test_styles_through_the_api(lora_app) -> None:
    client = Client(lora_app.url, verbose=False)
    path, meta = client.predict("a knight", **FIELDS, seed=4, loras=["ink"], style_weight=0.8, api_name="/generate")
    with open(path, "rb") as handle:
        data = handle.read()
    assert read_parameters(data).splitlines()[0] == "a knight <lora:ink:0.8>"
    assert meta["loras"] == [{"name": "ink", "weight": 0.8}]
    plain_path, plain = client.predict("a knight", **FIELDS, seed=4, api_name="/generate")
    assert plain["fingerprint"] != meta["fingerprint"] and open(plain_path, "rb").read() != data
    again = client.predict("a knight", **FIELDS, seed=4, loras=["ink:0.8"], api_name="/generate")[1]
    assert again["cached"] is True and again["fingerprint"] == meta["fingerprint"]
    with pytest.raises(Exception, match="loras: unknown style 'oil'; this Space offers: ink \\(Ink wash\\), pixel"):
        client.predict("a knight", **FIELDS, seed=4, loras=["oil"], api_name="/generate")
    outcomes = client.predict([{"prompt": "a squire", **FIELDS, "seed": 5, "loras": "pixel:1.2"}],
                              api_name="/submit_batch")
    status = client.predict([outcomes[0]["request_id"]], 120, api_name="/wait_all")[outcomes[0]["request_id"]]
    assert status["state"] == "done", status


def test_styles_are_refused_where_the_space_offers_none(client) -> None:
    with pytest.raises(Exception, match="loras: unknown style 'ink'; this Space offers: none \\(LORAS is not set\\)"):
        client.predict("a knight", **FIELDS, seed=4, loras=["ink"], api_name="/generate")


def test_the_page_offers_the_styles(browser, lora_app, artifacts) -> None:
    page = open_form(browser, lora_app.url, "a lantern, ink wash style", height_px=1200, Width="256", Height="256",
                     Steps="3", Seed="6", **{"Guidance scale": "5"})
    page.locator("#styles input").click()
    page.get_by_role("option", name="Ink wash").click()
    page.get_by_label("Style weight").fill("0.7")
    page.locator("#generate").click()
    page.locator("#result-image img").wait_for(state="visible", timeout=60_000)
    page.locator("#metadata").get_by_text("fingerprint").wait_for(timeout=10_000)
    page.screenshot(path=str(artifacts / "lora.png"), full_page=True)
    image_url = page.locator("#result-image img").get_attribute("src")
    assert image_url
    client = Client(lora_app.url, verbose=False)
    meta = client.predict("a lantern, ink wash style", **FIELDS, seed=6, loras=["ink:0.7"], api_name="/generate")[1]
    assert meta["cached"] is True  # the page's click made exactly this request


@pytest.mark.timeout(600)
def test_a_topic_request_with_a_style_is_rendered_by_a_fleet_worker(fleet, loras_setting) -> None:
    fleet.start_worker("w1", LORAS=loras_setting)
    fleet.wait_for_workers(["w1"])
    request = GenerationRequest.create("a topic banner", seed=8, loras=[{"name": "pixel", "weight": 0.6}], **FIELDS)
    with fleet.client() as client:
        outcome = client.generate(request, timeout=120)
    assert outcome["state"] == "done", outcome
    data = fleet.s3.client.get_object(Bucket=fleet.bucket, Key=outcome["result"]["object_key"])["Body"].read()
    assert read_parameters(data).splitlines()[0] == "a topic banner <lora:pixel:0.6>"
    assert Image.open(io.BytesIO(data)).size == (256, 256)
