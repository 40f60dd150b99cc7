"""Validation, seed derivation and fingerprints: pure functions, no model needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from inference.errors import InvalidRequest
from inference.presets import PRESETS, ModelIdentity, get_preset
from inference.request import GenerationRequest
from storage.keys import fingerprint, object_key
from tests.conftest import REPO_ROOT

TURBO = ModelIdentity.resolve(get_preset("turbo"))


@pytest.mark.parametrize(
    ("changes", "field", "phrase"),
    [
        ({"prompt": "   "}, "prompt", "must not be blank"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000"),
        ({"prompt": 42}, "prompt", "must be text"),
        ({"negative_prompt": "y" * 2001}, "negative_prompt", "at most 2000"),
        ({"width": 500}, "width", "multiple of 8"),
        ({"width": 128}, "width", "256..2048"),
        ({"height": 4096}, "height", "256..2048"),
        ({"height": 512.5}, "height", "whole number"),
        ({"width": 768, "height": 1024}, "width x height", "pixels exceeds"),
        ({"steps": 0}, "steps", "1..4"),
        ({"steps": 5}, "steps", "1..4"),
        ({"steps": True}, "steps", "whole number"),
        ({"guidance_scale": -1}, "guidance_scale", "0..20"),
        ({"guidance_scale": float("nan")}, "guidance_scale", "0..20"),
        ({"guidance_scale": "7"}, "guidance_scale", "0..20"),
        ({"seed": -1}, "seed", "0..4294967295"),
        ({"seed": 2**32}, "seed", "0..4294967295"),
        ({"preset": "dalle"}, "preset", "unknown preset"),
        ({"output_format": "gif"}, "output_format", "png"),
        ({"request_id": "bad id!"}, "request_id", "letters, digits"),
    ],
)
def test_invalid_field_names_field_and_range(changes: dict, field: str, phrase: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        GenerationRequest.create(**{"prompt": "a castle", **changes})
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert phrase in str(raised.value)


def test_defaults_come_from_the_preset() -> None:
    request = GenerationRequest.create("a castle", preset="base")
    base = get_preset("base")
    assert (request.width, request.height, request.steps, request.guidance_scale) == (
        base.width, base.height, base.default_steps, base.guidance_scale)


def test_gradio_floats_are_accepted_as_whole_numbers() -> None:
    request = GenerationRequest.create("a castle", width=512.0, height=384.0, steps=2.0, seed=7.0)
    assert (request.width, request.height, request.steps, request.seed) == (512, 384, 2, 7)


def test_omitted_seed_is_derived_from_the_other_fields() -> None:
    first = GenerationRequest.create("a castle")
    assert first.seed == GenerationRequest.create("a castle").seed
    assert first.seed != GenerationRequest.create("a tower").seed
    assert not first.seed_was_given
    assert GenerationRequest.create("a castle", seed=first.seed).pixel_fields() == first.pixel_fields()


def test_request_ids_are_generated_or_kept() -> None:
    assert GenerationRequest.create("a").request_id != GenerationRequest.create("a").request_id
    assert GenerationRequest.create("a", request_id="game-42:retry.1").request_id == "game-42:retry.1"


def test_from_dict_round_trips_and_rejects_unknown_fields() -> None:
    request = GenerationRequest.create("a castle", negative_prompt="fog", seed=3, request_id="r1")
    assert GenerationRequest.from_dict(request.to_dict()) == request
    with pytest.raises(InvalidRequest, match="colour"):
        GenerationRequest.from_dict({"prompt": "a", "colour": "red"})
    with pytest.raises(InvalidRequest, match="prompt: is required"):
        GenerationRequest.from_dict({"seed": 1})


def test_visually_identical_prompts_share_a_fingerprint() -> None:
    composed = GenerationRequest.create("caf\u00e9 ", seed=1)
    decomposed = GenerationRequest.create("cafe\u0301", seed=1)
    assert fingerprint(composed, TURBO) == fingerprint(decomposed, TURBO)


BASE_FIELDS = {"prompt": "a castle", "negative_prompt": "fog", "preset": "lightning", "width": 1024,
               "height": 1024, "steps": 4, "guidance_scale": 0.0, "seed": 1, "output_format": "png"}


@pytest.mark.parametrize(
    "changes",
    [{"prompt": "a tower"}, {"negative_prompt": "rain"}, {"width": 1016}, {"height": 1016}, {"steps": 5},
     {"guidance_scale": 1.5}, {"seed": 2}, {"output_format": "webp"}, {"preset": "base", "steps": 4}],
)
def test_every_pixel_field_changes_the_fingerprint(changes: dict) -> None:
    identity = ModelIdentity.resolve(get_preset("lightning"))
    before = fingerprint(GenerationRequest.create(**BASE_FIELDS), identity)
    after = fingerprint(GenerationRequest.create(**{**BASE_FIELDS, **changes}), identity)
    assert before != after


@pytest.mark.parametrize(
    "model_changes",
    [{"model_id": "someone/other-sdxl"}, {"revision": "abc123"}, {"tiny_vae_id": "none"}],
)
def test_the_model_is_part_of_the_fingerprint(model_changes: dict) -> None:
    request = GenerationRequest.create(**BASE_FIELDS)
    lightning = get_preset("lightning")
    assert fingerprint(request, ModelIdentity.resolve(lightning)) != fingerprint(
        request, ModelIdentity.resolve(lightning, **model_changes))


def test_request_id_does_not_change_the_fingerprint() -> None:
    one = GenerationRequest.create(**BASE_FIELDS, request_id="one")
    two = GenerationRequest.create(**BASE_FIELDS, request_id="two")
    identity = ModelIdentity.resolve(get_preset("lightning"))
    assert fingerprint(one, identity) == fingerprint(two, identity)


FINGERPRINT_SCRIPT = """
import json, sys
from inference.presets import ModelIdentity, get_preset
from inference.request import GenerationRequest
from storage.keys import fingerprint
request = GenerationRequest.create("a castle", negative_prompt="fog")
print(json.dumps([request.seed, fingerprint(request, ModelIdentity.resolve(get_preset("turbo")))]))
"""


def test_fingerprint_and_derived_seed_are_stable_across_processes() -> None:
    outputs = set()
    for hash_seed in ("1", "2", "random"):
        run = subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True, env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"})
        outputs.add(run.stdout.strip())
    assert len(outputs) == 1
    seed, fp = json.loads(outputs.pop())
    request = GenerationRequest.create("a castle", negative_prompt="fog")
    assert [seed, fp] == [request.seed, fingerprint(request, TURBO)]


def test_object_keys_are_content_addressed() -> None:
    assert object_key("ab" + "0" * 62, "png") == f"images/ab/ab{'0' * 62}.png"


def test_every_preset_has_a_sane_budget() -> None:
    for preset in PRESETS.values():
        assert preset.default_steps <= preset.max_steps
        assert preset.width * preset.height <= preset.max_pixels
