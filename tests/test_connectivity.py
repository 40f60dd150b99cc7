"""Startup self-check: unreachable backends are named (host:port, Spaces port rule), secrets never shown."""

from __future__ import annotations

import json
import urllib.request

from queueing.connectivity import Endpoint, check, url_endpoint
from tests.conftest import free_port, get_json, start_app, stop_app

SECRETS = {"REDIS_URL": "redis://default:TopSecretRedisPw@127.0.0.1:{redis}/0",
           "KAFKA_SASL_PASSWORD": "TopSecretKafkaPw", "R2_ACCESS_KEY_ID": "AKIDTOPSECRETID",
           "R2_SECRET_ACCESS_KEY": "TopSecretR2Key"}
SECRET_VALUES = ("TopSecretRedisPw", "TopSecretKafkaPw", "AKIDTOPSECRETID", "TopSecretR2Key")


def test_closed_port_is_named_with_the_spaces_rule() -> None:
    port = free_port()
    message = check(Endpoint("Redis", "127.0.0.1", port), timeout=1)
    assert message.startswith(f"Redis unreachable at 127.0.0.1:{port}")
    assert f"only on ports 80, 443 and 8080, so port {port} is blocked there" in message
    assert check(Endpoint("R2/S3", "127.0.0.1", 443), timeout=1).endswith(")")  # 443 is allowed: no note


def test_url_endpoints_drop_credentials() -> None:
    assert url_endpoint("Redis", "rediss://u:pw@cache.example.com/0", 6379) == Endpoint("Redis", "cache.example.com", 6379)
    assert url_endpoint("R2/S3", "https://acct.r2.cloudflarestorage.com", 80).port == 443


def test_unreachable_redis_and_s3_are_reported_and_secrets_never_shown(tiny_model, tmp_path) -> None:
    redis_port, s3_port = free_port(), free_port()
    app = start_app(tiny_model, tmp_path, REDIS_URL=SECRETS["REDIS_URL"].format(redis=redis_port),
                    S3_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}", R2_BUCKET="images",
                    R2_ACCESS_KEY_ID=SECRETS["R2_ACCESS_KEY_ID"], R2_SECRET_ACCESS_KEY=SECRETS["R2_SECRET_ACCESS_KEY"],
                    KAFKA_SASL_PASSWORD=SECRETS["KAFKA_SASL_PASSWORD"])
    try:
        code, health = get_json(f"{app.url}/healthz")
        assert code == 200
        problems = " | ".join(health["unreachable"])
        assert f"Redis unreachable at 127.0.0.1:{redis_port}" in problems
        assert f"R2/S3 unreachable at 127.0.0.1:{s3_port}" in problems and "blocked there" in problems
        assert health["backends"] == {"queue": "in-process", "cache": "redis", "jobs": "redis", "objects": "s3",
                                      "remote": None}
        with urllib.request.urlopen(f"{app.url}/config", timeout=10) as response:
            page_config = response.read().decode()
        from gradio_client import Client

        banner = Client(app.url, verbose=False)
        shown = [json.dumps(health), page_config, app.log(), str(banner.view_api(print_info=False))]
        for text in shown:
            assert not any(secret in text for secret in SECRET_VALUES)
        assert f"127.0.0.1:{redis_port}" in app.log()  # the log does say where
    finally:
        stop_app(app)


def test_unreachable_kafka_is_reported_without_credentials(tiny_model, tmp_path, redis_server) -> None:
    port = free_port()
    app = start_app(tiny_model, tmp_path, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", REDIS_URL=redis_server.url,
                    KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT", KAFKA_SASL_MECHANISM="PLAIN", KAFKA_SASL_USERNAME="u",
                    KAFKA_SASL_PASSWORD=SECRETS["KAFKA_SASL_PASSWORD"], KAFKA_CONSUME="0",
                    ALLOW_LOCAL_IMAGES_IN_FLEET="1")
    try:
        from gradio_client import Client
        from gradio_client.exceptions import AppError

        client = Client(app.url, verbose=False)
        try:
            client.predict(prompt="x", negative_prompt="", preset="turbo", width=256, height=256, steps=1,
                           guidance_scale=0, seed=1, api_name="/generate")
            raise AssertionError("accepted while Kafka is unreachable")
        except AppError as error:
            refusal = str(error)
        assert "Kafka" in refusal and "try again" in refusal
        code, health = get_json(f"{app.url}/healthz")
        assert any(f"Kafka unreachable at 127.0.0.1:{port}" in p and "blocked there" in p
                   for p in health["unreachable"])
        with urllib.request.urlopen(f"{app.url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        for text in (json.dumps(health), app.log(), refusal, metrics):
            assert not any(secret in text for secret in SECRET_VALUES)
    finally:
        stop_app(app)
