"""From a sketch (img2img): the start image is validated, stored in the object store, named by its hash
in the request (and so in the fingerprint), and read back by whichever worker runs it."""

from __future__ import annotations

import io
import json

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from inference.errors import InvalidRequest
from inference.images import init_image_key, prepare_init_image, read_parameters
from inference.request import GenerationRequest
from tests.conftest import open_form, wait_for_status

FIELDS = dict(negative_prompt="", preset="base", width=256, height=256, steps=4, guidance_scale=5.0)


def _png(path, size=(256, 256), colour=(200, 40, 40), mode="RGB") -> str:
    image = Image.new(mode, size, colour)
    if mode == "RGB":  # a rough "sketch": a dark block on a plain ground
        image.paste((20, 20, 90), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    image.save(path, format="PNG")
    return str(path)


def test_init_image_and_strength_are_in_the_fingerprint_and_text_to_image_is_unchanged() -> None:
    plain = GenerationRequest.create("a map", preset="base", seed=1)
    assert "init_image" not in plain.pixel_fields() and "init_image" not in plain.to_dict()
    sketch = GenerationRequest.create("a map", preset="base", seed=1, init_image="ab" * 32, strength=0.5)
    assert sketch.pixel_fields()["init_image"] == "ab" * 32 and sketch.pixel_fields()["strength"] == 0.5
    assert GenerationRequest.from_dict(sketch.to_dict()) == sketch
    assert GenerationRequest.create("a map", preset="base", seed=1, init_image="ab" * 32).strength == 0.6
    for bad in ("not-a-hash", "AB" * 32, 42):
        with pytest.raises(InvalidRequest, match="init_image"):
            GenerationRequest.create("a map", preset="base", init_image=bad)
    for bad in (0, 1.5, -0.2, "half", float("nan")):
        with pytest.raises(InvalidRequest, match="strength"):
            GenerationRequest.create("a map", preset="base", init_image="ab" * 32, strength=bad)
    with pytest.raises(InvalidRequest, match="strength: 0.2 with 4 steps runs no denoising step"):
        GenerationRequest.create("a map", preset="base", steps=4, init_image="ab" * 32, strength=0.2)


def test_start_images_are_normalised_and_bad_ones_refused_naming_the_field(tmp_path) -> None:
    def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    sha, png = prepare_init_image(encoded(transparent))
    assert Image.open(io.BytesIO(png)).convert("RGB").getpixel((5, 5)) == (255, 255, 255)  # paper, not black
    # The hash is of the pixels: the same picture as PNG and as lossless WebP is one image.
    red = Image.new("RGB", (16, 16), (250, 10, 10))
    assert prepare_init_image(encoded(red))[0] == prepare_init_image(encoded(red, "WEBP", lossless=True))[0]
    refused = {
        b"%PDF-1.4 not an image": "is not an image",
        encoded(Image.new("RGB", (2056, 16))): "is 2056x16; at most 2048 pixels a side",
        encoded(Image.new("I;16", (16, 16))): "has mode I;16",
        encoded(Image.new("CMYK", (16, 16)), "JPEG"): "has mode CMYK",
        encoded(Image.new("RGB", (16, 16)), "GIF"): "is GIF; use PNG, JPEG or WebP",
        b"\x89PNG" + b"\x00" * (21 * 2**20): "MB; at most 20 MB",
    }
    for data, message in refused.items():
        with pytest.raises(InvalidRequest, match="init_image") as raised:
            prepare_init_image(data)
        assert message in str(raised.value)


def test_generate_from_a_sketch_through_the_api(client, tmp_path) -> None:
    sketch = _png(tmp_path / "sketch.png")
    image_path, meta = client.predict("a castle gate", **FIELDS, seed=3, init_image=handle_file(sketch),
                                      strength=0.5, api_name="/generate")
    assert meta["cached"] is False and meta["strength"] == 0.5 and len(meta["init_image"]) == 64
    with open(image_path, "rb") as handle:
        data = handle.read()
    assert Image.open(io.BytesIO(data)).size == (256, 256)
    assert "Denoising strength: 0.5" in read_parameters(data)
    status = client.predict(meta["request_id"], api_name="/status")
    assert status["total_steps"] == 2  # int(steps x strength): the last two of four steps run

    again_path, again = client.predict("a castle gate", **FIELDS, seed=3, init_image=handle_file(sketch),
                                       strength=0.5, api_name="/generate")
    assert again["cached"] is True and again["object_key"] == meta["object_key"]
    stronger = client.predict("a castle gate", **FIELDS, seed=3, init_image=handle_file(sketch), strength=1.0,
                              api_name="/generate")[1]
    other = client.predict("a castle gate", **FIELDS, seed=3, strength=0.5, api_name="/generate",
                           init_image=handle_file(_png(tmp_path / "other.png", colour=(10, 200, 10))))[1]
    plain = client.predict("a castle gate", **FIELDS, seed=3, api_name="/generate")[1]
    keys = {meta["object_key"], stronger["object_key"], other["object_key"], plain["object_key"]}
    assert len(keys) == 4 and not (stronger["cached"] or other["cached"] or plain["cached"])
    assert "init_image" not in plain


def test_bad_sketches_are_refused_through_the_api_naming_the_field(client, tmp_path) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is a text file with a .png name")
    cases = [
        (handle_file(str(not_an_image)), 0.5, "init_image: is not an image"),
        (handle_file(_png(tmp_path / "wide.png", size=(2104, 64))), 0.5, "init_image: is 2104x64"),
        (handle_file(_png(tmp_path / "deep.png", size=(32, 32), colour=1000, mode="I;16")), 0.5,
         "init_image: has mode I;16"),
        (handle_file(_png(tmp_path / "ok.png")), 0.1, "strength: 0.1 with 4 steps runs no denoising step"),
    ]
    for image, strength, message in cases:
        with pytest.raises(Exception, match="init_image|strength") as raised:
            client.predict("a door", **FIELDS, seed=1, init_image=image, strength=strength, api_name="/generate")
        assert message in str(raised.value), str(raised.value)


@pytest.mark.timeout(600)
def test_a_fleet_worker_reads_the_sketch_from_the_object_store_not_the_message(fleet, tmp_path) -> None:
    from tests.test_fleet import _topic_messages

    fleet.start_worker("b")
    app_a = fleet.start_app("a", KAFKA_CONSUME="0")  # A only takes requests: B must fetch the sketch
    fleet.wait_for_workers(["b"])
    client = Client(app_a.url, verbose=False)
    sketch = _png(tmp_path / "sketch.png", size=(512, 384))
    request_id = client.predict("a harbour crane", **FIELDS, seed=5, init_image=handle_file(sketch), strength=0.75,
                                api_name="/submit")
    done = wait_for_status(client, request_id, lambda s: s["state"] in ("done", "failed"))
    assert done["state"] == "done" and done["result"]["worker"] == "b", done
    sha, png = prepare_init_image(open(sketch, "rb").read())
    stored = fleet.s3.client.get_object(Bucket=fleet.bucket, Key=init_image_key(sha))["Body"].read()
    assert stored == png
    [message] = [m for m in _topic_messages(fleet.bootstrap, f"{fleet.prefix}.requests.base")
                 if json.loads(m.value)["request"]["prompt"] == "a harbour crane"]
    assert json.loads(message.value)["request"]["init_image"] == sha
    assert len(message.value) < 2048  # the hash travels, never the pixels
    # A producer naming a start image nobody uploaded: the worker looks in the store and says so.
    missing = GenerationRequest.create("a ghost ship", seed=6, init_image="0" * 64, strength=0.5, **FIELDS)
    with fleet.client() as backend:
        outcome = backend.generate(missing, timeout=120)
    assert outcome["state"] == "failed" and "init_image 000000000000... is not in the object store" in outcome["error"]


def test_the_page_starts_from_an_uploaded_sketch(browser, app_server, tmp_path, artifacts) -> None:
    sketch = _png(tmp_path / "sketch.png", size=(320, 320), colour=(240, 220, 160))
    page = open_form(browser, app_server.url, "a treasure map, drawn from my sketch", height_px=1300,
                     Width="256", Height="256", Steps="4", Seed="9")
    page.get_by_text("Start from a sketch (optional)").click()
    page.locator("#init-image input[type=file]").set_input_files(sketch)
    page.locator("#init-image img").first.wait_for(state="visible", timeout=20_000)
    page.get_by_label("Strength").fill("0.75")
    page.locator("#generate").click()
    page.locator("#result-image img").wait_for(state="visible", timeout=60_000)
    page.locator("#metadata").get_by_text("strength").wait_for(timeout=10_000)
    metadata = "".join(page.locator("#metadata").inner_text().split())
    assert '"strength":0.75' in metadata and '"init_image":"' in metadata
    page.screenshot(path=str(artifacts / "img2img.png"), full_page=True)
