"""The backend's batch through gradio_client: /submit_batch queues several requests in one call,
/wait_all waits for all of them; validation refuses a whole batch before anything is queued, and the
per-user limits count every request of a batch."""

from __future__ import annotations

import pytest
from gradio_client import Client

from tests.conftest import start_app, stop_app

SMALL = {"width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


def test_a_batch_is_queued_in_one_call_and_waited_for_in_another(client) -> None:
    outcomes = client.predict(requests=[{"prompt": "a batch barrel", "seed": 21, **SMALL},
                                        {"prompt": "a batch crate", "request_id": "batch-crate-1", **SMALL},
                                        {"prompt": "a batch barrel", "seed": 21, **SMALL}],
                              api_name="/submit_batch")
    assert [set(outcome) for outcome in outcomes] == [{"request_id"}] * 3
    assert outcomes[1] == {"request_id": "batch-crate-1"}  # a chosen id comes back as chosen
    ids = [outcome["request_id"] for outcome in outcomes]
    statuses = client.predict(request_ids=ids, timeout_seconds=120, api_name="/wait_all")
    assert set(statuses) == set(ids)
    assert all(status["state"] == "done" for status in statuses.values()), statuses
    first, _, twin = (statuses[i]["result"] for i in ids)
    assert first["seed"] == 21 and twin["url"] == first["url"]  # the same request: one image
    assert statuses["batch-crate-1"]["request_id"] == "batch-crate-1"


def test_one_invalid_request_refuses_the_batch_naming_it_and_queues_nothing(client) -> None:
    with pytest.raises(Exception, match=r"requests\[1\]\.width: must be a multiple of 8"):
        client.predict(requests=[{"prompt": "never queued", "request_id": "batch-never", **SMALL},
                                 {"prompt": "a bad one", **SMALL, "width": 300}], api_name="/submit_batch")
    with pytest.raises(Exception, match="no request with id 'batch-never'"):
        client.predict(request_id="batch-never", api_name="/status")
    with pytest.raises(Exception, match=r"requests\[0\]: unknown field\(s\) widht"):
        client.predict(requests=[{"prompt": "typo", "widht": 256}], api_name="/submit_batch")
    with pytest.raises(Exception, match=r"requests\[0\]\.request_id: must be a string, got 7"):
        client.predict(requests=[{"prompt": "a number for an id", "request_id": 7}], api_name="/submit_batch")
    with pytest.raises(Exception, match="requests: must be a non-empty list"):
        client.predict(requests=[], api_name="/submit_batch")


def test_wait_all_refuses_unknown_ids_and_bad_timeouts(client) -> None:
    with pytest.raises(Exception, match="no request with id 'batch-unknown'"):
        client.predict(request_ids=["batch-unknown"], timeout_seconds=1, api_name="/wait_all")
    with pytest.raises(Exception, match="timeout_seconds: must be in 0..900"):
        client.predict(request_ids=[], timeout_seconds=-1, api_name="/wait_all")


def test_the_limits_count_every_request_of_a_batch(tiny_model, tmp_path) -> None:
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", WARMUP="0", MAX_JOBS_PER_USER="2",
                    BATCH_MAX_REQUESTS="3")
    try:
        api = Client(app.url, verbose=False)
        with pytest.raises(Exception, match=r"at most 3 per batch \(BATCH_MAX_REQUESTS\), got 4"):
            api.predict(requests=[{"prompt": f"many {i}"} for i in range(4)], api_name="/submit_batch")
        outcomes = api.predict(requests=[{"prompt": f"limited {i}", **SMALL, "steps": 40} for i in range(3)],
                               api_name="/submit_batch")
        assert ["request_id" in outcome and "error" not in outcome for outcome in outcomes] == [True, True, False]
        assert outcomes[2]["error"].startswith("Too many requests"), outcomes[2]
        queued = [outcome["request_id"] for outcome in outcomes[:2]]
        statuses = api.predict(request_ids=queued, timeout_seconds=0, api_name="/wait_all")
        assert all(status["state"] in ("queued", "running") for status in statuses.values())  # no wait at 0
        for request_id in queued:
            api.predict(request_id=request_id, api_name="/cancel")
    finally:
        stop_app(app)
