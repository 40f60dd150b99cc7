"""Property-based bad input: the API names the field, the topic dead-letters with a reason, nothing crashes."""

from __future__ import annotations

import json
import math
import time

import pytest
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.errors import InvalidRequest
from inference.request import GenerationRequest
from queueing.messages import MalformedMessage, decode_request, encode_request
from tests.conftest import get_json

FIELDS = ("prompt", "negative_prompt", "preset", "width", "height", "steps", "guidance_scale", "seed",
          "output_format", "request_id")
VALID = {"prompt": "a rune stone", "negative_prompt": "", "preset": "base", "width": 256, "height": 256,
         "steps": 2, "guidance_scale": 5.0, "seed": 1}

odd_text = st.one_of(
    st.text(max_size=50), st.text(min_size=2001, max_size=2100), st.just(""), st.just("   \t\n"),
    st.sampled_from(["\x00", "a\x00b", "\u202e\u200b", "🧪" * 700, "ｗｉｄｅ", "e\u0301" * 1100]),
)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | odd_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=5,
)
numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.booleans(), st.none(),
                    st.text(max_size=10), st.lists(st.integers(), max_size=2))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), any_json, max_size=len(FIELDS)))
def test_any_values_give_a_request_or_an_error_naming_a_field(values: dict) -> None:
    try:
        request = GenerationRequest.create(**{"prompt": "x", **values})
    except InvalidRequest as error:
        assert error.field in FIELDS + ("width x height",), error
        assert str(error).startswith(f"{error.field}: ")
        return
    assert 1 <= len(request.prompt) <= 2000 and request.width % 8 == 0 and 0 <= request.seed < 2**32
    assert math.isfinite(request.guidance_scale)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.binary(max_size=300), any_json.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["v", "request", "attempt", "extra"]), any_json)
                 .map(lambda d: json.dumps(d).encode()),
                 st.builds(lambda r: json.dumps({"v": 1, "request": r}).encode(),
                           st.dictionaries(st.sampled_from(FIELDS + ("colour",)), any_json, max_size=6))))
def test_any_message_decodes_or_is_malformed_with_a_reason(raw: bytes) -> None:
    try:
        envelope = decode_request(raw)
    except MalformedMessage as error:
        assert str(error)
        return
    assert decode_request(encode_request(envelope.request)).request == envelope.request


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedMessage, match="at most 65536 allowed"):
        decode_request(b"{" + b" " * 70_000 + b"}")


bad_field = st.one_of(
    st.tuples(st.just("prompt"), st.sampled_from(["", "   ", "x" * 2001, "a\x00b"])),
    st.tuples(st.just("negative_prompt"), st.just("y" * 2001)),
    st.tuples(st.just("preset"), st.one_of(st.text(max_size=8).filter(lambda t: t.strip() not in ("base",)),
                                           st.integers())),
    st.tuples(st.sampled_from(["width", "height"]),
              numbers.filter(lambda n: not (isinstance(n, int) and not isinstance(n, bool) and 256 <= n <= 2048
                                            and n % 8 == 0) and n is not None
                             and not (isinstance(n, float) and not math.isfinite(n)))),
    st.tuples(st.just("steps"), st.one_of(st.integers(max_value=0), st.integers(min_value=51), st.text(max_size=5),
                                          st.floats(0.1, 50).filter(lambda f: not f.is_integer()))),
    st.tuples(st.just("guidance_scale"), st.one_of(st.floats(max_value=-0.01), st.floats(min_value=20.01),
                                                   st.text(max_size=5)).filter(
        lambda g: not (isinstance(g, float) and not math.isfinite(g)))),
    st.tuples(st.just("seed"), st.one_of(st.integers(max_value=-2), st.integers(min_value=2**32), st.text(min_size=1,
                                                                                                           max_size=5))),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_field)
def test_api_names_the_bad_field_and_stays_healthy(client, app_server, field_and_value) -> None:
    field, value = field_and_value
    with pytest.raises(AppError) as raised:
        client.predict(**{**VALID, field: value}, request_id="", api_name="/submit")
    message = str(raised.value)
    assert message.startswith(field) or message.startswith("width x height"), message
    assert "Traceback" not in message
    assert get_json(f"{app_server.url}/healthz")[1]["status"] == "ok"


def _malformed_messages(count: int) -> list[bytes]:
    """A varied, repeatable batch: every way a producer can get the wire format wrong."""
    import random

    rng = random.Random(0)
    makers = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),       # binary garbage
        lambda: b"{not json",                                                          # broken JSON
        lambda: json.dumps(rng.choice([None, 1, "x", [1, 2]])).encode(),              # not an object
        lambda: json.dumps({"v": rng.choice([0, 2, "1", None]), "request": VALID}).encode(),  # wrong version
        lambda: json.dumps({"v": 1}).encode(),                                         # no request
        lambda: json.dumps({"v": 1, "request": {**VALID, "width": rng.choice([-8, 7, "wide", 1.5])}}).encode(),
        lambda: json.dumps({"v": 1, "request": {**VALID, "colour": "red"}}).encode(),  # unknown field
        lambda: json.dumps({"v": 1, "request": {**VALID, "prompt": "x" * 3000}}).encode(),
        lambda: json.dumps({"v": 1, "request": VALID, "attempt": rng.choice([0, -1, "2", True])}).encode(),
        lambda: b'{"v": 1, "request": {"prompt": NaN}}',
        lambda: b"{" + b" " * 70_000 + b"}",                                           # oversized
    ]
    return [makers[i % len(makers)]() for i in range(count)]


@pytest.mark.timeout(300)
def test_malformed_messages_on_the_topic_all_dead_letter_and_the_worker_serves_on(fleet) -> None:
    from kafka import KafkaProducer

    from tests.test_fleet import _request, _topic_messages

    fleet.start_worker("fuzzed")
    fleet.wait_for_workers(["fuzzed"])
    bad = _malformed_messages(110)
    producer = KafkaProducer(bootstrap_servers=fleet.bootstrap, max_request_size=2_000_000)
    for raw in bad:
        producer.send(f"{fleet.prefix}.requests", value=raw)
    producer.flush()
    producer.close()
    with fleet.client() as client:
        assert client.generate(_request("still serving", seed=9), timeout=120)["state"] == "done"
    deadline, dead = time.monotonic() + 60, []
    while len(dead) < len(bad) and time.monotonic() < deadline:  # partitions drain in no global order
        dead = [json.loads(m.value) for m in _topic_messages(fleet.bootstrap, f"{fleet.prefix}.dlq")]
    assert len(dead) == len(bad) and all(d["reason"] for d in dead)
    assert fleet.processes["fuzzed"].poll() is None
