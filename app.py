"""Crafterse image generation Space: the composition root.

Reads settings from the environment (here only), builds the pipeline, queue, stores and gateway,
puts a Gradio UI and API in front of them and serves them. Nothing happens at import: `main()`
does the work, so tests and benchmarks can import the pieces.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import gradio as gr

from inference.errors import (GenerationError, InvalidRequest, QueueFull, QueueUnavailable, TooManyRequests,
                              UnknownRequest)
from inference.logcontext import RequestIdFilter, request_context
from inference.presets import (DEFAULT_CPU_PRESET, DEFAULT_GPU_PRESET, PRESETS, TAESDXL, ModelIdentity,
                               get_preset)
from inference.images import image_from_data_url, init_image_key, prepare_init_image
from inference.loras import MAX_LORA_WEIGHT, MAX_LORAS, LoraCatalog, LoraSpec, parse_loras_setting
from inference.request import (DEFAULT_STRENGTH, MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_SIDE, MIN_SIDE,
                               GenerationRequest)
from inference.revisions import pin
from queueing.admission import Admission, Caller, identify, may_see, public_request_id, scoped_request_id
from queueing.connectivity import check_all, kafka_endpoints, redis_endpoints, url_endpoint
from queueing.experiments import Experiment, check_experiment, parse_experiment_setting
from queueing.gateway import FallbackQueue, Gateway
from queueing.metrics import Metrics
from queueing.local import LocalQueue
from queueing.webhooks import WebhookJobs, WebhookLedger, WebhookNotifier, WebhookSettings
from queueing.worker import Worker
from storage.cache import MemoryResultCache
from storage.health import BackendHealth
from storage.history import MIN_KEY_CHARS, MemoryHistory, RedisHistory, ResilientHistory
from storage.jobs import Job, JobWaiters, MemoryJobStore
from storage.limits import MemoryInflightLimit, MemoryRateLimiter
from storage.objects import FailoverObjectStore, LocallyCachedStore, LocalObjectStore, StoreUnavailable

logger = logging.getLogger("app")

SECONDS_PER_DAY = 24 * 3600
DERIVED_SEED = -1  # UI/API spelling of "no seed": derive it from the other fields


class EnvReader:
    """Typed environment variables through starlette's Config, whose errors name the variable
    ("Config 'KAFKA_PARTITIONS' has value 'abc'. Not a valid int."). Empty values count as unset,
    as they do on a Space whose variable was cleared."""

    def __init__(self, env: Mapping[str, str]) -> None:
        from starlette.config import Config

        self.env = {k: v for k, v in env.items() if v != ""}
        self._config = Config(environ=self.env)

    def str(self, name: str, default: str | None = None) -> str | None:
        return self.env.get(name, default)

    def int(self, name: str, default: int, minimum: int = 0) -> int:
        return self._at_least(name, self._config(name, cast=int, default=default), minimum)

    def float(self, name: str, default: float, minimum: float = 0.0) -> float:
        return self._at_least(name, self._config(name, cast=float, default=default), minimum)

    def flag(self, name: str, default: bool) -> bool:
        value = self.env.get(name)
        if value is None:
            return default
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"Config {name!r} has value {value!r}. Not a valid bool (use 1 or 0).")

    @staticmethod
    def _at_least(name: str, value, minimum):
        if value < minimum:
            raise ValueError(f"Config {name!r} has value {value!r}. It must be at least {minimum}.")
        return value


@dataclass(frozen=True)
class FleetSettings:
    """Kafka, Redis and R2/S3. Each is used when configured; the embedded default otherwise.
    Secrets are kept out of repr() so that logging a settings object cannot leak them."""

    kafka_bootstrap_servers: str | None = None
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)
    kafka_topic_prefix: str = "image_generation"
    kafka_group_id: str | None = None
    kafka_partitions: int = 12
    kafka_max_poll_interval_ms: int = 300_000
    kafka_session_timeout_ms: int = 45_000
    kafka_consume: bool = True
    max_attempts: int = 3
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster: bool = False  # REDIS_CLUSTER=1 or a redis+cluster:// URL: a Redis Cluster
    redis_namespace: str = "imagegen"
    job_ttl_seconds: int = SECONDS_PER_DAY
    s3_endpoint_url: str | None = None
    r2_access_key_id: str | None = field(default=None, repr=False)
    r2_secret_access_key: str | None = field(default=None, repr=False)
    r2_bucket: str | None = None
    r2_public_base_url: str | None = None
    presign_seconds: int = 7 * SECONDS_PER_DAY
    worker_name: str = ""
    heartbeat_seconds: float = 5.0
    kafka_fallback_local: bool = False
    shutdown_grace_seconds: float = 20.0
    local_fleet: bool = False  # operator accepts images that only the clone which made them can serve
    claim_ttl_seconds: int = 30  # a dead worker's hold on a request expires after this
    fallback_endpoint_url: str | None = None  # a second S3-compatible store that takes writes when R2 fails
    fallback_bucket: str | None = None
    fallback_access_key_id: str | None = field(default=None, repr=False)
    fallback_secret_access_key: str | None = field(default=None, repr=False)
    fallback_public_base_url: str | None = None
    fallback_region: str = "auto"
    sqs_queue_url: str | None = None  # SQS instead of Kafka as the fleet's queue
    sqs_region: str = "us-east-1"
    sqs_endpoint_url: str | None = None  # e.g. a local SQS-compatible server; None: AWS's own
    sqs_visibility_timeout: int = 60  # a message a dead worker held reappears after this

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FleetSettings:
        read = EnvReader(env)
        account = read.str("R2_ACCOUNT_ID")
        prefix = read.str("KAFKA_TOPIC_PREFIX", "image_generation")
        return cls(
            kafka_bootstrap_servers=read.str("KAFKA_BOOTSTRAP_SERVERS"),
            kafka_security_protocol=read.str("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
            kafka_sasl_mechanism=read.str("KAFKA_SASL_MECHANISM"),
            kafka_sasl_username=read.str("KAFKA_SASL_USERNAME"),
            kafka_sasl_password=read.str("KAFKA_SASL_PASSWORD"),
            kafka_topic_prefix=prefix,
            kafka_group_id=read.str("KAFKA_GROUP_ID", f"{prefix}.workers"),
            kafka_partitions=read.int("KAFKA_PARTITIONS", 12, minimum=1),
            kafka_max_poll_interval_ms=read.int("KAFKA_MAX_POLL_INTERVAL_MS", 300_000, minimum=1000),
            kafka_session_timeout_ms=read.int("KAFKA_SESSION_TIMEOUT_MS", 45_000, minimum=1000),
            kafka_consume=read.flag("KAFKA_CONSUME", True),
            max_attempts=read.int("MAX_ATTEMPTS", 3, minimum=1),
            redis_url=read.str("REDIS_URL"),
            redis_cluster=read.flag("REDIS_CLUSTER", False),
            redis_namespace=read.str("REDIS_NAMESPACE", "imagegen"),
            job_ttl_seconds=read.int("JOB_TTL_SECONDS", SECONDS_PER_DAY, minimum=60),
            s3_endpoint_url=read.str("S3_ENDPOINT_URL") or (
                f"https://{account}.r2.cloudflarestorage.com" if account else None),
            r2_access_key_id=read.str("R2_ACCESS_KEY_ID"),
            r2_secret_access_key=read.str("R2_SECRET_ACCESS_KEY"),
            r2_bucket=read.str("R2_BUCKET"),
            r2_public_base_url=read.str("R2_PUBLIC_BASE_URL"),
            presign_seconds=read.int("R2_PRESIGN_SECONDS", 7 * SECONDS_PER_DAY, minimum=60),
            worker_name=read.str("WORKER_NAME") or f"{socket.gethostname()}-{os.getpid()}",
            heartbeat_seconds=read.float("HEARTBEAT_SECONDS", 5.0, minimum=0.1),
            kafka_fallback_local=read.flag("KAFKA_FALLBACK_LOCAL", False),
            shutdown_grace_seconds=read.float("SHUTDOWN_GRACE_SECONDS", 20.0),
            local_fleet=read.flag("ALLOW_LOCAL_IMAGES_IN_FLEET", False),
            claim_ttl_seconds=read.int("CLAIM_TTL_SECONDS", 30, minimum=2),
            fallback_endpoint_url=read.str("S3_FALLBACK_ENDPOINT_URL"),
            fallback_bucket=read.str("S3_FALLBACK_BUCKET"),
            fallback_access_key_id=read.str("S3_FALLBACK_ACCESS_KEY_ID"),
            fallback_secret_access_key=read.str("S3_FALLBACK_SECRET_ACCESS_KEY"),
            fallback_public_base_url=read.str("S3_FALLBACK_PUBLIC_BASE_URL"),
            fallback_region=read.str("S3_FALLBACK_REGION", "auto"),
            sqs_queue_url=read.str("SQS_QUEUE_URL"),
            sqs_region=read.str("SQS_REGION") or read.str("AWS_DEFAULT_REGION", "us-east-1"),
            sqs_endpoint_url=read.str("SQS_ENDPOINT_URL"),
            sqs_visibility_timeout=read.int("SQS_VISIBILITY_TIMEOUT", 60, minimum=2),
        )

    @property
    def uses_s3(self) -> bool:
        return bool(self.r2_bucket and self.s3_endpoint_url)

    @property
    def uses_fallback_s3(self) -> bool:
        return bool(self.uses_s3 and self.fallback_bucket and self.fallback_endpoint_url)

    @property
    def shared_queue(self) -> str | None:
        """kafka or sqs: the fleet's queue; None: this process's own."""
        if self.kafka_bootstrap_servers:
            return "kafka"
        return "sqs" if self.sqs_queue_url else None

    def secrets(self) -> list[str]:
        """Values that must never be shown (tests scan every output for them)."""
        return [v for v in (self.kafka_sasl_password, self.r2_secret_access_key, self.r2_access_key_id,
                            _url_password(self.redis_url), self.fallback_secret_access_key,
                            self.fallback_access_key_id) if v]

    def problems(self) -> list[str]:
        """Configuration mistakes worth stopping for, in words an operator can act on."""
        problems = []
        queue = {"kafka": "KAFKA_BOOTSTRAP_SERVERS", "sqs": "SQS_QUEUE_URL"}.get(self.shared_queue or "")
        if self.kafka_bootstrap_servers and self.sqs_queue_url:
            problems.append("both KAFKA_BOOTSTRAP_SERVERS and SQS_QUEUE_URL are set: the fleet has one queue")
        if queue and not self.redis_url:
            problems.append(f"{queue} is set but REDIS_URL is not: the fleet keeps job state in "
                            "Redis so that any Space can answer for any job; set REDIS_URL too")
        if self.r2_bucket and not self.s3_endpoint_url:
            problems.append("R2_BUCKET is set but neither R2_ACCOUNT_ID nor S3_ENDPOINT_URL is")
        if self.r2_bucket and not (self.r2_access_key_id and self.r2_secret_access_key):
            problems.append("R2_BUCKET is set but R2_ACCESS_KEY_ID / R2_SECRET_ACCESS_KEY are missing")
        if self.fallback_bucket and not (self.fallback_endpoint_url and self.fallback_access_key_id
                                         and self.fallback_secret_access_key and self.uses_s3):
            problems.append("S3_FALLBACK_BUCKET needs S3_FALLBACK_ENDPOINT_URL, S3_FALLBACK_ACCESS_KEY_ID, "
                            "S3_FALLBACK_SECRET_ACCESS_KEY and a primary store (R2_BUCKET) to fall back from")
        if queue and not self.uses_s3 and not self.local_fleet:
            problems.append(f"{queue} is set but R2_BUCKET is not: an image made by one clone "
                            "could not be served by the others; set the R2/S3 variables (or "
                            "ALLOW_LOCAL_IMAGES_IN_FLEET=1 for a fleet of clones on one machine)")
        return problems


@dataclass(frozen=True)
class RemoteSettings:
    """The GPU prediction service that takes peaks (queueing/remote.py, queueing/routing.py): a
    self-hosted Cog server (REMOTE_PREDICTIONS_URL) or hosted Replicate (REPLICATE_API_TOKEN +
    REPLICATE_MODEL). Unset: every request goes to the fleet (or this Space's worker)."""

    predictions_url: str | None = None
    replicate_api_token: str | None = field(default=None, repr=False)
    replicate_model: str | None = None
    overflow_after_seconds: float | None = None  # estimated wait above which new requests go remote
    share: float = 0.0  # fixed share of traffic sent remote (gradual migration; 0 rolls back)
    max_per_hour: int = 100  # fleet-wide budget of remote requests (0: no limit)
    timeout_seconds: float = 120.0  # a prediction slower than this goes to the fleet
    concurrency: int = 4  # predictions this Space keeps in flight at once
    cost_per_image: float = 0.0023  # dollars, for /metrics' estimated cost (Replicate's SDXL-class price)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RemoteSettings:
        read = EnvReader(env)
        overflow = read.str("OVERFLOW_AFTER_SECONDS")
        share = read.float("REMOTE_SHARE", 0.0)
        if share > 1:
            raise ValueError(f"Config 'REMOTE_SHARE' has value {share!r}. It is a share of traffic in 0..1.")
        return cls(
            predictions_url=read.str("REMOTE_PREDICTIONS_URL"),
            replicate_api_token=read.str("REPLICATE_API_TOKEN"),
            replicate_model=read.str("REPLICATE_MODEL"),
            overflow_after_seconds=None if overflow is None else read.float("OVERFLOW_AFTER_SECONDS", 0.0),
            share=share,
            max_per_hour=read.int("REMOTE_MAX_PER_HOUR", 100),
            timeout_seconds=read.float("REMOTE_TIMEOUT_SECONDS", 120.0, minimum=1.0),
            concurrency=read.int("REMOTE_CONCURRENCY", 4, minimum=1),
            cost_per_image=read.float("REMOTE_COST_PER_IMAGE", 0.0023),
        )

    @property
    def service(self) -> str | None:
        if self.predictions_url:
            return "cog"
        return "replicate" if self.replicate_api_token else None

    def problems(self) -> list[str]:
        problems = []
        if self.predictions_url and self.replicate_api_token:
            problems.append("both REMOTE_PREDICTIONS_URL and REPLICATE_API_TOKEN are set: choose one GPU service")
        if self.replicate_api_token and not self.replicate_model:
            problems.append("REPLICATE_API_TOKEN is set but REPLICATE_MODEL is not (owner/name, "
                            "owner/name:version or deployments/owner/name)")
        return problems


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"Config {name!r} has value {value!r}. Choose one of {', '.join(choices)}.")
    return value


def _url_password(url: str | None) -> str | None:
    return urlsplit(url).password if url else None


@dataclass(frozen=True)
class Settings:
    """Every environment variable the app reads, typed, in one place."""

    preset: str = "auto"  # auto: turbo on CPU, lightning on GPU
    model_id: str | None = None
    model_revision: str | None = None
    tiny_vae_id: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    warmup: bool = True
    output_dir: Path = Path("outputs")
    output_format: str = "png"
    public_url: str | None = None
    server_name: str = "127.0.0.1"
    server_port: int = 7860
    queue_max_size: int = 16
    cache_max_entries: int = 1024
    cache_ttl_seconds: int = 7 * SECONDS_PER_DAY
    request_timeout_seconds: float = 900.0
    log_level: str = "INFO"
    rate_limit_per_hour: int = 100  # 0: no hourly limit
    max_jobs_per_user: int = 4  # 0: no cap on requests in flight
    trusted_proxy_hops: int = 0  # proxies in front of the app that append to X-Forwarded-For (1 on a Space)
    sign_in: bool = False  # "Sign in with Hugging Face": on a Space whose card says hf_oauth: true
    output_cache_max_bytes: int = 2 * 1024**3  # local copies of images, least recently used out
    worker_health_port: int = 8080  # `--worker`'s /healthz, /readyz, /metrics (0: none)
    compile: str = "off"  # COMPILE: on | off (inference/compiled.py; measured no gain yet, so off)
    compile_cache_dir: Path = Path("~/.cache/crafterse/compile")
    prepack: str = "auto"  # PREPACK: auto | on | off (inference/prepack.py; auto: on AMX CPUs)
    zero_gpu: bool = False  # SPACES_ZERO_GPU: Hugging Face's ZeroGPU hardware (inference/zerogpu.py)
    zero_gpu_seconds_per_step: float = 0.5  # the GPU duration asked per UNet pass per megapixel
    batch_max_requests: int = 16  # BATCH_MAX_REQUESTS: requests per /submit_batch call
    mcp_server: bool = True  # MCP_SERVER: the API endpoints as MCP tools at /gradio_api/mcp/ (for agents)
    previews: bool = True  # PREVIEWS: live previews of running generations (inference/preview.py)
    preview_every_steps: int = 2  # PREVIEW_EVERY_STEPS
    preview_vae_id: str | None = None  # PREVIEW_VAE_ID: TAESD for previews when the model's VAE is the full one
    loras: tuple[LoraSpec, ...] = ()  # LORAS: the styles this Space offers (inference/loras.py)
    bulk_every: int = 4  # BULK_EVERY: while both wait, at least 1 of this many runs is a bulk request (0: never first)
    experiment: Experiment | None = None  # EXPERIMENT: an A/B test of a variant (queueing/experiments.py)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    remote: RemoteSettings = field(default_factory=RemoteSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        read = EnvReader(env)
        space_host = read.str("SPACE_HOST")  # set by Hugging Face Spaces: "<owner>-<name>.hf.space"
        on_space = bool(read.str("SPACE_ID") or space_host)
        return cls(
            preset=read.str("MODEL_PRESET", "auto"),
            model_id=read.str("MODEL_ID"),
            model_revision=read.str("MODEL_REVISION"),
            tiny_vae_id=read.str("TINY_VAE_ID"),
            device=read.str("DEVICE", "auto"),
            dtype=read.str("DTYPE", "auto"),
            warmup=read.flag("WARMUP", True),
            output_dir=Path(read.str("OUTPUT_DIR", "outputs")),
            output_format=read.str("OUTPUT_FORMAT", "png"),
            output_cache_max_bytes=read.int("OUTPUT_CACHE_MAX_BYTES", 2 * 1024**3, minimum=1024**2),
            public_url=read.str("PUBLIC_URL") or (f"https://{space_host}" if space_host else None),
            server_name=read.str("GRADIO_SERVER_NAME", "127.0.0.1"),
            server_port=read.int("GRADIO_SERVER_PORT", 7860, minimum=1),
            worker_health_port=read.int("WORKER_HEALTH_PORT", 8080),
            compile=_choice("COMPILE", read.str("COMPILE", "off").lower(), ("on", "off")),
            prepack=_choice("PREPACK", read.str("PREPACK", "auto").lower(), ("auto", "on", "off")),
            # /data is a Space's persistent storage (when bought): compiled kernels survive restarts there
            compile_cache_dir=Path(read.str("COMPILE_CACHE_DIR") or (
                "/data/compile-cache" if os.access("/data", os.W_OK) else "~/.cache/crafterse/compile")),
            zero_gpu=read.flag("SPACES_ZERO_GPU", False),
            zero_gpu_seconds_per_step=read.float("ZEROGPU_SECONDS_PER_STEP", 0.5, minimum=0.01),
            mcp_server=read.flag("MCP_SERVER", True),
            batch_max_requests=read.int("BATCH_MAX_REQUESTS", 16, minimum=1),
            bulk_every=read.int("BULK_EVERY", 4),
            loras=parse_loras_setting(read.str("LORAS")),
            experiment=parse_experiment_setting(read.str("EXPERIMENT")),
            previews=read.flag("PREVIEWS", True),
            preview_every_steps=read.int("PREVIEW_EVERY_STEPS", 2, minimum=1),
            preview_vae_id=read.str("PREVIEW_VAE_ID"),
            webhooks=WebhookSettings(
                allowed_hosts=tuple(h.strip().lower() for h in (read.str("WEBHOOK_ALLOWED_HOSTS") or "").split(",")
                                    if h.strip()),
                secret=read.str("WEBHOOK_SECRET"),
                max_attempts=read.int("WEBHOOK_MAX_ATTEMPTS", 5, minimum=1),
                backoff_seconds=read.float("WEBHOOK_BACKOFF_SECONDS", 1.0, minimum=0.0),
                timeout_seconds=read.float("WEBHOOK_TIMEOUT_SECONDS", 10.0, minimum=0.1)),
            queue_max_size=read.int("QUEUE_MAX_SIZE", 16, minimum=1),
            cache_max_entries=read.int("CACHE_MAX_ENTRIES", 1024, minimum=1),
            cache_ttl_seconds=read.int("CACHE_TTL_SECONDS", 7 * SECONDS_PER_DAY, minimum=60),
            request_timeout_seconds=read.float("REQUEST_TIMEOUT_SECONDS", 900.0, minimum=1.0),
            log_level=read.str("LOG_LEVEL", "INFO").upper(),
            rate_limit_per_hour=read.int("RATE_LIMIT_PER_HOUR", 100),
            max_jobs_per_user=read.int("MAX_JOBS_PER_USER", 4),
            trusted_proxy_hops=read.int("TRUSTED_PROXY_HOPS", 1 if on_space else 0),
            # Hugging Face sets OAUTH_CLIENT_ID on a Space with hf_oauth: true; elsewhere Gradio's login
            # is a mock that needs a token and the Hub, so the button is shown only on such a Space.
            sign_in=on_space and bool(read.str("OAUTH_CLIENT_ID")),
            fleet=FleetSettings.from_env(env),
            remote=RemoteSettings.from_env(env),
        )

    @property
    def fleet_queue(self) -> str | None:
        """The fleet's queue this process generates through ("kafka", "sqs"), None for its own. On
        ZeroGPU a Space generates its own (a GPU call is charged to the visitor who asked)."""
        return None if self.zero_gpu else self.fleet.shared_queue

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.server_name in ("0.0.0.0", "::", "") else self.server_name
        return f"http://{host}:{self.server_port}"


@dataclass
class Services:
    settings: Settings
    pipeline: Any  # inference.pipeline.ImagePipeline (imported lazily: torch is heavy)
    identity: ModelIdentity
    objects: Any
    cache: Any
    jobs: Any
    worker: Worker
    queue: Any
    gateway: Gateway
    health_state: BackendHealth
    metrics: Metrics
    admission: Admission
    consumer: Any = None  # queueing.consumer.KafkaWorkerLoop when Kafka is configured and this process consumes
    entrance: Any = None  # the loop forwarding <prefix>.requests to the preset topics
    heartbeat: Any = None
    remote: Any = None  # queueing.remote.RemoteBackend: the GPU service for peaks, when configured
    rescuer: Any = None  # queueing.remote.LeaseRescuer: in a fleet, takes over what a dead Space sent remote
    webhooks: Any = None  # queueing.webhooks.WebhookNotifier
    history: Any = None  # storage.history: designers' recent images
    fleet: Any = None  # RedisFleet
    endpoints: list = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.unreachable = check_all(self.endpoints)
        for problem in self.unreachable:
            logger.error("%s", problem)
        if self.settings.zero_gpu:
            self.pipeline.load()  # before Gradio's launch, where ZeroGPU packs what was moved to CUDA
        else:
            self.pipeline.start_loading()
        self.queue.start()
        for loop in (self.consumer, self.entrance):
            if loop is not None:
                loop.start()  # joins its group only once the model is loaded
        if self.heartbeat is not None:
            self.heartbeat.start()
        if self.rescuer is not None:
            self.rescuer.start()
        if self.webhooks is not None:
            self.webhooks.start()

    def stop_consumers(self) -> None:
        """Leave the consumer groups warm: the job in hand finishes (or is handed back past the grace)."""
        self.stopping = True
        for loop in (self.entrance, self.consumer):
            if loop is not None:
                loop.stop()

    def stop(self) -> None:
        self.stop_consumers()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.rescuer is not None:
            self.rescuer.stop()
        if self.remote is not None:
            self.remote.stop()
        self.queue.stop()
        if self.webhooks is not None:
            self.webhooks.stop()

    def describe_worker(self) -> dict[str, Any]:
        """This worker as the fleet sees it (heartbeat). No request ids: they are capabilities."""
        return {"preset": self.identity.preset, "model": self.identity.model_id,
                "versions": self.identity.versions(), "device": self.pipeline.device,
                "state": self.pipeline.state, "generations": self.worker.generations,
                "mean_seconds": round(self.worker.mean_seconds, 2),
                "busy": bool(self.consumer.busy) if self.consumer else False,
                "consumer": self.consumer.status.state if self.consumer else "none",
                "partitions": self.consumer.assigned if self.consumer else 0}

    def degraded(self) -> dict[str, dict]:
        degraded = self.health_state.degraded()
        queue = "SQS" if self.settings.fleet.shared_queue == "sqs" else "Kafka"
        for name, loop in ((f"{queue} consumer", self.consumer), ("Kafka entrance", self.entrance)):
            if loop is not None and self.pipeline.state == "ready" and not loop.status.healthy:
                degraded[name] = {"reason": loop.status.last_error or loop.status.state,
                                  "since": loop.status.last_poll_at,
                                  "meaning": f"this worker takes no requests from {', '.join(loop.topics)} "
                                             f"({loop.status.state}); it reconnects by itself"}
        return degraded

    def health(self) -> dict[str, Any]:
        """Safe to show anyone: states, names and host:port, never credentials or request ids."""
        pipeline = self.pipeline
        degraded = self.degraded()
        status = {"ready": "degraded" if degraded else "ok", "failed": "failed"}.get(pipeline.state, "starting")
        if self.stopping:
            status = "stopping"
        health = {
            "status": status,
            "model": {
                "state": pipeline.state,
                "detail": pipeline.detail,
                "preset": self.identity.preset,
                "model": self.identity.model_id,
                "revision": self.identity.revision,
                "commit": self.identity.commit_of("model"),
                "vae": self.identity.vae,
                "device": pipeline.device,
                "dtype": str(pipeline.dtype).removeprefix("torch."),
                "load_seconds": pipeline.load_seconds,
                "zero_gpu": self.settings.zero_gpu,
                "compiled": pipeline.compiled.describe() if getattr(pipeline, "compiled", None) else None,
                "prepacked": getattr(pipeline, "prepacked", None),
            },
            "queue": {
                "kind": self.settings.fleet_queue or "local",
                "depth": _safe(self.queue.depth, None),
                "max_size": self.queue.max_size,
                "running": bool(self.consumer.busy) if self.consumer else self.queue.running_id is not None,
            },
            "consumer": self.consumer.status.as_dict() if self.consumer else None,
            "entrance": self.entrance.status.as_dict() if self.entrance else None,
            "backends": {
                "queue": self.settings.fleet_queue or "in-process",
                "cache": "redis" if self.settings.fleet.redis_url and self.settings.fleet.uses_s3 else "in-memory",
                "jobs": "redis" if self.settings.fleet.redis_url else "in-memory",
                "objects": ("s3 with fallback" if self.settings.fleet.uses_fallback_s3 else "s3")
                if self.settings.fleet.uses_s3 else "local folder",
                "remote": self.settings.remote.service,
            },
            "remote": None if self.remote is None else {
                "service": self.settings.remote.service, "available": _safe(self.remote.available, False),
                "in_flight": self.remote.in_flight()},
            "degraded": degraded,
            "unreachable": self.unreachable,
            "worker": self.settings.fleet.worker_name,
            "generations": self.worker.generations,
        }
        if self.fleet is not None:
            health["fleet"] = {"workers": _safe(self.fleet.workers, [])}
        return health

    stopping: bool = False

    def models(self) -> dict[str, Any]:
        """/models: every preset, the versions (model and commits) serving it and the workers on each;
        this worker's own identity; the running experiment. Names and commits only (no request ids)."""
        workers = self._serving_workers()
        return {
            "presets": [_preset_entry(preset, [w for w in workers if w.get("preset") == preset.name])
                        for preset in PRESETS.values()],
            "this_worker": {"worker": self.settings.fleet.worker_name, "preset": self.identity.preset,
                            **self.identity.versions()},
            "experiment": self.gateway.experiment.describe() if self.gateway.experiment else None,
        }

    def _serving_workers(self) -> list[dict[str, Any]]:
        """The fleet's live workers from their heartbeats, or this Space alone when it serves itself."""
        if self.settings.fleet_queue and self.fleet is not None:
            return _safe(self.fleet.workers, [])
        return [dict(self.describe_worker(), worker=self.settings.fleet.worker_name)]

    def render_metrics(self) -> bytes:
        self.metrics.backlog.set(_safe(self.queue.depth, 0) or 0)
        if self.pipeline.load_seconds is not None:
            self.metrics.model_load_seconds.set(self.pipeline.load_seconds)
        self._count_workers()
        return self.metrics.render()

    def _count_workers(self) -> None:
        """Live workers by preset, from the heartbeats (this Space's own preset is always reported,
        so "no worker for the preset" is a 0, not a missing series)."""
        if not self.settings.fleet.shared_queue or self.fleet is None:
            self.metrics.workers.labels(self.identity.preset).set(1)  # this Space is its own worker
            return
        counts = {self.identity.preset: 0}
        for worker in _safe(self.fleet.workers, []):
            counts[worker.get("preset", "?")] = counts.get(worker.get("preset", "?"), 0) + 1
        for preset, count in counts.items():
            self.metrics.workers.labels(preset).set(count)


def _preset_entry(preset, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """One preset of /models: its settings, and its live workers grouped by the weights they loaded."""
    versions: dict[str, dict[str, Any]] = {}
    for worker in workers:
        version = worker.get("versions") or {"model_id": worker.get("model")}  # a worker of an older release
        entry = versions.setdefault(json.dumps(version, sort_keys=True), {**version, "workers": []})
        entry["workers"].append(worker.get("worker"))
    return {"name": preset.name, "description": preset.description, "model_id": preset.model_id,
            "width": preset.width, "height": preset.height, "default_steps": preset.default_steps,
            "max_steps": preset.max_steps, "guidance_scale": preset.guidance_scale,
            "cpu_supported": preset.cpu_supported, "served": bool(workers), "versions": list(versions.values())}


def _safe(call, default):
    try:
        return call()
    except Exception:  # a health page must answer even when a backend is down
        return default


@dataclass
class Stores:
    """The state backends: Redis-backed (fleet-wide) when REDIS_URL is set, in memory otherwise."""

    cache: Any
    jobs: Any
    fleet: Any  # RedisFleet or None
    claims: Any  # ResilientClaims or None
    rate: Any
    inflight: Any
    remote_budget: Any = None  # REMOTE_MAX_PER_HOUR, fleet-wide when Redis is there
    remote_leases: Any = None  # RemoteLeases: GPU-service requests a dead Space held are rescued
    redis: Any = None  # the Redis client, for the webhook ledger
    history: Any = field(default_factory=MemoryHistory)  # designers' recent images (storage/history.py)


def build_pipeline(settings: Settings):
    """The model these settings name, not loaded yet: (ImagePipeline, Preset, ModelIdentity). Shared by
    the app and the Cog predictor (deploy/cog/predict.py), so both make the same image."""
    from inference.pipeline import ImagePipeline, LoadOptions, pick_device  # torch: only when building

    # ZeroGPU: the model goes to CUDA at startup (ZeroGPU keeps it packed until a GPU call) and there is
    # no GPU outside a call, so nothing can warm up before the first request.
    device = "cuda" if settings.zero_gpu and settings.device == "auto" else settings.device
    warmup = settings.warmup and not settings.zero_gpu
    preset_name = settings.preset
    if preset_name == "auto":
        preset_name = DEFAULT_GPU_PRESET if pick_device(device) == "cuda" else DEFAULT_CPU_PRESET
    preset = get_preset(preset_name)
    identity = ModelIdentity.resolve(preset, settings.model_id, settings.model_revision, settings.tiny_vae_id,
                                     loras=settings.loras)
    # Before anything is fingerprinted: "main" (or a tag) becomes the commit the worker will load, so a
    # push to the model never lets an image of the old weights answer for the new ones.
    identity = pin(identity, settings.compile_cache_dir.expanduser() / "folder-digests.json")
    pipeline = ImagePipeline(LoadOptions(
        preset, identity, device, settings.dtype, warmup, settings.compile, settings.compile_cache_dir,
        settings.prepack, previews=settings.previews, preview_every_steps=settings.preview_every_steps,
        loras=settings.loras, preview_vae=settings.preview_vae_id or TAESDXL))
    return pipeline, preset, identity


def build_services(settings: Settings, worker_only: bool = False) -> Services:
    fleet = settings.fleet
    problems = fleet.problems() + settings.remote.problems() + settings.webhooks.problems()
    if problems:
        raise ValueError("; ".join(problems))
    pipeline, preset, identity = build_pipeline(settings)
    experiment = check_experiment(settings.experiment, identity.preset, LoraCatalog(settings.loras))
    if settings.zero_gpu:
        from inference.zerogpu import ZeroGPUPipeline

        pipeline = ZeroGPUPipeline(pipeline, settings.zero_gpu_seconds_per_step)
    metrics = Metrics()
    health = BackendHealth(on_change=lambda name, down: metrics.degraded.labels(name).set(1 if down else 0))
    objects = _object_store(settings, health)
    stores = _stores(settings, health)
    # Every path that ends a job goes through the job store: its webhook is sent from there.
    webhooks = WebhookNotifier(settings.webhooks, stores.jobs, WebhookLedger(stores.redis, fleet.redis_namespace),
                               public_id=public_request_id, metrics=metrics)
    stores.jobs = WebhookJobs(stores.jobs, webhooks)
    serves_fleet = settings.fleet_queue is not None
    worker = Worker(pipeline, identity, preset.sampler_label, stores.cache, stores.jobs, objects,
                    name=fleet.worker_name, claims=stores.claims if serves_fleet else None,
                    metrics=metrics, backend="fleet" if serves_fleet else "local")
    admission = Admission(stores.rate, stores.inflight, settings.rate_limit_per_hour, settings.max_jobs_per_user,
                          # a job not created yet is in flight (admission runs before the gateway stores it)
                          finished=lambda rid: (job := stores.jobs.get(rid)) is not None and job.finished,
                          metrics=metrics)
    endpoints = _endpoints(settings)
    local = LocalQueue(worker.handle, settings.queue_max_size, settings.bulk_every, metrics)
    if settings.zero_gpu and fleet.shared_queue:
        # A ZeroGPU call is charged to the visitor who asked: the fleet's queue belongs on CPU workers.
        logger.warning("ZeroGPU: this Space serves its own UI and API on ZeroGPU and does not consume the "
                       "fleet's queue (run CPU workers with `python app.py --worker` for it)")
    if not serves_fleet:
        gateway = Gateway(identity, stores.cache, stores.jobs, objects, local, inflight=worker, metrics=metrics)
        services = Services(settings, pipeline, identity, objects, stores.cache, stores.jobs, worker, local, gateway,
                            health, metrics, admission, fleet=stores.fleet, endpoints=endpoints)
    else:
        build = _fleet_services if fleet.shared_queue == "kafka" else _sqs_services
        services = build(settings, pipeline, identity, objects, stores, worker, endpoints, health, metrics,
                         admission, local, consume=fleet.kafka_consume or worker_only)
    if settings.remote.service and not settings.zero_gpu:  # ZeroGPU is this Space's GPU for peaks
        _add_remote(settings, services, stores)
    services.webhooks = webhooks
    services.history = stores.history
    services.gateway.experiment = experiment
    if serves_fleet and stores.remote_leases is not None:
        from queueing.remote import LeaseRescuer

        services.rescuer = LeaseRescuer(stores.remote_leases, stores.jobs, services.queue,
                                        interval_seconds=min(5.0, fleet.claim_ttl_seconds / 2))
        if services.remote is not None:
            services.remote.leases = stores.remote_leases
    return services


def _add_remote(settings: Settings, services: Services, stores: Stores) -> None:
    """The GPU service for peaks, and the router that decides per request (see queueing/routing.py)."""
    from queueing.remote import RemoteBackend
    from queueing.routing import Router

    config = settings.remote
    local = services.gateway.inflight is not None
    services.remote = RemoteBackend(
        _prediction_service(config), services.identity, stores.cache, stores.jobs, services.objects,
        fallback=services.queue, health=services.health_state, metrics=services.metrics,
        group=services.worker if local else None, concurrency=config.concurrency,
        cost_per_image=config.cost_per_image, fallback_name="local" if local else "fleet")
    services.gateway.router = Router(
        estimate=services.queue.wait_estimate, available=services.remote.available, budget=stores.remote_budget,
        overflow_after_seconds=config.overflow_after_seconds, remote_share=config.share,
        max_per_hour=config.max_per_hour, queue_backend="local" if local else "fleet", metrics=services.metrics)
    services.gateway.remote = services.remote
    if services.entrance is not None:  # topic producers that opt in (route "auto") are routed too
        services.entrance.router, services.entrance.remote = services.gateway.router, services.remote
        services.remote.on_finished = services.entrance.publish_outcome


def _prediction_service(config: RemoteSettings):
    from queueing.remote import CogPredictions, ReplicatePredictions

    if config.service == "cog":
        return CogPredictions(config.predictions_url, config.timeout_seconds)
    import replicate

    client = replicate.Client(api_token=config.replicate_api_token)
    return ReplicatePredictions(client, config.replicate_model, config.timeout_seconds)


def _fleet_services(settings, pipeline, identity, objects, stores: Stores, worker, endpoints, health, metrics,
                    admission, local, consume: bool) -> Services:
    from queueing.consumer import KafkaWorkerLoop
    from queueing.fleet import FleetBacklog, Heartbeat
    from queueing.kafka import KafkaRequestQueue, LazyProducer

    kafka = _kafka_settings(settings.fleet)
    producer = LazyProducer(kafka)  # connects on first use: the app starts while Kafka is away
    shared = KafkaRequestQueue(kafka, producer, FleetBacklog(kafka, stores.fleet, identity.preset))
    queue = FallbackQueue(shared, local if settings.fleet.kafka_fallback_local else None, health)
    gateway = Gateway(identity, stores.cache, stores.jobs, objects, queue, inflight=None, metrics=metrics)
    services = Services(settings, pipeline, identity, objects, stores.cache, stores.jobs, worker, queue, gateway,
                        health, metrics, admission, fleet=stores.fleet, endpoints=endpoints)
    if consume:
        services.consumer = KafkaWorkerLoop(kafka, worker, stores.jobs, producer, metrics,
                                            settings.fleet.shutdown_grace_seconds, wait_ready=pipeline.wait_ready,
                                            bulk_every=settings.bulk_every)
        services.entrance = KafkaWorkerLoop(kafka, worker, stores.jobs, producer, metrics,
                                            settings.fleet.shutdown_grace_seconds, wait_ready=pipeline.wait_ready,
                                            entrance=True)
        services.heartbeat = Heartbeat(stores.fleet, settings.fleet.worker_name, services.describe_worker,
                                       settings.fleet.heartbeat_seconds)
    return services


def _sqs_services(settings, pipeline, identity, objects, stores: Stores, worker, endpoints, health, metrics,
                  admission, local, consume: bool) -> Services:
    """SQS as the fleet's queue (SQS_QUEUE_URL); credentials from boto3's usual AWS_* variables."""
    from queueing.fleet import Heartbeat
    from queueing.sqs import SqsRequestQueue, SqsWorkerLoop, make_sqs_client

    fleet = settings.fleet
    client = make_sqs_client(fleet.sqs_region, fleet.sqs_endpoint_url)
    queue = FallbackQueue(SqsRequestQueue(client, fleet.sqs_queue_url, stores.fleet, identity.preset),
                          local if fleet.kafka_fallback_local else None, health, name="SQS")
    gateway = Gateway(identity, stores.cache, stores.jobs, objects, queue, inflight=None, metrics=metrics)
    services = Services(settings, pipeline, identity, objects, stores.cache, stores.jobs, worker, queue, gateway,
                        health, metrics, admission, fleet=stores.fleet, endpoints=endpoints)
    if consume:
        services.consumer = SqsWorkerLoop(client, fleet.sqs_queue_url, worker, stores.jobs, fleet.max_attempts,
                                          fleet.sqs_visibility_timeout, fleet.shutdown_grace_seconds,
                                          wait_ready=pipeline.wait_ready)
        services.heartbeat = Heartbeat(stores.fleet, fleet.worker_name, services.describe_worker,
                                       fleet.heartbeat_seconds)
    return services


def _kafka_settings(fleet: FleetSettings):
    from queueing.kafka import KafkaSettings

    return KafkaSettings(
        bootstrap_servers=fleet.kafka_bootstrap_servers, topic_prefix=fleet.kafka_topic_prefix,
        group_id=fleet.kafka_group_id, security_protocol=fleet.kafka_security_protocol,
        sasl_mechanism=fleet.kafka_sasl_mechanism, sasl_username=fleet.kafka_sasl_username,
        sasl_password=fleet.kafka_sasl_password, partitions=fleet.kafka_partitions,
        max_poll_interval_ms=fleet.kafka_max_poll_interval_ms, session_timeout_ms=fleet.kafka_session_timeout_ms,
        max_attempts=fleet.max_attempts)


def _object_store(settings: Settings, health: BackendHealth):
    fleet = settings.fleet
    local = LocalObjectStore(settings.output_dir, f"{settings.base_url}/outputs", settings.output_cache_max_bytes)
    if not fleet.uses_s3:
        return local
    from storage.s3 import S3ObjectStore, make_s3_client

    client = make_s3_client(fleet.s3_endpoint_url, fleet.r2_access_key_id, fleet.r2_secret_access_key)
    remote = S3ObjectStore(client, fleet.r2_bucket, fleet.r2_public_base_url, fleet.presign_seconds)
    name = "R2/S3"
    if fleet.uses_fallback_s3:
        fallback_client = make_s3_client(fleet.fallback_endpoint_url, fleet.fallback_access_key_id,
                                         fleet.fallback_secret_access_key, fleet.fallback_region)
        fallback = S3ObjectStore(fallback_client, fleet.fallback_bucket, fleet.fallback_public_base_url,
                                 fleet.presign_seconds)
        remote, name = FailoverObjectStore(remote, fallback, health), "object stores (R2 and its fallback)"
    return LocallyCachedStore(remote, local, health, upload_in_background=bool(fleet.shared_queue), name=name)


def _stores(settings: Settings, health: BackendHealth) -> Stores:
    fleet = settings.fleet
    hold = settings.request_timeout_seconds + 60  # an in-flight slot outlives any wait for its job
    memory_cache = MemoryResultCache(settings.cache_max_entries, settings.cache_ttl_seconds)
    memory_rate = MemoryRateLimiter(settings.rate_limit_per_hour)
    memory_inflight = MemoryInflightLimit(settings.max_jobs_per_user, hold)
    memory_budget = MemoryRateLimiter(settings.remote.max_per_hour)
    if not fleet.redis_url:
        return Stores(memory_cache, MemoryJobStore(), None, None, memory_rate, memory_inflight, memory_budget)
    from storage.limits import RedisInflightLimit, RedisRateLimiter
    from storage.redis_store import (RedisClaims, RedisFleet, RedisJobStore, RedisResultCache, RemoteLeases,
                                     redis_client)
    from storage.resilient import ResilientCache, ResilientClaims, ResilientJobStore, ResilientLimit, RedisGuard

    client = redis_client(fleet.redis_url, cluster=fleet.redis_cluster)
    guard = RedisGuard(health)
    namespace = fleet.redis_namespace
    # Results hold image URLs: shared through Redis only when the images are in a shared store too.
    cache = ResilientCache(RedisResultCache(client, namespace, settings.cache_ttl_seconds), guard) \
        if fleet.uses_s3 else memory_cache
    return Stores(
        cache=cache,
        jobs=ResilientJobStore(RedisJobStore(client, namespace, fleet.job_ttl_seconds), guard),
        fleet=RedisFleet(client, namespace, ttl_seconds=max(3.0, 3 * fleet.heartbeat_seconds)),
        claims=ResilientClaims(RedisClaims(client, namespace, fleet.claim_ttl_seconds), guard),
        rate=ResilientLimit(RedisRateLimiter(client, namespace, settings.rate_limit_per_hour), memory_rate, guard),
        inflight=ResilientLimit(RedisInflightLimit(client, namespace, settings.max_jobs_per_user, hold),
                                memory_inflight, guard),
        remote_budget=ResilientLimit(RedisRateLimiter(client, f"{namespace}:remote", settings.remote.max_per_hour),
                                     memory_budget, guard),
        remote_leases=RemoteLeases(client, namespace, fleet.claim_ttl_seconds),
        redis=client,
        history=ResilientHistory(RedisHistory(client, namespace), guard),
    )


def _endpoints(settings: Settings) -> list:
    fleet, endpoints = settings.fleet, []
    if fleet.kafka_bootstrap_servers:
        endpoints += kafka_endpoints(fleet.kafka_bootstrap_servers)
    if fleet.redis_url:
        endpoints += redis_endpoints(fleet.redis_url)
    if fleet.uses_s3:
        endpoints.append(url_endpoint("R2/S3", fleet.s3_endpoint_url, 80))
    if fleet.uses_fallback_s3:
        endpoints.append(url_endpoint("S3 fallback", fleet.fallback_endpoint_url, 80))
    if fleet.sqs_queue_url:
        endpoints.append(url_endpoint("SQS", fleet.sqs_endpoint_url or fleet.sqs_queue_url, 443))
    if settings.remote.predictions_url:
        endpoints.append(url_endpoint("GPU service", settings.remote.predictions_url, 80))
    return endpoints


# ---- Gradio handlers ------------------------------------------------------------------------------

class RawNumber(gr.Number):
    """A number box whose value reaches our validation as sent. Gradio's own conversion rounds 512.5
    to 512 silently and refuses "abc" or NaN with a message that names no field."""

    def preprocess(self, payload: Any) -> Any:
        return payload

    def get_block_name(self) -> str:
        return "number"  # the same widget in the browser


class RawImage(gr.Image):
    """An image upload that reaches our validation as the uploaded file (its path in Gradio's upload
    cache, checked by Gradio): gr.Image would decode and re-encode it first, refusing a bad file with a
    message that names no field, and hashing its re-encoding instead of the picture sent."""

    def preprocess(self, payload: Any) -> str | None:
        if payload is None:
            return None
        return payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", None)

    def get_block_name(self) -> str:
        return "image"  # the same widget in the browser


def _weighted(loras: Any, weight: Any) -> Any:
    """The Styles box's names with the Style weight box's weight; "name:weight" entries keep theirs."""
    if not isinstance(loras, list) or weight in (None, ""):
        return loras
    return [f"{item}:{weight}" if isinstance(item, str) and ":" not in item else item for item in loras]


def caller_of(request: gr.Request | None, profile: gr.OAuthProfile | None, trusted_hops: int) -> Caller:
    """The signed-in Hugging Face user, else the address the platform's proxy appended (never a
    header value the client chose: see queueing.admission)."""
    username = getattr(profile, "username", None) or getattr(request, "username", None)
    headers = dict(request.headers) if request is not None and request.headers else {}
    peer = request.client.host if request is not None and request.client else None
    return identify(username, headers, peer, trusted_hops)


# Waiters wake on job changes (storage.jobs.JobWaiters); the poll is only the safety net for a lost
# notification, or the whole mechanism on a store that has none.
FOLLOW_POLL_SECONDS = 0.25
FOLLOW_FALLBACK_SECONDS = 1.0
# At most one progress update per this interval reaches a client (GPU steps come tens a second).
FOLLOW_MIN_INTERVAL_SECONDS = 0.1


def not_an_mcp_tool(fn):
    """Keeps an API endpoint out of the MCP tool list. Gradio's MCP bridge lists every public endpoint
    except functions whose `_mcp_type` is not "tool" (the mark its gr.mcp.resource/prompt decorators
    set); /generate returns three outputs, one a gr.State, which the bridge cannot hand back, so agents
    get generate_image instead (tests/test_mcp.py checks the list)."""
    fn._mcp_type = "api-only"
    return fn


class Handlers:
    """The functions behind the UI events and API endpoints. Errors become gr.Error here, at the edge.
    Waiting is asynchronous: a user waiting minutes for an image holds no server thread."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.gateway = services.gateway
        self.admission = services.admission
        self.styles = LoraCatalog(services.settings.loras)
        self.waiters = JobWaiters(services.jobs)
        self.follow_timeout = FOLLOW_FALLBACK_SECONDS if self.waiters.listening else FOLLOW_POLL_SECONDS

    def _caller(self, request: gr.Request | None, profile: gr.OAuthProfile | None) -> Caller:
        return caller_of(request, profile, self.services.settings.trusted_proxy_hops)

    def _request(self, caller: Caller, prompt, negative_prompt, preset, width, height, steps, guidance_scale,
                 seed, request_id=None, priority="interactive", webhook_url="", init_image=None, strength=None,
                 loras=None, style_weight=1.0):
        """Blocking (an uploaded start image is stored): async handlers call it in a worker thread."""
        if seed == DERIVED_SEED:
            seed = None
        try:
            chosen = (request_id or "").strip() or None
            generation = GenerationRequest.create(
                prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
                self.services.settings.output_format, chosen, priority=priority, webhook_url=webhook_url,
                init_image=self._store_init_image(init_image), strength=strength if init_image else None,
                loras=_weighted(loras, style_weight),
            )
            self.services.webhooks.check(generation.webhook_url)
            self.styles.check(generation.loras)
            scoped = scoped_request_id(caller, chosen)
        except GenerationError as error:
            title = "Storage unavailable" if isinstance(error, StoreUnavailable) else "Invalid input"
            raise gr.Error(str(error), title=title) from None
        return dataclasses.replace(generation, request_id=scoped) if scoped else generation

    def _store_init_image(self, path: Any) -> str:
        """An uploaded start image goes to the object store, where any worker of the fleet reads it (a
        message carries only its hash); returns that sha256, or "" without one."""
        if not path:
            return ""
        if not isinstance(path, str):
            raise InvalidRequest("init_image", "must be an image file")
        try:
            data = Path(path).read_bytes()
        except OSError:
            raise InvalidRequest("init_image", "could not be read (upload it again)") from None
        sha, png = prepare_init_image(data)
        stored = self.services.objects.put(init_image_key(sha), png, "image/png")
        if not stored.persisted:  # only this Space would have it: a fleet worker could not render it
            raise StoreUnavailable("init_image: the object store is unavailable, so other workers could not "
                                   "read the image; try again shortly")
        return sha

    def _submit(self, request: GenerationRequest, caller: Caller, chosen: bool) -> Job:
        try:
            self.admission.admit(caller, request.request_id)
        except TooManyRequests as error:
            raise gr.Error(str(error), title="Too many requests") from None
        try:
            with request_context(request.request_id):
                job = self.gateway.submit(request, owner=caller.key, private=caller.signed_in or chosen)
        except GenerationError as error:
            self.admission.release(caller, request.request_id)
            title = {QueueFull: "Busy", QueueUnavailable: "Queue unavailable"}.get(type(error), "Invalid input")
            raise gr.Error(str(error), title=title) from None
        if job.finished:
            self.admission.release(caller, request.request_id)
        return job

    @not_an_mcp_tool
    async def generate(self, prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
                       init_image=None, strength=DEFAULT_STRENGTH, loras=None, style_weight=1.0, history_key="",
                       request: gr.Request = None, profile: gr.OAuthProfile | None = None,
                       progress=gr.Progress()) -> AsyncIterator[tuple]:
        """Generate one image and wait for it (progress is streamed). Returns the image file, its metadata
        (seed, URL, timings, worker) and the request id.

        Args:
            prompt: what to draw, up to 2000 characters.
            negative_prompt: what to avoid; may be empty.
            preset: the preset this Space serves (see the dropdown).
            width: image width, a multiple of 8 in 256..2048.
            height: image height, a multiple of 8 in 256..2048.
            steps: denoising steps, 1..the preset's maximum.
            guidance_scale: classifier-free guidance, 0..20 (0 for turbo/lightning).
            seed: -1 derives the seed from the other fields (same request, same image), else 0..4294967295.
            init_image: optional start image (a sketch; PNG, JPEG or WebP, at most 2048 px a side): the
                result follows its layout and colours. Empty: text to image.
            strength: with init_image, how far the result may move from it, above 0 up to 1 (default 0.6;
                steps x strength must be at least 1). Ignored without init_image.
            loras: optional styles (LoRA adapters this Space offers, see its Styles box): a list of names,
                or "name:weight" strings (weights -2..2), at most 3. Empty: the base model.
            style_weight: the weight of each style named without one (default 1).
            history_key: optional key (at least 16 characters, e.g. a random hex string) under which the
                images are added to a history that /history returns (signed-in users: their own history).
        """
        # One image is the one-variant case of the page's button: the same path, without "variants".
        async for image, metadata, _, ids, _ in self.generate_variants(
                prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed, 1, init_image, strength,
                loras, style_weight, history_key, None, request, profile, progress):
            if isinstance(metadata, dict):
                metadata = {key: value for key, value in metadata.items() if key != "variants"}
            yield image, metadata, ids[0]

    async def generate_image(self, prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
                             init_image=None, strength=DEFAULT_STRENGTH, loras=None, style_weight=1.0,
                             request: gr.Request = None, profile: gr.OAuthProfile | None = None,
                             progress=gr.Progress()) -> str:
        """Generate one game-art image for Crafterse and return it (with its URL). The same request
        (prompt, settings and seed) returns the same image, from the cache. To queue without waiting, or
        to get the seed and timings, use submit and then status.

        Args:
            prompt: what to draw, up to 2000 characters, e.g. "a mossy stone golem, game item icon".
            negative_prompt: what to avoid; may be empty.
            preset: the preset this Space serves (the only allowed value is listed).
            width: image width in pixels, a multiple of 8 in 256..2048 (the preset's native size is best).
            height: image height in pixels, a multiple of 8 in 256..2048.
            steps: denoising steps, 1..the preset's maximum (turbo: 1, lightning: 4).
            guidance_scale: classifier-free guidance, 0..20 (0 for turbo and lightning).
            seed: -1 derives the seed from the other fields (same request, same image), else 0..4294967295.
            init_image: optional start image (a sketch; PNG, JPEG or WebP, at most 2048 px a side): the
                result follows its layout and colours. Empty: text to image.
            strength: with init_image, how far the result may move from it, above 0 up to 1 (default 0.6;
                steps x strength must be at least 1). Ignored without init_image.
            loras: optional styles (LoRA adapters this Space offers, see its Styles box): a list of names,
                or "name:weight" strings (weights -2..2), at most 3. Empty: the base model.
            style_weight: the weight of each style named without one (default 1).
        """
        image = None
        async for image, _, _ in self.generate(prompt, negative_prompt, preset, width, height, steps,
                                               guidance_scale, seed, init_image, strength, loras, style_weight,
                                               request, profile, progress):
            pass  # the last value is the finished image; failures raise gr.Error with the reason
        return image

    @not_an_mcp_tool
    async def generate_variants(self, prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
                                num_images=1, init_image=None, strength=DEFAULT_STRENGTH, loras=None, style_weight=1.0,
                                history_key="", browser_key=None, request: gr.Request = None,
                                profile: gr.OAuthProfile | None = None,
                                progress=gr.Progress()) -> AsyncIterator[tuple]:
        """Generate num_images variants of one request (seeds seed, seed+1, ...) and wait for all (the
        page's Generate button). Each variant is a request of its own: its own id, cache entry and
        stored file, so asking later for one seed is a cache hit. Returns the first image, its metadata
        with "variants" (one entry per image: request_id, seed, state, url, cached, error) and a gallery.

        Args:
            prompt: what to draw, up to 2000 characters.
            negative_prompt: what to avoid; may be empty.
            preset: the preset this Space serves (see the dropdown).
            width: image width, a multiple of 8 in 256..2048.
            height: image height, a multiple of 8 in 256..2048.
            steps: denoising steps, 1..the preset's maximum.
            guidance_scale: classifier-free guidance, 0..20 (0 for turbo/lightning).
            seed: the first variant's seed: -1 derives it from the other fields, else 0..4294967295.
            num_images: how many variants, 1..4 (each counts as one request against your limits).
            init_image: optional start image (a sketch; PNG, JPEG or WebP, at most 2048 px a side): the
                result follows its layout and colours. Empty: text to image.
            strength: with init_image, how far the result may move from it, above 0 up to 1 (default 0.6;
                steps x strength must be at least 1). Ignored without init_image.
            loras: optional styles (LoRA adapters this Space offers, see its Styles box): a list of names,
                or "name:weight" strings (weights -2..2), at most 3. Empty: the base model.
            style_weight: the weight of each style named without one (default 1).
        """
        started = time.perf_counter()
        caller = self._caller(request, profile)
        first = await anyio.to_thread.run_sync(lambda: self._request(
            caller, prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
            init_image=init_image, strength=strength, loras=loras, style_weight=style_weight))
        try:
            generations = first.variants(num_images)
        except GenerationError as error:
            raise gr.Error(str(error), title="Invalid input") from None
        jobs = await anyio.to_thread.run_sync(self._submit_all, generations, caller)
        ids = [job.request_id for job in jobs]
        try:
            if not all(job.finished for job in jobs):  # the Cancel button needs the ids first
                yield gr.skip(), gr.skip(), gr.skip(), ids, gr.skip()
                shown_preview = ""
                async for jobs in self._follow_all(jobs):
                    desc = await anyio.to_thread.run_sync(self._variants_text, jobs)  # may ask Redis
                    running = self._running(jobs) or jobs[0]
                    self._show_progress(progress, running, desc)
                    if running.preview and running.preview != shown_preview:  # the image as it forms
                        shown_preview = running.preview
                        yield image_from_data_url(running.preview), gr.skip(), gr.skip(), ids, gr.skip()
        finally:
            for job in jobs:
                self.admission.release(caller, job.request_id)
        output = await anyio.to_thread.run_sync(self._variants_output, jobs, first, started)
        key = self._history_key(caller, history_key, browser_key)
        if key:
            await anyio.to_thread.run_sync(self._remember, key, jobs)
        yield output

    # ---- history ------------------------------------------------------------------------------
    @staticmethod
    def _history_key(caller: Caller, history_key: Any = "", browser_key: Any = None) -> str | None:
        """Whose history: a signed-in designer's own; else a key the client holds (the page's browser
        key, or one an API client chose). Never the address: people behind one proxy share it."""
        if caller.signed_in:
            return caller.key
        for prefix, key in (("key:", history_key), ("browser:", browser_key)):
            if isinstance(key, str) and len(key.strip()) >= MIN_KEY_CHARS:
                return prefix + key.strip()
        return None

    def _remember(self, key: str, jobs: list[Job]) -> None:
        for job in jobs:
            if job.state == "done" and job.result:
                settings = {name: job.request.get(name) for name in HISTORY_FIELDS if name in job.request}
                self.services.history.add(key, {**settings, "object_key": job.result["object_key"],
                                                "storage": job.result.get("storage", ""), "url": job.result["url"]})

    def _history_entries(self, key: str | None, limit: int = 24) -> list[dict[str, Any]]:
        entries = self.services.history.recent(key, limit) if key else []
        # Re-signed when in R2/S3 (a presigned URL expires); a local folder's URL is the clone that holds it.
        return [dict(entry, url=self.services.objects.url_for(entry["object_key"], entry["storage"]))
                if entry.get("storage") else entry for entry in entries]

    def history(self, history_key: str = "", request: gr.Request = None,
                profile: gr.OAuthProfile | None = None) -> list[dict]:
        """Your recent images, newest first (up to 24), each with its settings and URL: the signed-in
        user's own, or those recorded under history_key.

        Args:
            history_key: the key given to generate (at least 16 characters); ignored when signed in.
        """
        key = self._history_key(self._caller(request, profile), history_key)
        if key is None:
            raise gr.Error(f"history_key: at least {MIN_KEY_CHARS} characters (or sign in)", title="Invalid input")
        return self._history_entries(key)

    @not_an_mcp_tool
    def show_history(self, browser_key: Any, request: gr.Request = None,
                     profile: gr.OAuthProfile | None = None) -> tuple[list, list]:
        """The page's History gallery (local copies: a clone that did not make an image fetches it)."""
        entries = self._history_entries(self._history_key(self._caller(request, profile), "", browser_key))
        shown = []
        for entry in entries:
            try:
                path = self.services.objects.local_path(entry["object_key"])
            except Exception:  # pruned everywhere, or the store is away: skip it
                path = None
            if path is not None:
                shown.append((str(path), entry))
        return [(path, _history_caption(entry)) for path, entry in shown], shown

    @not_an_mcp_tool
    def send_to_sketch(self, picked: Any) -> tuple:
        if not picked:
            raise gr.Error("pick an image in History first", title="Nothing picked")
        return picked[0], gr.Accordion(open=True)

    def _submit_all(self, generations: list[GenerationRequest], caller: Caller) -> list[Job]:
        """All variants or none: one refused (a limit, a full queue) cancels those already queued."""
        jobs: list[Job] = []
        for index, generation in enumerate(generations):
            try:
                jobs.append(self._submit(generation, caller, False))
            except gr.Error as error:
                for job in jobs:
                    self.gateway.cancel(job.request_id)
                    self.admission.release(caller, job.request_id)
                prefix = f"image {index + 1} of {len(generations)} refused: " if len(generations) > 1 else ""
                raise gr.Error(prefix + error.message, title=error.title) from None
        return jobs

    async def _follow_all(self, jobs: list[Job]) -> AsyncIterator[list[Job]]:
        """Yields the jobs whenever one changes, until all finish or the request times out."""
        deadline = time.monotonic() + self.services.settings.request_timeout_seconds
        # Watching starts before the first read, so a change made since submit() is read, not waited for.
        with self.waiters.watch(job.request_id for job in jobs) as watch:
            while not all(job.finished for job in jobs) and time.monotonic() < deadline:
                latest = await anyio.to_thread.run_sync(
                    lambda: [self.services.jobs.get(j.request_id) or j for j in jobs])
                if [job.version for job in latest] != [job.version for job in jobs]:
                    jobs = latest
                    yield jobs
                    if all(job.finished for job in jobs):
                        break
                    await asyncio.sleep(FOLLOW_MIN_INTERVAL_SECONDS)
                await watch.changed(min(self.follow_timeout, max(0.0, deadline - time.monotonic())))

    @staticmethod
    def _running(jobs: list[Job]) -> Job | None:
        return next((job for job in jobs if job.state == "running" and job.total_steps), None)

    def _variants_text(self, jobs: list[Job]) -> str:
        if len(jobs) == 1:
            return self._progress_text(jobs[0])
        finished, running = sum(job.finished for job in jobs), self._running(jobs)
        if running is None:
            return f"{finished} of {len(jobs)} images done"
        return f"image {jobs.index(running) + 1} of {len(jobs)} ({finished} done)"

    def _variants_output(self, jobs: list[Job], first: GenerationRequest, started: float) -> tuple:
        """Every finished image in order; failed or unfinished variants are listed with their reason.
        Nothing done at all is an error, as for a single image."""
        timeout = self.services.settings.request_timeout_seconds
        done = [job for job in jobs if job.state == "done"]
        if not done:
            job = jobs[0]
            if not job.finished:
                raise gr.Error(f"still running after {timeout:.0f} s; ask /status with request_id {job.request_id}",
                               title="Timeout")
            raise gr.Error(job.error or job.state, title=job.state.capitalize())
        files = [self._image_file(job.result) for job in done]
        summaries = [self._variant_summary(job) for job in jobs]
        metadata = dict(done[0].result, seed_derived=not first.seed_was_given and done[0] is jobs[0],
                        variants=summaries)
        metadata["timings"] = dict(metadata.get("timings", {}), total_s=round(time.perf_counter() - started, 4))
        if first.init_image:  # img2img: which start image (its sha256, the key in the object store) and how far
            metadata.update(init_image=first.init_image, strength=first.strength)
        metadata.update(_request_labels(done[0]))
        gallery = [(path, self._caption(job.result)) for path, job in zip(files, done)]
        # Each image's own metadata, for a click on its thumbnail (the first one's is the one shown).
        shown = [(path, metadata if job is done[0] else dict(job.result, variants=summaries, **_request_labels(job)))
                 for path, job in zip(files, done)]
        return files[0], metadata, gallery, [job.request_id for job in jobs], shown

    @staticmethod
    def _variant_summary(job: Job) -> dict[str, Any]:
        result = job.result or {}
        return {"request_id": job.request_id, "seed": job.request.get("seed", result.get("seed")),
                "state": job.state, "url": result.get("url"), "cached": result.get("cached", False),
                "error": None if job.state == "done" else (job.error or f"still {job.state}")}

    @staticmethod
    def _caption(result: dict[str, Any]) -> str:
        return f"seed {result['seed']}" + (" (cached)" if result.get("cached") else "")

    def _show_progress(self, progress, job: Job, desc: str) -> None:
        if progress is None:
            return
        if job.state == "running" and job.total_steps:
            progress((job.step, job.total_steps), desc=desc, unit="steps")
        else:
            progress(None, desc=desc)

    def _progress_text(self, job: Job) -> str:
        return self._queued_text(job) if job.state == "queued" else "generating"

    def _queued_text(self, job) -> str:
        position = self.gateway.queue_position(job)
        if position:
            return f"queued (position {position})"
        estimate = self.services.queue.wait_estimate()
        return f"queued: {estimate['backlog']} ahead in the fleet, about {estimate['estimated_wait_s']:.0f} s"

    def _image_file(self, result: dict[str, Any]) -> str:
        return str(self.services.objects.local_path(result["object_key"]))

    def submit(self, prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
               request_id: str | None = None, priority: str = "interactive", webhook_url: str = "",
               init_image=None, strength=DEFAULT_STRENGTH, loras=None, style_weight=1.0,
               request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> str:
        """Queue a request without waiting; returns its request id for status and cancel.

        Args:
            prompt: what to draw, up to 2000 characters.
            negative_prompt: what to avoid; may be empty.
            preset: the preset this Space serves.
            width: image width, a multiple of 8 in 256..2048.
            height: image height, a multiple of 8 in 256..2048.
            steps: denoising steps, 1..the preset's maximum.
            guidance_scale: classifier-free guidance, 0..20 (0 for turbo/lightning).
            seed: -1 derives the seed from the other fields, else 0..4294967295.
            request_id: optional idempotency key of your own (up to 112 characters of letters, digits
                and . _ : -): resubmitting it returns the same job; it is scoped to you, so others'
                ids never clash with yours. Empty: a new random id.
            priority: "interactive" (default: someone is waiting) or "bulk" (the backend's batch work):
                interactive requests run first; bulk still gets at least 1 run in BULK_EVERY.
            webhook_url: optional http(s) URL on a host in WEBHOOK_ALLOWED_HOSTS; when the request is
                done or failed it receives one signed POST (Standard Webhooks headers) per state.
            init_image: optional start image (a sketch; PNG, JPEG or WebP, at most 2048 px a side): the
                result follows its layout and colours. Empty: text to image.
            strength: with init_image, how far the result may move from it, above 0 up to 1 (default 0.6;
                steps x strength must be at least 1). Ignored without init_image.
            loras: optional styles (LoRA adapters this Space offers, see its Styles box): a list of names,
                or "name:weight" strings (weights -2..2), at most 3. Empty: the base model.
            style_weight: the weight of each style named without one (default 1).
        """
        caller = self._caller(request, profile)
        generation = self._request(caller, prompt, negative_prompt, preset, width, height, steps, guidance_scale,
                                   seed, request_id, priority, webhook_url, init_image, strength, loras, style_weight)
        self._submit(generation, caller, chosen=bool((request_id or "").strip()))
        return (request_id or "").strip() or generation.request_id

    BATCH_FIELDS = ("prompt", "negative_prompt", "preset", "width", "height", "steps", "guidance_scale", "seed",
                    "request_id", "priority", "webhook_url", "loras")

    def submit_batch(self, requests: list, request: gr.Request = None,
                     profile: gr.OAuthProfile | None = None) -> list[dict]:
        """Queue several requests in one call without waiting (the backend's batch); wait for them with
        wait_all. Every request is validated first: one invalid request refuses the whole batch, with
        its index and field named, and nothing is queued. Then each is admitted like a single submit
        (rate and in-flight limits count every request), so the answer has one entry per request, in
        order: {"request_id": ...} when queued (or already known under that id), else {"error": ...}.

        Args:
            requests: a list of up to BATCH_MAX_REQUESTS objects with the fields of submit (prompt;
                optional negative_prompt, preset, width, height, steps, guidance_scale, seed, request_id,
                priority, webhook_url, loras; missing ones take the preset's defaults).
        """
        caller = self._caller(request, profile)
        generations = [self._batch_request(caller, index, item) for index, item in enumerate(self._batch(requests))]
        outcomes = []
        for generation, item in zip(generations, requests):
            chosen = (item.get("request_id") or "").strip()
            try:
                self._submit(generation, caller, chosen=bool(chosen))
                outcomes.append({"request_id": chosen or generation.request_id})
            except gr.Error as error:  # refused by a limit or a full queue: this one only
                outcomes.append({"error": f"{error.title}: {error.message}", "request_id": chosen or None})
        return outcomes

    def _batch(self, requests: Any) -> list[dict]:
        limit = self.services.settings.batch_max_requests
        if not isinstance(requests, list) or not requests:
            raise gr.Error("requests: must be a non-empty list of request objects", title="Invalid input")
        if len(requests) > limit:
            raise gr.Error(f"requests: at most {limit} per batch (BATCH_MAX_REQUESTS), got {len(requests)}",
                           title="Invalid input")
        return requests

    def _batch_request(self, caller: Caller, index: int, item: Any) -> GenerationRequest:
        if not isinstance(item, dict):
            raise gr.Error(f"requests[{index}]: must be an object with the fields of submit", title="Invalid input")
        unknown = sorted(set(item) - set(self.BATCH_FIELDS))
        if unknown:
            raise gr.Error(f"requests[{index}]: unknown field(s) {', '.join(unknown)}; known: "
                           f"{', '.join(self.BATCH_FIELDS)}", title="Invalid input")
        values = {name: item.get(name) for name in self.BATCH_FIELDS}
        if values["request_id"] is not None and not isinstance(values["request_id"], str):
            raise gr.Error(f"requests[{index}].request_id: must be a string, got {values['request_id']!r}",
                           title="Invalid input")
        values["preset"] = values["preset"] or self.services.identity.preset
        values["negative_prompt"] = values["negative_prompt"] or ""
        try:
            return self._request(caller, **values)
        except gr.Error as error:
            raise gr.Error(f"requests[{index}].{error.message}", title="Invalid input") from None

    async def wait_all(self, request_ids: list, timeout_seconds: float = 60.0, request: gr.Request = None,
                       profile: gr.OAuthProfile | None = None) -> dict[str, dict]:
        """Wait until every one of your requests has finished (done, failed or cancelled), or the timeout
        passes; returns each one's status keyed by its id (check each "state": a request still queued
        or running at the timeout is returned as it is).

        Args:
            request_ids: the ids submit or submit_batch returned (or the ones you chose).
            timeout_seconds: how long to wait at most, 0..REQUEST_TIMEOUT_SECONDS.
        """
        caller = self._caller(request, profile)
        if not isinstance(request_ids, list) or not all(isinstance(rid, str) for rid in request_ids):
            raise gr.Error("request_ids: must be a list of request id strings", title="Invalid input")
        try:
            timeout = float(timeout_seconds)
        except (TypeError, ValueError):
            raise gr.Error(f"timeout_seconds: must be a number, got {timeout_seconds!r}", title="Invalid input") \
                from None
        if not 0 <= timeout <= self.services.settings.request_timeout_seconds:
            raise gr.Error(f"timeout_seconds: must be in 0..{self.services.settings.request_timeout_seconds:.0f}, "
                           f"got {timeout_seconds}", title="Invalid input")
        internal = {rid: self._visible_job(rid, caller) for rid in dict.fromkeys(request_ids)}
        deadline = time.monotonic() + timeout
        with self.waiters.watch(internal.values()) as watch:
            while not await anyio.to_thread.run_sync(self._all_finished, list(internal.values())):
                if time.monotonic() >= deadline:
                    break
                await watch.changed(min(self.follow_timeout, max(0.0, deadline - time.monotonic())))
        return {rid: self._public(self.gateway.status(internal[rid]), rid) for rid in internal}

    def _all_finished(self, internal_ids: list[str]) -> bool:
        jobs = [self.services.jobs.get(internal_id) for internal_id in internal_ids]
        return all(job is None or job.finished for job in jobs)  # None: expired meanwhile, nothing to wait for

    def _visible_job(self, request_id: str, caller: Caller) -> str:
        """The internal id of the caller's job named request_id (their own chosen id, or a generated id
        they hold). Someone else's private job is answered exactly like an unknown one."""
        request_id = (request_id or "").strip()
        try:
            scoped = scoped_request_id(caller, request_id)
        except GenerationError:
            scoped = None
        for candidate in (scoped, request_id):
            job = self.services.jobs.get(candidate) if candidate else None
            if job is not None and may_see(job, caller):
                return candidate
        raise gr.Error(str(UnknownRequest(f"no request with id {request_id!r} of yours (never submitted, "
                                          "or expired after a day)")), title="Unknown request")

    def status(self, request_id: str, request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
        """State, progress, queue position and, once done, the result (image URL, seed, timings) of one
        of your requests.

        Args:
            request_id: the id submit returned (or the one you chose).
        """
        caller = self._caller(request, profile)
        return self._public(self.gateway.status(self._visible_job(request_id, caller)), request_id)

    def cancel(self, request_id: str, request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
        """Cancel one of your requests (a running one stops at its next step); returns its status.

        Args:
            request_id: the id submit returned (or the one you chose).
        """
        caller = self._caller(request, profile)
        return self._public(self.gateway.cancel(self._visible_job(request_id, caller)), request_id)

    def cancel_current(self, request_id: str, request: gr.Request = None,
                       profile: gr.OAuthProfile | None = None) -> dict:
        """The Cancel button: the ids (one, or a list for variants) came from this session's own
        generate (internal form); returns the status of the first."""
        caller = self._caller(request, profile)
        ids = request_id if isinstance(request_id, list) else [request_id]
        jobs = [self.services.jobs.get(rid) if isinstance(rid, str) else None for rid in ids]
        if not jobs or any(job is None or not may_see(job, caller) for job in jobs):
            raise gr.Error(f"no request with id {request_id!r} of yours", title="Unknown request")
        return [self.gateway.cancel(job.request_id) for job in jobs][0]

    @not_an_mcp_tool
    def feedback(self, request_id: str, vote: str, request: gr.Request = None,
                 profile: gr.OAuthProfile | None = None) -> dict:
        """Rate one of your finished images: thumbs "up" or "down", once per image. Votes are counted in
        /metrics by A/B experiment and arm (imagegen_feedback_total); returns the request's status.

        Args:
            request_id: the id of the image (as generate, submit or status returned it).
            vote: "up" or "down".
        """
        caller = self._caller(request, profile)
        internal = self._visible_job(request_id, caller)
        try:
            return self._public(self.gateway.feedback(internal, (vote or "").strip().lower()), request_id)
        except GenerationError as error:
            raise gr.Error(str(error), title="Invalid input") from None

    @not_an_mcp_tool
    def rate_shown(self, metadata: Any, vote: str, request: gr.Request = None,
                   profile: gr.OAuthProfile | None = None) -> str:
        """The page's thumbs buttons: rate the image shown (its metadata names its request)."""
        request_id = metadata.get("request_id") if isinstance(metadata, dict) else None
        if not request_id:
            raise gr.Error("generate an image first", title="Nothing to rate")
        status = self.feedback(request_id, vote, request, profile)
        arm = status.get("experiment")
        return f"Rated {vote}" + (f" (experiment {arm['name']}, arm {arm['arm']})" if arm else "") + "."

    @not_an_mcp_tool
    def models(self) -> dict:
        """Presets, the model versions (commits) serving each and the workers on them, and the running
        A/B experiment: what GET /models returns."""
        return self.services.models()

    @staticmethod
    def _public(status: dict[str, Any], request_id: str) -> dict[str, Any]:
        """The caller sees the id they used, not its scoped form."""
        status = dict(status, request_id=(request_id or "").strip())
        if isinstance(status.get("result"), dict):
            status["result"] = dict(status["result"], request_id=status["request_id"])
        return status

    def banner(self) -> tuple[str, Any]:
        pipeline = self.services.pipeline
        ready = pipeline.state == "ready"
        if ready:
            identity = self.services.identity
            text = (f"Model ready: **{identity.model_id}** at `{_short_revision(identity.model_revision)}` on "
                    f"{pipeline.device} ({pipeline.detail}).")
        elif pipeline.state == "failed":
            text = f"⚠️ Model failed to load: {pipeline.error}"
        else:
            text = f"⏳ Model {pipeline.state}: {pipeline.detail} — requests are queued meanwhile."
        for problem in self.services.unreachable:
            text += f"\n\n⚠️ {problem}"
        for backend, state in self.services.health_state.degraded().items():
            text += f"\n\n⚠️ {backend} unavailable ({state['reason']}): {state['meaning']}."
        # Fast while loading; then slow, to keep showing degraded backends as they come and go.
        return text, gr.Timer(value=1.0 if not ready else 5.0, active=pipeline.state != "failed")


def _short_revision(revision: str) -> str:
    """A commit as people quote it (12 hex digits, a folder digest keeps its "sha256:"), a name as it is."""
    prefix, _, digits = revision.rpartition(":")
    return f"{prefix}:{digits[:12]}" if prefix else revision[:12] if len(revision) == 40 else revision


def _request_labels(job: Job) -> dict[str, Any]:
    """What the job's request adds to an image's metadata: its styles (a variant arm's too) and A/B arm."""
    labels: dict[str, Any] = {}
    if job.request.get("loras"):
        labels["loras"] = job.request["loras"]
    if job.request.get("experiment"):
        labels["experiment"] = {"name": job.request["experiment"], "arm": job.request.get("arm")}
    return labels


HISTORY_FIELDS = ("prompt", "negative_prompt", "preset", "width", "height", "steps", "guidance_scale", "seed",
                  "init_image", "strength", "loras")


def _history_caption(entry: dict[str, Any]) -> str:
    prompt = entry.get("prompt", "")
    return f"{prompt[:40]}{'...' if len(prompt) > 40 else ''} (seed {entry.get('seed')})"


def _new_browser_key(key: Any) -> str:
    """The page's own history key, made once per browser and kept in its localStorage."""
    return key if isinstance(key, str) and len(key) >= MIN_KEY_CHARS else secrets.token_hex(16)


def _pick_history(shown: list | None, selected: gr.SelectData) -> tuple:
    if not shown or selected.index is None or not 0 <= selected.index < len(shown):
        return gr.skip(), gr.skip()
    path, entry = shown[selected.index]
    return {k: v for k, v in entry.items() if k != "storage"}, (path, entry)


def _reuse(picked: Any) -> tuple:
    """The form takes a history image's settings (its seed too: the same request is a cache hit)."""
    if not picked:
        raise gr.Error("pick an image in History first", title="Nothing picked")
    entry = picked[1]
    styles = [f"{item['name']}:{item['weight']}" for item in entry.get("loras") or []]
    return (entry.get("prompt", ""), entry.get("negative_prompt", ""), entry.get("width"), entry.get("height"),
            entry.get("steps"), entry.get("guidance_scale"), entry.get("seed"), styles)


def _add_to_gallery(shown: list | None, gallery: list) -> tuple[list, list]:
    """The session's gallery: this click's images first, newest click on top."""
    gallery = [(path, Handlers._caption(metadata)) for path, metadata in shown or []] + list(gallery or [])
    return gallery, gallery


def _show_variant(shown: list | None, selected: gr.SelectData) -> tuple:
    """A click on a variant shows it large, with its own metadata."""
    if not shown or selected.index is None or not 0 <= selected.index < len(shown):
        return gr.skip(), gr.skip()
    path, metadata = shown[selected.index]
    return path, metadata


def build_ui(services: Services):
    handlers = Handlers(services)
    preset = get_preset(services.identity.preset)
    with gr.Blocks(title="Crafterse image generation") as demo:
        with gr.Row():
            gr.Markdown("# Crafterse image generation")
            if services.settings.sign_in:
                # Signed-in designers are counted (limits) and own their jobs by their Hugging Face name.
                gr.LoginButton(size="sm", scale=0)
        banner = gr.Markdown(elem_id="model-banner")
        timer = gr.Timer(1.0)
        request_state = gr.State(None)
        gallery_state = gr.State([])
        shown_state = gr.State([])  # this click's images with each one's metadata
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=3, max_length=2000, elem_id="prompt",
                                    placeholder="a mossy stone golem guarding a crystal cave, game art")
                negative_prompt = gr.Textbox("", label="Negative prompt", lines=2, max_length=2000)  # optional in clients
                preset_choice = gr.Dropdown([preset.name], value=preset.name, label="Preset", allow_custom_value=True,
                                            info=preset.description)
                # Plain number boxes, not sliders: out-of-range values must reach our validation, whose
                # messages name the field (a slider refuses them with a message that names nothing).
                with gr.Row():
                    width = RawNumber(preset.width, label="Width", precision=0, step=8,
                                      info=f"multiple of 8, {MIN_SIDE}..{MAX_SIDE}")
                    height = RawNumber(preset.height, label="Height", precision=0, step=8,
                                       info=f"multiple of 8, {MIN_SIDE}..{MAX_SIDE}")
                with gr.Row():
                    steps = RawNumber(preset.default_steps, label="Steps", precision=0,
                                      info=f"1..{preset.max_steps}")
                    guidance = RawNumber(preset.guidance_scale, label="Guidance scale", step=0.5,
                                         info=f"0..{MAX_GUIDANCE:g} (0 for turbo/lightning)")
                with gr.Row():
                    # The browser shows an empty number box as 0, so "derived" needs a value of its own.
                    seed = RawNumber(value=DERIVED_SEED, label="Seed", precision=0,
                                     info=f"{DERIVED_SEED}: derived from the prompt (same prompt, same image); "
                                          f"or 0..{MAX_SEED}")
                    randomize = gr.Button("Randomize seed", size="sm")
                num_images = RawNumber(1, label="Images", precision=0, elem_id="num-images",
                                       info=f"variants per click, 1..{MAX_IMAGES} (seeds seed, seed+1, ...)")
                offered = handlers.styles.choices()
                with gr.Row(visible=bool(offered)):  # shown where LORAS offers styles; the API takes them anyway
                    styles = gr.Dropdown(offered, value=[], multiselect=True, max_choices=MAX_LORAS,
                                         allow_custom_value=True, label="Styles (LoRA)", elem_id="styles",
                                         info="name, or name:weight")
                    style_weight = RawNumber(1.0, label="Style weight", step=0.1, elem_id="style-weight",
                                             info=f"-{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g}, for each style without one")
                with gr.Accordion("Start from a sketch (optional)", open=False, elem_id="sketch-panel") as sketch_panel:
                    init_image = RawImage(label="Sketch", type="filepath", sources=["upload", "clipboard"],
                                          elem_id="init-image", height=220)
                    strength = RawNumber(DEFAULT_STRENGTH, label="Strength", step=0.05, elem_id="strength",
                                         info="how far the image may move from the sketch: above 0 up to 1 "
                                              "(steps x strength must be at least 1)")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_btn = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=3):
                image = gr.Image(label="Image", type="filepath", format="png", elem_id="result-image",
                                 interactive=False)
                variants = gr.Gallery(label="Variants (click one to show it)", columns=MAX_IMAGES, height=200,
                                      elem_id="variants", allow_preview=False)
                with gr.Row():
                    thumbs_up = gr.Button("👍 Good", size="sm", elem_id="thumbs-up")
                    thumbs_down = gr.Button("👎 Bad", size="sm", elem_id="thumbs-down")
                    rated = gr.Markdown(elem_id="rated")
                metadata = gr.JSON(label="Metadata", elem_id="metadata")
                gallery = gr.Gallery(label="This session", columns=4, height=240)
                with gr.Accordion("History: your recent images, on any clone", open=True, elem_id="history-panel"):
                    history_gallery = gr.Gallery(label="History (click one)", columns=6, height=200,
                                                 allow_preview=False, elem_id="history")
                    with gr.Row():
                        reuse_btn = gr.Button("Reuse settings", size="sm", elem_id="reuse")
                        send_btn = gr.Button("Send to sketch", size="sm", elem_id="send-to-sketch")
                    history_info = gr.JSON(label="Picked", elem_id="history-info")
        with gr.Accordion("Jobs (queue without waiting, status, cancel)", open=False):
            request_id = gr.Textbox(label="Request id (optional on submit: makes retries idempotent)")
            with gr.Row():
                submit_btn = gr.Button("Submit")
                status_btn = gr.Button("Status")
                cancel_id_btn = gr.Button("Cancel this id")
            # open and tall: the webhook delivery log is nested at the end
            job_info = gr.JSON(label="Job", open=True, max_height=1400)

        gr.Examples([["a mossy stone golem guarding a crystal cave, game art", "blurry"],
                     ["a glowing crystal sword, game item icon, plain background", ""],
                     ["a cozy tavern interior, isometric game art", "text, watermark"]],
                    inputs=[prompt, negative_prompt], label="Examples (the cache makes them instant after the first run)",
                    cache_examples=False)
        inputs = [prompt, negative_prompt, preset_choice, width, height, steps, guidance, seed]
        # History: this browser's own key (localStorage), or the API's history_key; shown images and the pick.
        browser_key = gr.BrowserState("", storage_key="crafterse-history-key")
        history_key = gr.Textbox("", visible=False)
        history_shown, history_picked = gr.State([]), gr.State(None)
        sketch = [init_image, strength, styles, style_weight]  # the optional inputs every generate takes
        generate_btn.click(
            handlers.generate_variants, inputs + [num_images] + sketch + [history_key, browser_key],
            [image, metadata, variants, request_state, shown_state],
            api_name="generate_variants", concurrency_limit=None,
        ).then(_add_to_gallery, [shown_state, gallery_state], [gallery, gallery_state], api_visibility="private"
               ).then(handlers.show_history, browser_key, [history_gallery, history_shown], api_visibility="private")
        history_gallery.select(_pick_history, history_shown, [history_info, history_picked], api_visibility="private")
        reuse_btn.click(_reuse, history_picked, [prompt, negative_prompt, width, height, steps, guidance, seed, styles],
                        api_visibility="private")
        send_btn.click(handlers.send_to_sketch, history_picked, [init_image, sketch_panel], api_visibility="private")
        gr.Button(visible=False).click(handlers.history, gr.Textbox(visible=False), gr.JSON(visible=False),
                                       api_name="history")
        variants.select(_show_variant, shown_state, [image, metadata], api_visibility="private")
        # One image and its metadata, for clients (the page's button makes variants).
        gr.Button(visible=False).click(handlers.generate, inputs + sketch + [history_key], [image, metadata, request_state],
                                       api_name="generate", concurrency_limit=None)
        cancel_btn.click(handlers.cancel_current, request_state, job_info, api_name="cancel_current",
                         api_visibility="private")
        randomize.click(lambda: random.randint(0, MAX_SEED), None, seed, api_visibility="private")
        # The endpoint for agents (MCP) and any client that wants only the image: one output.
        agent_image = gr.Image(type="filepath", format="png", visible=False)
        gr.Button(visible=False).click(handlers.generate_image, inputs + sketch, agent_image,
                                       api_name="generate_image", concurrency_limit=None)
        # API-only inputs of /submit, with their defaults (clients may leave them out).
        priority = gr.Textbox("interactive", visible=False)
        webhook_url = gr.Textbox("", visible=False)
        submit_btn.click(handlers.submit, inputs + [request_id, priority, webhook_url] + sketch, request_id,
                         api_name="submit")
        # The backend's batch: API (and MCP) only, no widgets.
        gr.Button(visible=False).click(handlers.submit_batch, gr.JSON(visible=False), gr.JSON(visible=False),
                                       api_name="submit_batch")
        gr.Button(visible=False).click(handlers.wait_all, [gr.JSON(visible=False), gr.Number(60, visible=False)],
                                       gr.JSON(visible=False), api_name="wait_all", concurrency_limit=None)
        status_btn.click(handlers.status, request_id, job_info, api_name="status")
        for button, vote in ((thumbs_up, "up"), (thumbs_down, "down")):
            button.click(handlers.rate_shown, [metadata, gr.State(vote)], rated, api_visibility="private")
        gr.Button(visible=False).click(handlers.feedback, [gr.Textbox(visible=False), gr.Textbox(visible=False)],
                                       gr.JSON(visible=False), api_name="feedback")
        gr.Button(visible=False).click(handlers.models, None, gr.JSON(visible=False), api_name="models")
        cancel_id_btn.click(handlers.cancel, request_id, job_info, api_name="cancel")
        # Liveness through Gradio's own queue (monitors; the benchmark's no-op baseline). Undocumented.
        ping_btn = gr.Button(visible=False)
        ping_btn.click(lambda: "pong", None, gr.Textbox(visible=False), api_name="ping",
                       api_visibility="undocumented")
        timer.tick(handlers.banner, None, [banner, timer], api_visibility="private")
        demo.load(handlers.banner, None, [banner, timer], api_visibility="private")
        demo.load(_new_browser_key, browser_key, browser_key, api_visibility="private").then(
            handlers.show_history, browser_key, [history_gallery, history_shown], api_visibility="private")
    # Our own queue bounds the work; Gradio's only needs room for everyone waiting on it.
    demo.queue(max_size=max(64, services.settings.queue_max_size * 4), default_concurrency_limit=8)
    return demo


def _add_service_routes(app, services: Services) -> None:
    """/healthz, /readyz, /models, /metrics and the output folder under /outputs, beside the Gradio UI + API."""
    from fastapi.responses import JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from prometheus_client import CONTENT_TYPE_LATEST

    output_dir = services.settings.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        health = services.health()
        return JSONResponse(health, status_code=503 if health["status"] in ("failed", "stopping") else 200)

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        status = services.health()["status"]
        return JSONResponse({"status": status}, status_code=200 if status in READY_STATES else 503)

    @app.get("/models")
    def models() -> JSONResponse:
        return JSONResponse(services.models())

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(services.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    app.mount("/outputs", StaticFiles(directory=output_dir), name="outputs")


def _gradio_options(services: Services) -> dict[str, Any]:
    # The MCP tools are the named API endpoints (generate, submit, status, cancel), described by the
    # handlers' docstrings; Gradio's MCP server calls them through the same API, so every admission rule
    # (identity from the proxy hop, rate and in-flight limits, request id scoping) applies to agents too.
    return {"allowed_paths": [str(services.settings.output_dir.resolve())], "ssr_mode": False,
            "footer_links": ["api", "gradio"], "mcp_server": services.settings.mcp_server}


def build_app(services: Services):
    """FastAPI app: the service routes, then the Gradio UI + API at /."""
    from fastapi import FastAPI

    app = FastAPI()
    _add_service_routes(app, services)
    demo = build_ui(services)
    app = gr.mount_gradio_app(app, demo, path="/", **_gradio_options(services))
    if demo.mcp_server_obj is not None:
        # Gradio's MCP bridge runs each tool call through a gradio Client on this URL. Without it (only
        # demo.launch sets it) the bridge builds the URL from the first caller's X-Forwarded-Host and
        # keeps it: one hostile header would send every later caller's tool calls, headers included,
        # to a host of the attacker's choosing. The loopback is always this very server.
        demo.mcp_server_obj._local_url = _loopback_url(services.settings)
    return app


def _loopback_url(settings: Settings) -> str:
    host = settings.server_name
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.server_port}/"


def _exit_when_model_fails(services: Services, server, exit_code: list[int]) -> None:
    """A Space whose model cannot load should stop with the reason, not serve errors forever."""
    try:
        services.pipeline.wait_ready()
    except Exception as error:
        logger.error("%s", error)
        exit_code[0] = 2
        server.should_exit = True


def _draining_server(config, services: Services):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On the first SIGTERM/SIGINT: /healthz says "stopping" (503, so a load balancer moves away) and
        the consumers stop warm (the job in hand finishes or is handed back) while the UI still answers
        /status; only then does the HTTP server close. A second signal closes it at once."""

        draining = False

        def handle_exit(self, sig, frame) -> None:
            if self.draining:
                return super().handle_exit(sig, frame)
            self.draining = services.stopping = True
            threading.Thread(target=self._drain, args=(sig, frame), name="drain", daemon=True).start()

        def _drain(self, sig, frame) -> None:
            services.stop_consumers()
            time.sleep(1.0)  # followers polling /status (every 0.25 s in /generate) see the final state
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def serve(services: Services) -> int:
    import uvicorn

    settings = services.settings
    app = build_app(services)
    # Open streams (browser tabs, clients' event streams) would hold a graceful shutdown forever.
    server = _draining_server(uvicorn.Config(app, host=settings.server_name, port=settings.server_port,
                                             log_level="warning", timeout_graceful_shutdown=3), services)
    # uvicorn handles SIGTERM itself, then raises it again once the server is down; with these
    # handlers in place that second raise returns here, so the worker shuts down warm (services.stop).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    exit_code = [0]
    threading.Thread(target=_exit_when_model_fails, args=(services, server, exit_code), daemon=True).start()
    logger.info("serving on http://%s:%d (public URL %s)", settings.server_name, settings.server_port,
                settings.base_url)
    server.run()
    services.stop()
    return exit_code[0]


def serve_zero_gpu(services: Services) -> int:
    """ZeroGPU mode: served by Gradio's own launch, which is where ZeroGPU hooks its startup (packing the
    weights moved to CUDA for the GPU calls). The service routes are registered on the app Gradio
    builds on, ahead of its own routes (its /{page} route would answer /healthz otherwise)."""
    from gradio.routes import App

    settings = services.settings
    app = App()
    _add_service_routes(app, services)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    demo = build_ui(services)
    demo.launch(server_name=settings.server_name, server_port=settings.server_port, prevent_thread_lock=True,
                quiet=True, _app=app, **_gradio_options(services))
    logger.info("serving on ZeroGPU at http://%s:%d (public URL %s)", settings.server_name, settings.server_port,
                settings.base_url)
    stop.wait()
    services.stopping = True  # /healthz says "stopping"; followers polling /status see the final state
    time.sleep(1.0)
    demo.close()
    services.stop()
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


READY_STATES = ("ok", "degraded")  # /readyz: the model is loaded and the process takes work


def start_health_server(services: Services, host: str, port: int):
    """The headless worker's /healthz (liveness: 503 once failed or stopping), /readyz (readiness: 200
    only while ready), /models and /metrics, for Kubernetes probes and Prometheus. Standard library only: the
    worker runs no web framework."""
    import http.server

    from prometheus_client import CONTENT_TYPE_LATEST

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, services.render_metrics(), CONTENT_TYPE_LATEST)
                return
            if path == "/models":
                self._send(200, json.dumps(services.models()).encode(), "application/json")
                return
            if path not in ("/healthz", "/readyz"):
                self._send(404, b'{"error": "not found"}', "application/json")
                return
            health = services.health()
            ok = health["status"] in READY_STATES if path == "/readyz" else health["status"] not in ("failed",
                                                                                                  "stopping")
            self._send(200 if ok else 503, json.dumps(health).encode(), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds would flood the log
            pass

    try:
        server = http.server.ThreadingHTTPServer((host, port), Handler)
    except OSError as error:  # the worker still works; its probes fail, so an orchestrator notices
        logger.error("worker health server not started on %s:%d: %s (set WORKER_HEALTH_PORT)", host, port, error)
        return None
    threading.Thread(target=server.serve_forever, name="health-server", daemon=True).start()
    logger.info("worker health on http://%s:%d/healthz", host, port)
    return server


def run_worker(services: Services) -> int:
    """Headless fleet member (`python app.py --worker`): consumes the fleet's queue, no UI; its
    /healthz, /readyz and /metrics on WORKER_HEALTH_PORT (0: none)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    health_port = services.settings.worker_health_port
    health = start_health_server(services, services.settings.server_name, health_port) if health_port else None
    services.start()
    fleet = services.settings.fleet
    logger.info("worker %s consuming %s", fleet.worker_name,
                fleet.sqs_queue_url if fleet.shared_queue == "sqs" else f"{fleet.kafka_topic_prefix}.requests")
    exit_code = 0
    while not stop.wait(0.5):
        if services.pipeline.state == "failed":
            logger.error("%s", services.pipeline.error)
            exit_code = 2
            break
    services.stopping = True  # /healthz answers 503 "stopping" while the job in hand finishes
    services.stop()  # warm: the job in hand finishes and is committed before the group is left
    if health is not None:
        health.shutdown()
    return exit_code


def build_compiled(settings: Settings) -> int:
    pipeline, _, _ = build_pipeline(settings)
    try:
        package = pipeline.build_compiled_package()
    except Exception as error:  # a model that cannot load names its variable (ModelUnavailable)
        logger.error("%s", error)
        return 2
    logger.info("compiled UNet written to %s: every start of this model on this kind of CPU loads it", package)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true",
                        help="run only the Kafka consumer (no UI): a GPU or CPU machine joining the fleet")
    parser.add_argument("--compile", action="store_true",
                        help="build the compiled UNet for this model and machine into COMPILE_CACHE_DIR, then exit")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as error:  # names the variable: one line, no traceback
        configure_logging("INFO")
        logger.error("%s", error)
        return 2
    configure_logging(settings.log_level)
    if args.compile:
        return build_compiled(settings)
    if args.worker and settings.zero_gpu:
        logger.error("--worker does not run on ZeroGPU (its GPU is lent per visitor call); unset "
                     "SPACES_ZERO_GPU for a fleet worker")
        return 2
    if args.worker and not settings.fleet.shared_queue:
        logger.error("--worker needs KAFKA_BOOTSTRAP_SERVERS or SQS_QUEUE_URL (and REDIS_URL): "
                     "it serves the fleet's queue")
        return 2
    if settings.zero_gpu:
        import spaces  # noqa: F401 - before torch: on ZeroGPU hardware it patches torch at import
    try:
        services = build_services(settings, worker_only=args.worker)
    except Exception as error:  # bad configuration (unknown preset...): one line, no traceback
        logger.error("%s", error)
        return 2
    if args.worker:
        return run_worker(services)
    try:
        services.start()
    except Exception as error:  # ZeroGPU loads the model before serving: a model that cannot load ends here
        logger.error("%s", services.pipeline.error or error)
        return 2
    return serve_zero_gpu(services) if settings.zero_gpu else serve(services)


if __name__ == "__main__":
    sys.exit(main())
