"""The routing decision on its own: share, threshold, no workers, health and the hourly budget."""

from __future__ import annotations

from inference.request import GenerationRequest
from queueing.routing import Router, share_bucket
from storage.limits import MemoryRateLimiter


def _request(i: int = 0) -> GenerationRequest:
    return GenerationRequest.create(f"route {i}", preset="turbo", seed=i)


def _router(wait: float = 0.0, workers: int = 1, available: bool = True, overflow: float | None = 30.0,
            share: float = 0.0, budget: int = 0) -> Router:
    return Router(lambda: {"backlog": 3, "workers": workers, "estimated_wait_s": wait}, lambda: available,
                  MemoryRateLimiter(budget), overflow, share, budget)


def test_a_deep_queue_overflows_and_a_short_one_stays() -> None:
    deep = _router(wait=45.0).decide(_request())
    assert deep.remote and "estimated wait 45 s > OVERFLOW_AFTER_SECONDS=30" in deep.reason
    short = _router(wait=12.0).decide(_request())
    assert short.backend == "fleet" and "<= OVERFLOW_AFTER_SECONDS=30" in short.reason
    assert not _router(wait=10_000, overflow=None).decide(_request()).remote  # no threshold: no overflow


def test_no_live_worker_goes_remote_unless_the_service_is_down() -> None:
    assert _router(workers=0).decide(_request()).reason == "no live turbo worker in the fleet"
    down = _router(workers=0, available=False).decide(_request())
    assert down.backend == "fleet" and "GPU service is unavailable" in down.reason


def test_share_is_stable_per_request_id_and_close_to_the_setting() -> None:
    requests = [_request(i) for i in range(2000)]
    router = _router(share=0.1)
    remote = [r.request_id for r in requests if router.decide(r).remote]
    assert 150 <= len(remote) <= 250  # about 10%
    assert all(_router(share=0.1).decide(r).remote == (r.request_id in remote) for r in requests[:200])
    assert not any(_router(share=0.0).decide(r).remote for r in requests[:200])  # rollback
    assert all(_router(share=1.0).decide(r).remote for r in requests[:200])
    assert 0 <= share_bucket("x") < 1


def test_the_budget_sends_the_rest_to_the_fleet() -> None:
    router = _router(workers=0, budget=2)
    decisions = [router.decide(_request(i)) for i in range(3)]
    assert [d.backend for d in decisions] == ["remote", "remote", "fleet"]
    assert "REMOTE_MAX_PER_HOUR=2 is spent" in decisions[2].reason and decisions[2].label == "remote budget spent"


def test_what_the_gpu_service_cannot_render_stays_on_the_fleet() -> None:
    """Its predictor takes neither a start image nor styles: sent there, the image would lack them but be
    cached under their fingerprint (an A/B variant arm is such a request)."""
    router = _router(workers=0, share=1.0)
    assert router.decide(_request()).remote
    styled = GenerationRequest.create("route", preset="turbo", seed=1, loras=["ink:0.8"])
    sketch = GenerationRequest.create("route", preset="turbo", seed=1, init_image="a" * 64, strength=1.0)
    for request, words in ((styled, "GPU service loads no LORAS"), (sketch, "GPU service takes no start image")):
        decision = router.decide(request)
        assert decision.backend == "fleet" and words in decision.reason
