"""A/B experiments (EXPERIMENT): a stable share of a preset's requests rendered with a variant's styles, the
arm recorded in the job, /status and /metrics, and designers' thumbs up/down counted per arm."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from gradio_client import Client

from inference.errors import InvalidRequest
from inference.images import read_parameters
from inference.loras import LoraCatalog, parse_loras_setting
from inference.presets import ModelIdentity, get_preset
from inference.request import GenerationRequest
from queueing.admission import identify, scoped_request_id
from queueing.experiments import check_experiment, parse_experiment_setting
from storage.keys import fingerprint
from tests.conftest import get_json, open_form, start_app, stop_app

FIELDS = dict(negative_prompt="", preset="base", width=256, height=256, steps=2, guidance_scale=5.0)
SETTING = json.dumps({"name": "ink-style", "share": 0.5, "variant": {"loras": ["ink:0.8"]}})
DESIGNER = "10.1.0.1"  # the address the proxy appends (the apps run with TRUSTED_PROXY_HOPS=1)


def experiment(setting: str = SETTING, offered: str = '{"ink": "/i", "pixel": "/p"}'):
    return check_experiment(parse_experiment_setting(setting), "base", LoraCatalog(parse_loras_setting(offered)))


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_the_setting_is_checked_naming_the_variable_and_field() -> None:
    assert parse_experiment_setting(None) is None
    for raw, words in (("{", "is not JSON"), ('["x"]', "must be a JSON object"),
                       ('{"name": "Ink Style", "share": 0.5, "variant": {"loras": ["ink"]}}', "field name"),
                       ('{"name": "a", "share": 1.5, "variant": {"loras": ["ink"]}}', "field share"),
                       ('{"name": "a", "share": 0.5}', "field variant"),
                       ('{"name": "a", "share": 0.5, "variant": {"loras": []}}', "at least one style"),
                       ('{"name": "a", "share": 0.5, "variant": {"loras": ["ink:9"]}}', "variant.loras: weight"),
                       ('{"name": "a", "share": 0.5, "variant": {"loras": ["ink"]}, "preset": "sd15"}', "field preset"),
                       ('{"name": "a", "share": 0.5, "variant": {"loras": ["ink"]}, "arms": 3}', "unknown field")):
        with pytest.raises(ValueError, match="Config 'EXPERIMENT'") as raised:
            experiment(raw)
        assert words in str(raised.value), raised.value
    with pytest.raises(ValueError, match="unknown style 'ink'.*add it to LORAS"):
        experiment(offered='{"pixel": "/p"}')
    assert experiment().preset == "base"  # the served preset when the setting names none
    assert experiment(SETTING[:-1] + ', "preset": "turbo"}').preset == "turbo"


def test_arms_are_stable_draws_of_the_share() -> None:
    chosen = experiment(SETTING.replace("0.5", "0.25"))
    ids = [f"request-{i}" for i in range(4000)]
    arms = [chosen.arm_for(request_id) for request_id in ids]
    assert arms == [chosen.arm_for(request_id) for request_id in ids]  # a retry lands in the same arm
    assert 0.22 < arms.count("variant") / len(arms) < 0.28
    assert {experiment(SETTING.replace("0.5", "0")).arm_for(i) for i in ids[:200]} == {"control"}
    assert {experiment(SETTING.replace("0.5", "1")).arm_for(i) for i in ids[:200]} == {"variant"}


def test_the_variant_arm_adds_the_styles_and_keeps_the_seed() -> None:
    always = experiment(SETTING.replace("0.5", "1"))
    request = GenerationRequest.create("a knight", preset="base")  # a derived seed
    variant = always.assign(request)
    assert (variant.experiment, variant.arm, variant.loras) == ("ink-style", "variant", (("ink", 0.8),))
    assert variant.seed == request.seed and variant.request_id == request.request_id
    identity = ModelIdentity.resolve(get_preset("base"), "m", None, None, loras=parse_loras_setting('{"ink": "/i"}'))
    assert fingerprint(variant, identity) != fingerprint(request, identity)
    assert GenerationRequest.from_dict(variant.to_dict()).arm == "variant"  # the arm travels with the request
    control = experiment(SETTING.replace("0.5", "0")).assign(request)
    assert (control.arm, control.loras) == ("control", ()) and fingerprint(control, identity) == fingerprint(request, identity)
    # Outside the experiment: the backend's bulk work, a designer's own style, another preset, an assigned one.
    for other in (GenerationRequest.create("a knight", preset="base", priority="bulk"),
                  GenerationRequest.create("a knight", preset="base", loras=["pixel"]),
                  GenerationRequest.create("a knight", preset="turbo"), variant):
        assert always.assign(other) is other
    with pytest.raises(InvalidRequest, match="experiment"):
        GenerationRequest.from_dict({"prompt": "x", "preset": "base", "arm": "variant"})


@pytest.fixture(scope="module")
def ab_app(tiny_model, tmp_path_factory, loras_setting):
    app = start_app(tiny_model, tmp_path_factory.mktemp("ab-app"), MODEL_PRESET="base", WARMUP="0",
                    LORAS=loras_setting, EXPERIMENT=SETTING, TRUSTED_PROXY_HOPS="1", MAX_JOBS_PER_USER="20")
    yield app
    stop_app(app)


def designer(app, address: str = DESIGNER) -> Client:
    return Client(app.url, verbose=False, headers={"X-Forwarded-For": address})


def test_requests_are_split_recorded_and_rated_per_arm(ab_app) -> None:
    client = designer(ab_app)
    chosen = [f"lamp-{i}" for i in range(8)]
    batch = [{"prompt": "a paper lamp", **FIELDS, "seed": 10 + i, "request_id": rid} for i, rid in enumerate(chosen)]
    assert [outcome["request_id"] for outcome in client.predict(batch, api_name="/submit_batch")] == chosen
    statuses = client.predict(chosen, 120, api_name="/wait_all")
    # The arm is the stable draw on the request's own (scoped) id: what the experiment says it must be.
    caller = identify(None, {"x-forwarded-for": DESIGNER}, "127.0.0.1", 1)
    expected = {rid: experiment().arm_for(scoped_request_id(caller, rid)) for rid in chosen}
    assert {rid: statuses[rid]["experiment"] for rid in chosen} == {
        rid: {"name": "ink-style", "arm": arm} for rid, arm in expected.items()}
    assert set(expected.values()) == {"control", "variant"}, expected  # these ids fall in both arms

    # A variant image is the ink style at 0.8 (the same request asked with that style is its cache hit);
    # a control image is the plain model (asked as bulk, outside the experiment, it is the cache hit).
    for rid, arm in expected.items():
        seed = statuses[rid]["result"]["seed"]
        if arm == "variant":
            twin = client.predict("a paper lamp", **FIELDS, seed=seed, loras=["ink:0.8"], api_name="/generate")[1]
        else:
            twin_id = client.predict("a paper lamp", **FIELDS, seed=seed, priority="bulk", api_name="/submit")
            twin = client.predict([twin_id], 60, api_name="/wait_all")[twin_id]["result"]
        assert twin["cached"] and twin["fingerprint"] == statuses[rid]["result"]["fingerprint"], (rid, arm)
    bulk = client.predict("a paper lamp", **FIELDS, seed=99, priority="bulk", api_name="/submit")
    assert "experiment" not in client.predict(bulk, api_name="/status")

    variant_id = next(rid for rid, arm in expected.items() if arm == "variant")
    control_id = next(rid for rid, arm in expected.items() if arm == "control")
    assert client.predict(variant_id, "up", api_name="/feedback")["feedback"] == "up"
    assert client.predict(variant_id, "up", api_name="/feedback")["feedback"] == "up"  # the same vote again: once
    with pytest.raises(Exception, match="already rated 'up': one vote per image"):
        client.predict(variant_id, "down", api_name="/feedback")
    assert client.predict(control_id, "down", api_name="/feedback")["feedback"] == "down"
    with pytest.raises(Exception, match="vote: must be one of"):
        client.predict(control_id, "meh", api_name="/feedback")
    with pytest.raises(Exception, match="no request with id 'lamp-1' of yours"):  # someone else's image
        designer(ab_app, "10.9.9.9").predict("lamp-1", "down", api_name="/feedback")

    with urllib.request.urlopen(f"{ab_app.url}/metrics") as response:
        text = response.read().decode()
    counts = list(expected.values())
    for arm in ("control", "variant"):
        assert metric(text, "imagegen_experiment_requests_total", experiment="ink-style", arm=arm) == counts.count(arm)
    assert metric(text, "imagegen_feedback_total", experiment="ink-style", arm="variant", vote="up") == 1
    assert metric(text, "imagegen_feedback_total", experiment="ink-style", arm="control", vote="down") == 1
    assert metric(text, "imagegen_feedback_total", experiment="ink-style", arm="variant", vote="down") == 0
    models = client.predict(api_name="/models")
    assert models["experiment"] == {"name": "ink-style", "preset": "base", "share": 0.5,
                                    "variant": {"loras": [{"name": "ink", "weight": 0.8}]}}


def test_an_experiment_on_a_style_the_space_does_not_offer_stops_the_app(tiny_model, tmp_path) -> None:
    with pytest.raises(RuntimeError, match="exited with 2") as raised:
        start_app(tiny_model, tmp_path, MODEL_PRESET="base", WARMUP="0", EXPERIMENT=SETTING)
    assert "Config 'EXPERIMENT' field variant.loras: unknown style 'ink'" in str(raised.value)
    assert "Traceback" not in str(raised.value)


def test_the_page_shows_the_version_and_the_arm_and_takes_a_thumbs_up(browser, ab_app, artifacts) -> None:
    page = open_form(browser, ab_app.url, "a paper lamp on a desk", height_px=1500, Width="256", Height="256",
                     Steps="2", Seed="3")
    commit = get_json(f"{ab_app.url}/healthz")[1]["model"]["commit"]  # the tiny model's folder digest
    page.locator("#model-banner").get_by_text(commit[:len("sha256:") + 12]).wait_for(timeout=10_000)
    page.locator("#generate").click()
    page.locator("#metadata").get_by_text("ink-style").wait_for(timeout=90_000)
    page.locator("#thumbs-up").click()
    page.locator("#rated").get_by_text(re.compile(r"Rated up \(experiment ink-style, arm (control|variant)\)")).wait_for(
        timeout=20_000)
    page.screenshot(path=str(artifacts / "experiment.png"), full_page=True)
    page.close()


def test_the_arm_travels_through_the_fleet_and_models_lists_its_workers(fleet, loras_setting) -> None:
    """A UI/API-only Space assigns the arm; a worker elsewhere renders the variant's styles from the topic."""
    always = SETTING.replace("0.5", "1")
    front = fleet.start_app("front", KAFKA_CONSUME="0", LORAS=loras_setting, EXPERIMENT=always)
    fleet.start_worker("w1", LORAS=loras_setting, EXPERIMENT=always)
    fleet.start_worker("w2", LORAS=loras_setting, EXPERIMENT=always)
    fleet.wait_for_workers(["w1", "w2"])
    client = Client(front.url, verbose=False)
    path, meta = client.predict("a fleet lantern", **FIELDS, seed=21, api_name="/generate")[:2]
    assert meta["worker"] in ("w1", "w2") and meta["experiment"] == {"name": "ink-style", "arm": "variant"}
    assert meta["loras"] == [{"name": "ink", "weight": 0.8}]
    with open(path, "rb") as handle:
        assert read_parameters(handle.read()).splitlines()[0] == "a fleet lantern <lora:ink:0.8>"
    models = get_json(f"{front.url}/models")[1]
    base = next(preset for preset in models["presets"] if preset["name"] == "base")
    assert base["served"] and [version["workers"] for version in base["versions"]] == [["w1", "w2"]]
    assert base["versions"][0]["commit"] == models["this_worker"]["commit"]  # one model folder, one digest
