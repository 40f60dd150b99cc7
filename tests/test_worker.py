"""The embedded request path in process: gateway -> local queue -> worker -> stores, real tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

import app
from inference.errors import InvalidRequest, QueueFull
from inference.images import read_parameters
from inference.request import GenerationRequest


@pytest.fixture
def services(tiny_model, tmp_path: Path):
    """Services with the model loaded but the queue not started, so tests decide when work runs."""
    settings = app.Settings(preset="turbo", model_id=str(tiny_model.sdxl), tiny_vae_id=str(tiny_model.taesd),
                            warmup=False, output_dir=tmp_path / "out", queue_max_size=4)
    built = app.build_services(settings)
    built.pipeline.load()
    yield built
    built.stop()


def _request(prompt: str = "a blue sphere", **fields) -> GenerationRequest:
    return GenerationRequest.create(prompt, width=256, height=256, steps=2, **fields)


def _wait_all(services, request_ids: list[str]) -> dict:
    return {rid: list(services.gateway.follow(rid, timeout=60))[-1] for rid in request_ids}


def test_identical_requests_in_flight_are_generated_once(services) -> None:
    same = [services.gateway.submit(_request(request_id=f"same-{i}")) for i in range(3)]
    other = services.gateway.submit(_request("a green cone"))
    assert services.queue.depth() == 2  # the identical ones share one queue slot
    services.queue.start()
    jobs = _wait_all(services, [job.request_id for job in same + [other]])
    assert services.worker.generations == 2
    results = [jobs[job.request_id].result for job in same]
    assert {r["url"] for r in results} == {results[0]["url"]}
    assert [r["request_id"] for r in results] == ["same-0", "same-1", "same-2"]
    assert all(job.state == "done" for job in jobs.values())


def test_repeat_is_a_cache_hit_with_the_stored_image(services) -> None:
    services.queue.start()
    first = _wait_all(services, [services.gateway.submit(_request()).request_id]).popitem()[1]
    again = services.gateway.submit(_request())
    assert again.state == "done" and again.result["cached"] is True
    assert again.result["url"] == first.result["url"] and services.worker.generations == 1
    data = services.objects.get(first.result["object_key"])
    assert Image.open(io.BytesIO(data)).size == (256, 256)
    assert "Steps: 2, Sampler: Euler a" in read_parameters(data)


def test_full_queue_refuses_with_a_busy_message(services) -> None:
    for i in range(4):
        services.gateway.submit(_request(f"prompt {i}"))
    with pytest.raises(QueueFull, match="busy"):
        services.gateway.submit(_request("one too many", request_id="overflow"))
    assert services.gateway.status("overflow")["state"] == "failed"


def test_request_ids_make_retries_idempotent(services) -> None:
    first = services.gateway.submit(_request(request_id="retry-me"))
    assert services.gateway.submit(_request(request_id="retry-me")).version == first.version
    assert services.queue.depth() == 1
    with pytest.raises(InvalidRequest, match="request_id.*different request"):
        services.gateway.submit(_request("another prompt", request_id="retry-me"))


def test_cancelling_a_queued_job_skips_it_but_not_its_twin(services) -> None:
    leader = services.gateway.submit(_request(request_id="leader"))
    twin = services.gateway.submit(_request(request_id="twin"))
    lonely = services.gateway.submit(_request("lonely", request_id="lonely"))
    assert services.gateway.cancel("leader")["state"] == "cancelled"
    assert services.gateway.cancel("lonely")["state"] == "cancelled"
    services.queue.start()
    jobs = _wait_all(services, [leader.request_id, twin.request_id, lonely.request_id])
    assert jobs["twin"].state == "done" and jobs["leader"].state == "cancelled"
    assert jobs["lonely"].state == "cancelled"
    assert services.worker.generations == 1


def test_status_of_an_unknown_request_says_so(services) -> None:
    with pytest.raises(KeyError, match="no request with id 'nope'"):
        services.gateway.status("nope")


def test_wrong_preset_is_refused(services) -> None:
    with pytest.raises(InvalidRequest, match="preset.*serves 'turbo'"):
        services.gateway.submit(GenerationRequest.create("a", preset="base", width=256, height=256))


def test_local_copies_are_bounded_least_recently_used_out(tmp_path) -> None:
    import os
    import time as clock

    from storage.objects import LocalObjectStore

    store = LocalObjectStore(tmp_path, "http://x/outputs", max_bytes=2500)
    for name in ("a", "b"):
        store.put(f"images/{name}.png", b"x" * 1000, "image/png")
        clock.sleep(0.02)
    os.utime(tmp_path / "images" / "a.png", (clock.time() + 5, clock.time() + 5))  # "a" was read lately
    store.put("images/c.png", b"x" * 1000, "image/png")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["a.png", "c.png"]
