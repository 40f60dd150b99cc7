"""Waiting for jobs without polling: storage.jobs.JobWaiters wakes coroutines at a job's change, from the
process's own writes (MemoryJobStore) and from the fleet's through Redis pub/sub (RedisJobStore). The API's
waits (/generate and the page's progress, /wait_all) run on it: every API and fleet test goes through them."""

from __future__ import annotations

import asyncio
import threading
import time

import redis

from storage.jobs import DONE, RUNNING, Job, JobWaiters, MemoryJobStore

# Long enough that returning before it can only mean the change woke the waiter.
NEVER = 30.0


def _update_soon(store, request_id: str, delay: float = 0.3, **changes) -> threading.Thread:
    def update() -> None:
        time.sleep(delay)
        store.update(request_id, **changes)

    thread = threading.Thread(target=update)
    thread.start()
    return thread


async def _time_until_changed(waiters: JobWaiters, request_ids: list[str], timeout: float = NEVER) -> float:
    started = time.monotonic()
    with waiters.watch(request_ids) as watch:
        await watch.changed(timeout)
    return time.monotonic() - started


def test_a_change_from_another_thread_wakes_the_waiter() -> None:
    store = MemoryJobStore()
    store.create(Job("a", "fp-a"))
    store.create(Job("b", "fp-b"))
    waiters = JobWaiters(store)
    assert waiters.listening

    async def scenario() -> float:
        writer = _update_soon(store, "b", state=RUNNING)
        waited = await _time_until_changed(waiters, ["a", "b"])
        writer.join()
        return waited

    assert asyncio.run(scenario()) < NEVER / 3  # woken by b's change


def test_a_change_between_watching_and_waiting_is_not_lost() -> None:
    store = MemoryJobStore()
    store.create(Job("a", "fp-a"))
    waiters = JobWaiters(store)

    async def scenario() -> tuple[float, float]:
        with waiters.watch(["a"]) as watch:
            await asyncio.to_thread(store.update, "a", state=DONE)  # before the wait, as a read would be
            started = time.monotonic()
            await watch.changed(NEVER)
            first = time.monotonic() - started
            started = time.monotonic()
            await watch.changed(0.2)  # nothing new since: times out
            return first, time.monotonic() - started

    first, second = asyncio.run(scenario())
    assert first < NEVER / 3 and second >= 0.2


def test_other_jobs_and_unchanged_mirror_writes_do_not_wake() -> None:
    store = MemoryJobStore()
    job = store.create(Job("a", "fp-a"))
    store.create(Job("other", "fp-o"))
    heard: list[str] = []
    store.add_listener(heard.append)
    store.put(job)  # the Redis mirror re-puts what a read returned: no change, no wake-up
    assert heard == []
    waiters = JobWaiters(store)

    async def scenario() -> float:
        writer = _update_soon(store, "other", delay=0.05, state=RUNNING)
        waited = await _time_until_changed(waiters, ["a"], timeout=1.0)
        writer.join()
        return waited

    assert asyncio.run(scenario()) >= 1.0
    assert heard == ["other"]


def test_a_store_without_listeners_falls_back_to_its_timeout() -> None:
    class PlainStore:
        def get(self, request_id: str) -> None:
            return None

    waiters = JobWaiters(PlainStore())
    assert not waiters.listening
    assert asyncio.run(_time_until_changed(waiters, ["a"], timeout=0.2)) >= 0.2


def test_redis_job_changes_from_another_process_wake_the_waiter(redis_server) -> None:
    """Two stores on one Redis stand for two clones: a worker's update in one wakes the other's waiter
    through pub/sub (the store's reader thread), naming the request id."""
    from storage.health import BackendHealth
    from storage.redis_store import RedisJobStore
    from storage.resilient import RedisGuard, ResilientJobStore

    namespace = f"waiters-{time.monotonic_ns()}"
    worker_side = RedisJobStore(redis.Redis.from_url(redis_server.url), namespace, 3600)
    gateway_side = ResilientJobStore(RedisJobStore(redis.Redis.from_url(redis_server.url), namespace, 3600),
                                     RedisGuard(BackendHealth()))
    gateway_side.create(Job("r1", "fp-1"))
    server = redis.Redis.from_url(redis_server.url)
    patterns_before = server.pubsub_numpat()
    waiters = JobWaiters(gateway_side)
    deadline = time.monotonic() + 10
    while server.pubsub_numpat() <= patterns_before:  # the reader thread has subscribed: no change is missed
        assert time.monotonic() < deadline, "the job events reader never subscribed"
        time.sleep(0.02)

    async def scenario() -> float:
        writer = _update_soon(worker_side, "r1", delay=0.3, state=DONE)
        waited = await _time_until_changed(waiters, ["r1"])
        writer.join()
        return waited

    assert asyncio.run(scenario()) < NEVER / 3
    assert gateway_side.get("r1").state == DONE
