"""Every Redis store on a real local Redis Cluster (three masters, one replica each), through the
failover of a master: the cache, the job store and its events, the claims, the rate and in-flight limits,
the fleet registry, and the app itself."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid

import pytest
import redis
from gradio_client import Client

from storage.jobs import Job
from storage.keys import job_key
from storage.limits import RedisInflightLimit, RedisRateLimiter
from queueing.connectivity import redis_endpoints
from storage.redis_store import (RedisClaims, RedisFleet, RedisJobStore, RedisResultCache, redis_client,
                                 split_cluster_url)
from tests.conftest import start_app, stop_app
from tests.services import RedisClusterServer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    server = RedisClusterServer(tmp_path_factory.mktemp("redis-cluster"))
    yield server
    server.stop()


def _eventually(check, timeout: float = 20.0):
    """The first commands after a failover may fail while the client learns the new slot map."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_every_store_works_on_a_cluster_through_a_master_failover(cluster) -> None:
    client = redis_client(cluster.url)
    assert type(client).__name__ == "RedisCluster"
    ns = f"c{uuid.uuid4().hex[:6]}"
    cache, jobs = RedisResultCache(client, ns, 3600), RedisJobStore(client, ns, 3600)
    claims, fleet = RedisClaims(client, ns, 30), RedisFleet(client, ns, 30)
    rate, inflight = RedisRateLimiter(client, ns, 3), RedisInflightLimit(client, ns, 2, 60)

    cache.put("fp-1", {"url": "https://r2/x.png"})
    jobs.create(Job(request_id="r1", fingerprint="fp-1"))
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: jobs.wait("r1", 0, 10) and woke.set())
    waiter.start()
    time.sleep(0.5)
    jobs.update("r1", state="running", step=1)  # a waiter on another connection wakes (cluster pub/sub)
    waiter.join(10)
    assert woke.is_set()
    assert claims.claim("fp-1", "r1@w1") is None and claims.claim("fp-1", "r2@w2") == "r1@w1"
    assert [rate.hit("user").allowed for _ in range(4)] == [True, True, True, False]
    assert inflight.acquire("user", "r1", lambda _: False) is None
    assert inflight.acquire("user", "r2", lambda _: False) is None
    assert inflight.acquire("user", "r3", lambda _: False) is not None  # the cap of 2 holds
    fleet.beat("w1", {"preset": "turbo"})
    time.sleep(1.0)  # replication to the replicas is asynchronous (well under a second here)

    killed = cluster.master_of(job_key(ns, "r1"))
    cluster.fail_over(killed)  # killed; its replica takes over

    assert _eventually(lambda: jobs.get("r1")).state == "running"
    assert _eventually(lambda: jobs.update("r1", state="done")).state == "done"
    assert _eventually(lambda: cache.get("fp-1")) == {"url": "https://r2/x.png"}
    assert _eventually(lambda: claims.claim("fp-1", "r2@w2")) == "r1@w1"
    assert _eventually(lambda: rate.hit("user")).allowed is False
    assert _eventually(lambda: [w["worker"] for w in fleet.workers()]) == ["w1"]
    claims.release("fp-1", "r1@w1")
    assert claims.claim("fp-1", "r2@w2") is None

    alive = cluster.live_ports()[0]
    flag = redis_client(f"redis://127.0.0.1:{alive}/0", cluster=True)  # REDIS_CLUSTER=1, one node named
    assert type(flag).__name__ == "RedisCluster" and flag.get(f"{ns}:nothing") is None
    # A URL whose first node is the dead one: the client discovers the cluster through the next one.
    dead_first = redis_client(f"redis+cluster://127.0.0.1:{killed},127.0.0.1:{alive}/0")
    assert _eventually(lambda: json.loads(dead_first.get(job_key(ns, "r1")))["state"]) == "done"
    with pytest.raises(redis.exceptions.RedisClusterException):  # no live node named: a clear refusal
        redis_client(f"redis+cluster://127.0.0.1:{killed}/0")


def test_the_app_keeps_its_jobs_on_a_cluster(cluster, tiny_model, tmp_path) -> None:
    cluster.wait_healthy()
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", REDIS_URL=cluster.url)
    try:
        _, meta = Client(app.url, verbose=False).predict(
            prompt="a clustered forge", seed=1, negative_prompt="", preset="base", width=256, height=256, steps=2,
            guidance_scale=5.0, api_name="/generate")
        health = json.loads(urllib.request.urlopen(f"{app.url}/healthz", timeout=5).read())
        assert health["backends"]["jobs"] == "redis" and health["status"] == "ok", health
        job = redis_client(cluster.url).get(job_key("imagegen", meta["request_id"]))
        assert json.loads(job)["state"] == "done"
    finally:
        stop_app(app)


def test_a_cluster_url_names_several_startup_nodes_and_keeps_its_credentials_out_of_health() -> None:
    first, others = split_cluster_url("rediss://default:s3cret@redis-0:7000, redis-1:7001,[::1]/0?ssl_cert_reqs=none")
    assert first == "rediss://default:s3cret@redis-0:7000/0?ssl_cert_reqs=none"
    assert [(node.host, node.port) for node in others] == [("redis-1", 7001), ("::1", 6379)]
    endpoints = redis_endpoints("redis+cluster://default:s3cret@redis-0:7000,redis-1:7001/0")
    assert [(e.host, e.port) for e in endpoints] == [("redis-0", 7000), ("redis-1", 7001)]
    assert "s3cret" not in repr(endpoints)
    with pytest.raises(ValueError, match="host"):
        split_cluster_url("redis://a:1,:bad/0")
