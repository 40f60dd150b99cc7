"""Startup self-check: can this process reach Kafka, Redis and the object store?"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

# Hugging Face Spaces let a Space open outbound connections on these ports only.
SPACES_OUTBOUND_PORTS = (80, 443, 8080)


@dataclass(frozen=True)
class Endpoint:
    name: str
    host: str
    port: int


def kafka_endpoints(bootstrap_servers: str) -> list[Endpoint]:
    endpoints = []
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        endpoints.append(Endpoint("Kafka", host or server.strip(), int(port or 9092)))
    return endpoints


def redis_endpoints(url: str) -> list[Endpoint]:
    """Every node a Redis URL names: one, or several in a cluster URL (`redis+cluster://h1:p1,h2:p2/0`)."""
    from storage.redis_store import split_cluster_url

    first_node_url, other_nodes = split_cluster_url(url)
    return [url_endpoint("Redis", first_node_url, 6379)] + [Endpoint("Redis", node.host, node.port)
                                                            for node in other_nodes]


def url_endpoint(name: str, url: str, default_port: int) -> Endpoint:
    """Host and port only: the user, password and path of the URL never leave this function."""
    parts = urlsplit(url)
    if parts.scheme == "https" and default_port == 80:
        default_port = 443
    return Endpoint(name, parts.hostname or "", parts.port or default_port)


def check(endpoint: Endpoint, timeout: float = 3.0) -> str | None:
    """None when a TCP connection opens; else a message saying where and, for a port Spaces
    block, that this is the likely cause."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout):
            return None
    except OSError as error:
        message = f"{endpoint.name} unreachable at {endpoint.host}:{endpoint.port} ({error.strerror or error})"
        if endpoint.port not in SPACES_OUTBOUND_PORTS:
            message += (f"; note that Hugging Face Spaces allow outbound connections only on ports 80, 443 and "
                        f"8080, so port {endpoint.port} is blocked there")
        return message


def check_all(endpoints: list[Endpoint], timeout: float = 3.0) -> list[str]:
    return [problem for endpoint in endpoints if (problem := check(endpoint, timeout))]
