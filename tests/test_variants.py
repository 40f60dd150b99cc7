"""Variants: num_images 1..4 per click (seeds seed, seed+1, ...). Each variant is a request of its own,
cached and stored on its own, so a later request for one of its seeds is a cache hit."""

from __future__ import annotations

import pytest
from gradio_client import Client

from tests.conftest import start_app, stop_app

SMALL = {"width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


def test_variants_come_on_consecutive_seeds_and_each_is_cached_on_its_own(client) -> None:
    image, metadata, gallery = client.predict(prompt="a variant lantern", seed=100, num_images=3, **SMALL,
                                              api_name="/generate_variants")
    assert [entry["seed"] for entry in metadata["variants"]] == [100, 101, 102]
    assert [entry["state"] for entry in metadata["variants"]] == ["done"] * 3
    assert len({entry["url"] for entry in metadata["variants"]}) == 3  # three images, three objects
    assert len(gallery) == 3 and [item["caption"] for item in gallery] == ["seed 100", "seed 101", "seed 102"]
    assert metadata["seed"] == 100 and image.endswith(".png")
    with open(gallery[0]["image"], "rb") as first, open(gallery[1]["image"], "rb") as second:
        assert first.read() != second.read()
    # The middle variant asked for alone: the same stored image, from the cache.
    _, alone = client.predict(prompt="a variant lantern", seed=101, **SMALL, api_name="/generate")
    assert alone["cached"] is True and alone["url"] == metadata["variants"][1]["url"]


def test_a_derived_seed_starts_the_run_and_one_image_is_the_default(client) -> None:
    _, single, gallery = client.predict(prompt="a derived variant", seed=-1, **SMALL, api_name="/generate_variants")
    assert len(single["variants"]) == 1 and len(gallery) == 1 and single["seed_derived"] is True
    _, pair, _ = client.predict(prompt="a derived variant", seed=-1, num_images=2, **SMALL,
                                api_name="/generate_variants")
    derived = single["seed"]
    assert [entry["seed"] for entry in pair["variants"]] == [derived, (derived + 1) % 2**32]
    assert pair["variants"][0]["cached"] is True  # the first variant is the single image of before


@pytest.mark.parametrize("count", [0, 5, 1.5, "two"])
def test_a_bad_num_images_is_refused_naming_the_field(client, count) -> None:
    with pytest.raises(Exception, match="num_images: must be"):
        client.predict(prompt="too many", seed=1, num_images=count, **SMALL, api_name="/generate_variants")


def test_variants_over_the_in_flight_cap_are_refused_whole(tiny_model, tmp_path) -> None:
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", MAX_JOBS_PER_USER="2")
    try:
        client = Client(app.url, verbose=False)
        with pytest.raises(Exception, match="image 3 of 3 refused: you already have 2 requests in progress"):
            client.predict(prompt="over the cap", seed=1, num_images=3, **SMALL, api_name="/generate_variants")
        # Nothing of the refused click holds the cap: two variants go through at once.
        _, metadata, _ = client.predict(prompt="under the cap", seed=1, num_images=2, **SMALL,
                                        api_name="/generate_variants")
        assert [entry["state"] for entry in metadata["variants"]] == ["done", "done"]
    finally:
        stop_app(app)
