"""Request ids through the Gradio doors: optional, scoped to their caller, never a way into another's job."""

from __future__ import annotations

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.conftest import start_app, stop_app, wait_for_status

SMALL = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def proxied_app(tiny_model, tmp_path_factory):
    # TRUSTED_PROXY_HOPS=1 as on a Space: the test plays the proxy that appends the caller's address.
    app = start_app(tiny_model, tmp_path_factory.mktemp("access"), MODEL_PRESET="base", TRUSTED_PROXY_HOPS="1",
                    MAX_JOBS_PER_USER="20")
    yield app
    stop_app(app)


def _as(app, address: str) -> Client:
    return Client(app.url, verbose=False, headers={"X-Forwarded-For": address})


def test_submit_needs_no_request_id(proxied_app) -> None:
    client = _as(proxied_app, "192.0.2.10")
    request_id = client.predict(prompt="no id given", seed=1, **SMALL, api_name="/submit")
    assert len(request_id) == 32
    assert wait_for_status(client, request_id, lambda s: s["state"] == "done")["result"]["url"]


def test_a_chosen_id_is_scoped_to_its_caller(proxied_app) -> None:
    alice, mallory = _as(proxied_app, "192.0.2.11"), _as(proxied_app, "192.0.2.66")
    assert alice.predict(prompt="alice's dragon", seed=2, request_id="order-1", **SMALL,
                         api_name="/submit") == "order-1"
    done = wait_for_status(alice, "order-1", lambda s: s["state"] == "done")
    assert done["request_id"] == "order-1" and done["result"]["request_id"] == "order-1"
    # Mallory's "order-1" is a request of her own: it neither clashes with nor reveals Alice's.
    assert mallory.predict(prompt="mallory's lamp", seed=3, request_id="order-1", **SMALL,
                           api_name="/submit") == "order-1"
    theirs = wait_for_status(mallory, "order-1", lambda s: s["state"] == "done")
    assert theirs["result"]["object_key"] != done["result"]["object_key"]
    assert wait_for_status(alice, "order-1", lambda s: True)["result"]["object_key"] == done["result"]["object_key"]


def test_the_same_id_with_other_settings_is_refused(proxied_app) -> None:
    client = _as(proxied_app, "192.0.2.12")
    client.predict(prompt="first settings", seed=4, request_id="retry-key", **SMALL, api_name="/submit")
    with pytest.raises(AppError, match="already used for a different request"):
        client.predict(prompt="other settings", seed=4, request_id="retry-key", **SMALL, api_name="/submit")
    # the same settings again: the same job (idempotent retry)
    assert client.predict(prompt="first settings", seed=4, request_id="retry-key", **SMALL,
                          api_name="/submit") == "retry-key"


def test_only_the_owner_sees_and_cancels_a_chosen_id(proxied_app) -> None:
    owner, stranger = _as(proxied_app, "192.0.2.13"), _as(proxied_app, "192.0.2.99")
    slow = {**SMALL, "width": 512, "height": 512, "steps": 40}
    owner.predict(prompt="a private forge", seed=5, request_id="mine-5", **slow, api_name="/submit")
    wait_for_status(owner, "mine-5", lambda s: s["state"] in ("queued", "running"))
    for endpoint in ("/status", "/cancel"):
        with pytest.raises(AppError, match="no request with id 'mine-5' of yours"):
            stranger.predict(request_id="mine-5", api_name=endpoint)
    assert owner.predict(request_id="mine-5", api_name="/cancel")["request_id"] == "mine-5"
    assert wait_for_status(owner, "mine-5", lambda s: s["state"] == "cancelled")["state"] == "cancelled"


def test_an_overlong_chosen_id_names_the_field(proxied_app) -> None:
    with pytest.raises(AppError, match="request_id: at most 112 characters"):
        _as(proxied_app, "192.0.2.14").predict(prompt="x", seed=1, request_id="a" * 120, **SMALL,
                                               api_name="/submit")


def test_identity_rules() -> None:
    from queueing.admission import client_address, identify, may_see
    from storage.jobs import Job

    assert client_address("1.2.3.4, 203.0.113.5", "10.0.0.1", trusted_hops=1) == "203.0.113.5"
    assert client_address("forged, 203.0.113.5, 10.0.0.2", "10.0.0.1", trusted_hops=2) == "203.0.113.5"
    assert client_address("forged", "192.0.2.1", trusted_hops=0) == "192.0.2.1"  # no proxy: the peer
    alice = identify("alice", {}, "192.0.2.1", 1)
    assert alice.key == "user:alice" and alice.signed_in
    anonymous = identify(None, {"x-forwarded-for": "203.0.113.5"}, "10.0.0.1", 1)
    assert anonymous.key.startswith("ip:") and "203.0.113.5" not in anonymous.key  # kept as a hash
    private = Job(request_id="x", fingerprint="f", owner=alice.key, private=True)
    assert may_see(private, alice) and not may_see(private, anonymous)
    capability = Job(request_id="y", fingerprint="f", owner=anonymous.key, private=False)
    assert may_see(capability, alice)  # an anonymous random id: whoever holds it
