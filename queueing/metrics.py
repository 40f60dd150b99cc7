"""Prometheus metrics, one registry per process (served on /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# CPU generations take seconds to minutes; GPU ones well under a second.
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("imagegen_requests_total", "Requests by outcome", ["outcome"], registry=r)
        self.cache_hits = Counter("imagegen_cache_hits_total", "Result cache hits", registry=r)
        self.cache_misses = Counter("imagegen_cache_misses_total", "Result cache misses", registry=r)
        self.generation_seconds = Histogram("imagegen_generation_seconds", "Pipeline time per image", ["preset"],
                                            buckets=SECONDS_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("imagegen_queue_wait_seconds", "Submit to start of generation",
                                            buckets=SECONDS_BUCKETS, registry=r)
        self.backlog = Gauge("imagegen_backlog", "Requests waiting (local queue, or the fleet's consumer lag)",
                             registry=r)
        self.attempts = Counter("imagegen_attempts_total", "Generation attempts started by this worker", registry=r)
        self.dead_letters = Counter("imagegen_dead_letters_total", "Messages sent to the dead-letter topic",
                                    ["reason"], registry=r)
        self.rejected = Counter("imagegen_rejected_total", "Requests refused at the door", ["reason"], registry=r)
        self.degraded = Gauge("imagegen_backend_degraded", "1 while a backend is unreachable", ["backend"],
                              registry=r)
        self.routed = Counter("imagegen_routed_total", "Routing decisions: where new requests went, and why",
                              ["backend", "reason"], registry=r)
        self.estimated_cost = Counter("imagegen_estimated_cost_dollars_total",
                                      "Estimated cost of the images made, by backend", ["backend"], registry=r)
        self.decision_seconds = Histogram("imagegen_routing_decision_seconds", "Time to decide where a request goes",
                                          buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1), registry=r)
        self.workers = Gauge("imagegen_fleet_workers", "Live workers by preset (heartbeats)", ["preset"], registry=r)
        self.webhooks = Counter("imagegen_webhook_deliveries_total",
                                "Webhook POST attempts: delivered, retry (failed, retried) or gave_up", ["outcome"],
                                registry=r)
        self.priority_picks = Counter("imagegen_priority_picks_total", "Requests a worker took, by priority lane",
                                      ["priority"], registry=r)
        self.experiment_requests = Counter("imagegen_experiment_requests_total",
                                           "Requests put in an A/B experiment's arm (EXPERIMENT)",
                                           ["experiment", "arm"], registry=r)
        self.feedback = Counter("imagegen_feedback_total", "Designers' thumbs on results, by experiment and arm "
                                "(\"none\" outside an experiment)", ["experiment", "arm", "vote"], registry=r)
        self.model_load_seconds = Gauge("imagegen_model_load_seconds", "Time to load and warm up the model",
                                        registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
